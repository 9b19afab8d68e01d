"""Pydantic models of the OpenAI API we serve, and their translation to native terms.

Upstream: `routes.py` parses request bodies into `ChatCompletionRequest` / `CompletionRequest`.
Downstream: each request's `to_generation_params()` gives a `GenerationParams`: its
`parameters` (a native `GenerateParameters`) go through the same `Validator` as `/generate`,
and `choice_request()` adds what the native API lacks (presence penalty, logit bias, one seed
per choice). Unknown request fields are accepted and logged. Response models serialize to
OpenAI's JSON: null where OpenAI sends null, optional keys omitted.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tgi_server.router.protocol import GenerateParameters
from tgi_server.router.protocol import _Response as Response  # omits `omit_if_none` fields
from tgi_server.router.types import FinishReason, ValidRequest

logger = logging.getLogger(__name__)

_U64_MASK = 2**64 - 1
# Below this, a temperature is greedy decoding (dividing logits by ~0 overflows).
_MIN_TEMPERATURE = 1e-5
MAX_LOGIT_BIAS = 100.0


class OpenAIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message, status, type, param, code)


def invalid_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(message, 400, "invalid_request_error", param)


def finish_reason(reason: FinishReason) -> str:
    return "length" if reason == FinishReason.LENGTH else "stop"


# ---- requests ----------------------------------------------------------------------------


class OpenAIRequest(BaseModel):
    """A request body: unknown fields are accepted and logged, never fatal."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="after")
    def _log_unknown_fields(self):
        if self.model_extra:
            logger.info("%s: ignoring unknown fields %s", type(self).__name__,
                        sorted(self.model_extra))
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One message; extra keys (e.g. `reasoning_content`) reach the chat template as given."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string: text parts joined, as TGI does; null is empty."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise invalid_request(
                    f"content parts of type {part.type!r} are not supported: this server "
                    "serves text-only models (use {\"type\": \"text\", \"text\": ...})",
                    "messages")
        return "".join(part.text for part in self.content)

    def to_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_none=True)
        # NOTE: "developer" is OpenAI's newer name for "system"; templates only know "system".
        message["role"] = "system" if self.role == "developer" else self.role
        message["content"] = self.text()
        return message


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = False


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """An OpenAI request in native terms, plus what the native API has no field for."""

    parameters: GenerateParameters
    presence_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))
    n: int = 1
    # Report each generated token's logprob (and `parameters.top_n_tokens` alternatives).
    logprobs: bool = False
    # Completions: prepend the prompt (`echo`), with its tokens' logprobs when `logprobs`.
    echo: bool = False
    # Completions with max_tokens=0: one token is generated (the minimum), none returned.
    keep_generated: bool = True

    def choice_request(self, valid: ValidRequest, index: int) -> ValidRequest:
        """Choice `index` of a validated request: seed + index, so seeded `n` reproduces."""
        sampling = replace(
            valid.sampling,
            presence_penalty=self.presence_penalty,
            logit_bias=self.logit_bias,
            seed=(valid.sampling.seed + index) & _U64_MASK,
        )
        return replace(valid, sampling=sampling)


class SamplingRequest(OpenAIRequest):
    """Fields shared by chat and completions."""

    model: str | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    n: int | None = Field(default=1, ge=1, le=128)
    seed: int | None = Field(default=None, ge=-(2**63), le=_U64_MASK)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _generation_params(self, vocab_size: int, max_new_tokens: int | None,
                           top_n_tokens: int | None, prompt_logprobs: bool = False,
                           **fields: Any) -> GenerationParams:
        # OpenAI samples by default (temperature 1); temperature 0 is greedy, as in TGI.
        greedy = self.temperature is not None and self.temperature < _MIN_TEMPERATURE
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        parameters = GenerateParameters(
            do_sample=not greedy,
            temperature=None if greedy else self.temperature,
            top_p=None if greedy or self.top_p in (None, 1.0) else self.top_p,
            frequency_penalty=self.frequency_penalty,
            max_new_tokens=max_new_tokens,
            stop=[s for s in stop if s],
            seed=None if self.seed is None else self.seed & _U64_MASK,
            top_n_tokens=top_n_tokens,
            decoder_input_details=prompt_logprobs,
        )
        return GenerationParams(
            parameters=parameters,
            presence_penalty=self.presence_penalty or 0.0,
            logit_bias=MappingProxyType(self._logit_bias(vocab_size)),
            n=self.n or 1,
            **fields,
        )

    def _logit_bias(self, vocab_size: int) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                token_id = int(key)
            except ValueError:
                raise invalid_request(f"`logit_bias` keys must be token ids, got {key!r}",
                                      "logit_bias") from None
            if not 0 <= token_id < vocab_size:
                raise invalid_request(
                    f"`logit_bias` token id {token_id} is outside the vocabulary [0, {vocab_size})",
                    "logit_bias")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise invalid_request(
                    f"`logit_bias` values must be in [-100, 100], got {value} for {token_id}",
                    "logit_bias")
            bias[token_id] = value
        return bias


