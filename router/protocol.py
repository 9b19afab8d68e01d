"""Pydantic models of TGI's native HTTP API; field names and JSON shapes are TGI's.

Upstream: `routes.py` parses request bodies into `GenerateRequest` / `CompatGenerateRequest` /
`TokenizeRequest`. Downstream: `validation.py` turns `GenerateParameters` into a
`types.ValidRequest`; `routes.py` / `streaming.py` serialize the response models.

Serialization follows TGI's serde attributes: `GenerateResponse.details`,
`Details.best_of_sequences` are omitted when absent, `top_tokens` only when non-empty;
`StreamResponse.generated_text` / `details` are always present (null until the last event);
a NaN logprob (the first prefill token) serializes as null. Use `model_dump(mode="json")`
or `model_dump_json()`.
"""

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from .config import RouterConfig
from .types import FinishReason

# TGI's serde default when the `max_new_tokens` key is absent; an explicit null means
# "as many as fit": max_total_tokens - input tokens (resolved in validation.py).
DEFAULT_MAX_NEW_TOKENS = 100
_U64_MAX = 2**64 - 1


class _Request(BaseModel):
    """Request bodies: unknown fields are ignored, NaN/inf rejected, null means "unset"."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    # Fields that are not Optional in TGI: an explicit null falls back to their default.
    null_means_default: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.null_means_default:
            data = {
                k: v for k, v in data.items() if v is not None or k not in cls.null_means_default
            }
        return data


class GrammarType(_Request):
    """TGI's `{"type": "json" | "json_object" | "regex", "value": ...}` (not supported yet)."""

    type: Literal["json", "json_object", "regex", "json_schema"]
    value: Any = None


class GenerateParameters(_Request):
    """Every parameter of TGI's `/generate`. Ranges are checked by `validation.Validator`.

    NOTE: as in TGI, an absent `max_new_tokens` is 100, while an explicit null asks for
    `max_total_tokens - input tokens`. Code that builds this model in Python and wants the
    latter must pass `max_new_tokens=None` explicitly.
    """

    null_means_default = ("do_sample", "stop", "watermark", "details", "decoder_input_details")

    best_of: int | None = Field(default=None, ge=0)
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=0)
    return_full_text: bool | None = None
    stop: list[str] = Field(default_factory=list)
    truncate: int | None = Field(default=None, ge=0)
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = Field(default=None, ge=0, le=_U64_MAX)
    top_n_tokens: int | None = Field(default=None, ge=0)
    grammar: GrammarType | None = None
    adapter_id: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _single_stop(cls, value: Any) -> Any:
        # Lenient where TGI is strict: a lone string is one stop sequence.
        return [value] if isinstance(value, str) else value


class GenerateRequest(_Request):
    null_means_default = ("parameters",)

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatGenerateRequest(_Request):
    """Body of `POST /`: `/generate` or, with `stream: true`, `/generate_stream`."""

    null_means_default = ("parameters", "stream")

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class TokenizeRequest(_Request):
    """Body of `POST /tokenize`: TGI takes a generate request; `parameters` are ignored."""

    null_means_default = ("parameters", "add_special_tokens")

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    add_special_tokens: bool = True


class _Response(BaseModel):
    """Response bodies, with TGI's `skip_serializing_if` rules."""

    omit_if_none: ClassVar[tuple[str, ...]] = ()
    omit_if_empty: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in self.omit_if_none:
            if data.get(name, 0) is None:
                del data[name]
        for name in self.omit_if_empty:
            if name in data and not data[name]:
                del data[name]
        return data


class Token(_Response):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class PrefillToken(_Response):
    id: int
    text: str
    # Null for the first prompt token, which has no logprob.
    logprob: float | None = None


class SimpleToken(_Response):
    """One entry of `/tokenize`'s answer: `text == inputs[start:stop]` (char offsets)."""

    id: int
    text: str
    start: int
    stop: int


class BestOfSequence(_Response):
    omit_if_empty = ("top_tokens",)

    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] = Field(default_factory=list)


class Details(_Response):
    omit_if_none = ("best_of_sequences",)
    omit_if_empty = ("top_tokens",)

    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    best_of_sequences: list[BestOfSequence] | None = None
    top_tokens: list[list[Token]] = Field(default_factory=list)


class GenerateResponse(_Response):
    omit_if_none = ("details",)

    generated_text: str
    details: Details | None = None


class StreamDetails(_Response):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(_Response):
    """One SSE event of `/generate_stream`; the last one carries text and details."""

    omit_if_empty = ("top_tokens",)

    index: int
    token: Token
    top_tokens: list[Token] = Field(default_factory=list)
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(_Response):
    error: str
    error_type: str


class Info(_Response):
    """`GET /info`: TGI's current fields plus the older ones some clients still read."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str | None = None
    model_device_type: str | None = None
    model_pipeline_tag: str | None = None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int = 2
    max_client_batch_size: int
    router: str = "text-generation-router"
    version: str
    sha: str | None = None
    docker_label: str | None = None
    # Fields of TGI < 2.0, kept for older clients.
    max_input_length: int | None = None
    waiting_served_ratio: float | None = None
    max_batch_total_tokens: int | None = None
    max_waiting_tokens: int | None = None
    max_batch_size: int | None = None

    @classmethod
    def from_config(
        cls,
        config: RouterConfig,
        *,
        max_input_tokens: int,
        max_total_tokens: int,
        max_batch_total_tokens: int | None,
        version: str,
        **model_facts: Any,
    ) -> "Info":
        """Build from the router config and the limits resolved after warmup.

        `model_facts`: model_sha, model_dtype, model_device_type, sha, docker_label...
        """
        return cls(
            model_id=config.model_id or config.tokenizer,
            max_concurrent_requests=config.max_concurrent_requests,
            max_best_of=config.max_best_of,
            max_stop_sequences=config.max_stop_sequences,
            max_input_tokens=max_input_tokens,
            max_total_tokens=max_total_tokens,
            max_client_batch_size=config.max_client_batch_size,
            validation_workers=config.validation_workers,
            version=version,
            max_input_length=max_input_tokens,
            waiting_served_ratio=config.waiting_served_ratio,
            max_batch_total_tokens=max_batch_total_tokens,
            max_waiting_tokens=config.max_waiting_tokens,
            max_batch_size=config.max_batch_size,
            **model_facts,
        )