class ChatCompletionRequest(SamplingRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]

    def to_generation_params(self, vocab_size: int) -> GenerationParams:
        self._check_unsupported()
        if self.top_logprobs and not self.logprobs:
            raise invalid_request("`top_logprobs` needs `logprobs: true`", "top_logprobs")
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        # NOTE: no max_tokens means as many as fit (max_total_tokens - prompt), as OpenAI does.
        return self._generation_params(
            vocab_size, max_tokens, (self.top_logprobs or 0) if self.logprobs else None,
            logprobs=bool(self.logprobs),
        )

    def _check_unsupported(self) -> None:
        guided = "needs guided generation, which this server does not support yet"
        if (self.tools or self.functions) and self.tool_choice != "none":
            raise invalid_request(f"`tools` {guided} (tool calling)", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise invalid_request(f"`tool_choice` {guided}", "tool_choice")
        if self.function_call not in (None, "none", "auto"):
            raise invalid_request(f"`function_call` {guided}", "function_call")
        if self.response_format and self.response_format.get("type", "text") != "text":
            kind = self.response_format.get("type")
            raise invalid_request(f"`response_format` of type {kind!r} {guided}",
                                  "response_format")


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions` (OpenAI's legacy text completions)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1, le=128)
    suffix: str | None = None

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise invalid_request("`prompt` cannot be empty", "prompt")
        if not all(isinstance(p, str) for p in prompts):
            raise invalid_request("prompts of token ids are not supported yet: send text",
                                  "prompt")
        return prompts

    def to_generation_params(self, vocab_size: int) -> GenerationParams:
        if self.suffix:
            raise invalid_request("`suffix` is not supported", "suffix")
        n = self.n or 1
        if self.best_of is not None and self.best_of != n:
            raise invalid_request(
                f"`best_of` must equal `n` ({n}) here: choices are not ranked server-side",
                "best_of")
        logprobs = self.logprobs is not None
        # NOTE: max_tokens=0 (echo the prompt with its logprobs, as evaluation harnesses do)
        # still runs one step, the least the engine can; that token is not returned.
        keep_generated = self.max_tokens != 0
        return self._generation_params(
            vocab_size, self.max_tokens if keep_generated else 1,
            self.logprobs if logprobs else None,
            logprobs=logprobs, echo=bool(self.echo), keep_generated=keep_generated,
            prompt_logprobs=bool(self.echo) and logprobs,
        )


# ---- responses ---------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    # Prompt tokens whose KV came from the prefix cache (`--prefix-caching`).
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Response):
    omit_if_none = ("role", "content")

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Response):
    """One SSE event; with `include_usage`, a last one has no choices and the usage."""

    omit_if_none = ("usage",)

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    # Null for the first prompt token (echo), which has no logprob.
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(Response):
    """The answer, and each SSE event of a stream (usage only in the answer / last event)."""

    omit_if_none = ("usage",)

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tgi-server"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body (named apart from the native `ErrorResponse` in the OpenAPI spec)."""

    error: ErrorDetail

    @classmethod
    def of(cls, e: OpenAIError) -> "OpenAIErrorResponse":
        return cls(error=ErrorDetail(message=e.message, type=e.type, param=e.param, code=e.code))
