"""Request validation: TGI's parameter rules, tokenization, truncation and token limits.

Upstream: `routes.py` (and the OpenAI routes) pass the raw inputs and a
`protocol.GenerateParameters`. Downstream: the returned `types.ValidRequest` goes to
`infer.py` and the queue. A `ValidationError` maps to HTTP 422, `error_type` "validation";
its message is the user-facing text (TGI's wording, with the numbers and the limit to change
where TGI's users found the token-limit errors confusing).
"""

import random
import threading
from typing import Any

from .config import RouterConfig
from .protocol import GenerateParameters, SimpleToken
from .types import SamplingParams, StoppingParams, ValidRequest


class ValidationError(Exception):
    """A request the server refuses; `str(error)` is the message sent to the client."""

    error_type = "validation"

    @property
    def message(self) -> str:
        return str(self)


class Validator:
    """Checks a request against the router's limits and resolves every default.

    `max_input_tokens` / `max_total_tokens` are the limits resolved after warmup.
    `rng` draws the seed of requests that set none (a fresh `random.Random` by default).
    """

    def __init__(
        self,
        config: RouterConfig,
        tokenizer: Any,
        max_input_tokens: int,
        max_total_tokens: int,
        *,
        rng: random.Random | None = None,
        max_prefill_tokens: int | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.max_input_tokens = max_input_tokens
        self.max_total_tokens = max_total_tokens
        # The longest prompt one prefill takes (with chunked prefill, shorter than the longest
        # input): a prompt's logprobs need all of it in one.
        self.max_prefill_tokens = max_prefill_tokens or max_input_tokens
        self._rng = rng or random.Random()
        # NOTE: routes call `validate` from worker threads; a HF fast tokenizer may mutate
        # its Rust state (truncation/padding) inside `encode`, which is not thread safe.
        self._tokenizer_lock = threading.Lock()

    def validate(
        self,
        inputs: str,
        parameters: GenerateParameters,
        stream: bool,
        *,
        add_special_tokens: bool = True,
    ) -> ValidRequest:
        """Raise `ValidationError` on the first broken rule; otherwise a `ValidRequest`."""
        p = parameters
        self._check_unsupported(p)
        best_of = self._best_of(p, stream)
        if stream and p.decoder_input_details:
            raise ValidationError(
                "`decoder_input_details` == true is not supported when streaming tokens"
            )
        sampling = self._sampling(p, best_of)
        if p.max_new_tokens is not None and p.max_new_tokens <= 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        stop_sequences = self._stop_sequences(p)
        top_n_tokens = self._top_n_tokens(p)
        if not inputs:
            raise ValidationError("`inputs` cannot be empty")
        truncate = self._truncate(p)
        inputs, input_ids = self._tokenize(inputs, truncate, add_special_tokens)
        if (p.decoder_input_details and self.config.enable_prefill_logprobs
                and len(input_ids) > self.max_prefill_tokens):
            raise ValidationError(
                f"`decoder_input_details` needs the prompt in one prefill: at most "
                f"{self.max_prefill_tokens} tokens (`--max-batch-prefill-tokens`). Given: "
                f"{len(input_ids)} tokens.")
        max_new_tokens = self._max_new_tokens(len(input_ids), p.max_new_tokens)
        return ValidRequest(
            inputs=inputs,
            input_ids=input_ids,
            sampling=sampling,
            stopping=StoppingParams(max_new_tokens=max_new_tokens, stop_sequences=stop_sequences),
            top_n_tokens=top_n_tokens,
            details=p.details,
            decoder_input_details=p.decoder_input_details,
            return_full_text=bool(p.return_full_text),
            best_of=best_of,
            stream=stream,
        )

    def validate_tokenize(self, inputs: str, add_special_tokens: bool = True) -> list[SimpleToken]:
        """The tokens of `inputs` for `/tokenize`, with char offsets into `inputs`."""
        try:
            with self._tokenizer_lock:
                encoding = self.tokenizer(
                    inputs, add_special_tokens=add_special_tokens, return_offsets_mapping=True
                )
        except NotImplementedError:  # slow tokenizers have no offsets
            return self._tokenize_without_offsets(inputs, add_special_tokens)
        return [
            SimpleToken(id=token_id, text=inputs[start:stop], start=start, stop=stop)
            for token_id, (start, stop) in zip(
                encoding["input_ids"], encoding["offset_mapping"], strict=True
            )
        ]

    # -- parameter rules -----------------------------------------------------------------

    def _check_unsupported(self, p: GenerateParameters) -> None:
        if p.grammar is not None:
            raise ValidationError("`grammar` is not supported yet by this server")
        if p.watermark:
            raise ValidationError("`watermark` is not supported yet by this server")
        if p.adapter_id not in (None, "", self.config.model_id):
            raise ValidationError(
                f"`adapter_id` is not supported yet by this server (LoRA adapters). "
                f"Given: {p.adapter_id!r}"
            )

    def _best_of(self, p: GenerateParameters, stream: bool) -> int:
        best_of = 1 if p.best_of is None else p.best_of
        max_best_of = self.config.max_best_of
        if best_of == 1:
            return 1
        if stream:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
        if max_best_of == 1:
            raise ValidationError(
                "`best_of` != 1 is not allowed for this endpoint "
                "(the server was started with `--max-best-of 1`)"
            )
        if not 0 < best_of <= max_best_of:
            raise ValidationError(
                f"`best_of` must be > 0 and <= {max_best_of} (`--max-best-of`). Given: {best_of}"
            )
        if not _any_sampling_parameter(p):
            raise ValidationError("you must use sampling when `best_of` is > 1")
        if p.seed is not None:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        return best_of

    def _sampling(self, p: GenerateParameters, best_of: int) -> SamplingParams:
        temperature = _default(p.temperature, 1.0)
        if not temperature > 0:
            raise ValidationError("`temperature` must be strictly positive")
        repetition_penalty = _default(p.repetition_penalty, 1.0)
        if not repetition_penalty > 0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        frequency_penalty = _default(p.frequency_penalty, 0.0)
        if not -2.0 <= frequency_penalty <= 2.0:
            raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        # NOTE: 1.0 is how the shard spells "disabled", but a user asking for it is an error.
        top_p = _default(p.top_p, 1.0)
        if p.top_p is not None and not 0.0 < top_p < 1.0:
            raise ValidationError("`top_p` must be > 0.0 and < 1.0")
        typical_p = _default(p.typical_p, 1.0)
        if p.typical_p is not None and not 0.0 < typical_p < 1.0:
            raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
        top_k = _default(p.top_k, 0)
        if p.top_k is not None and top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        has_warpers = temperature != 1.0 or top_k > 0 or top_p < 1.0 or typical_p < 1.0
        return SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            typical_p=typical_p,
            # As TGI's shard: any active warper means sampling; best_of needs it too.
            do_sample=p.do_sample or has_warpers or best_of > 1,
            seed=self._rng.getrandbits(64) if p.seed is None else p.seed,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
        )

    def _stop_sequences(self, p: GenerateParameters) -> tuple[str, ...]:
        max_stop_sequences = self.config.max_stop_sequences
        if len(p.stop) > max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {max_stop_sequences} stop sequences "
                f"(`--max-stop-sequences`). Given: {len(p.stop)}"
            )
        return tuple(p.stop)

    def _top_n_tokens(self, p: GenerateParameters) -> int:
        top_n_tokens = _default(p.top_n_tokens, 0)
        max_top_n_tokens = self.config.max_top_n_tokens
        if top_n_tokens and max_top_n_tokens == 0:
            raise ValidationError(
                "`top_n_tokens` != 0 is not allowed for this endpoint "
                "(the server was started with `--max-top-n-tokens 0`)"
            )
        if top_n_tokens > max_top_n_tokens:
            raise ValidationError(
                f"`top_n_tokens` must be >= 0 and <= {max_top_n_tokens} (`--max-top-n-tokens`). "
                f"Given: {top_n_tokens}"
            )
        return top_n_tokens

    def _truncate(self, p: GenerateParameters) -> int | None:
        if p.truncate is not None and not 0 < p.truncate <= self.max_input_tokens:
            raise ValidationError(
                f"`truncate` must be strictly positive and at most {self.max_input_tokens} "
                f"(`--max-input-tokens`). Given: {p.truncate}"
            )
        return p.truncate

    # -- tokens --------------------------------------------------------------------------

    def _tokenize(
        self, inputs: str, truncate: int | None, add_special_tokens: bool
    ) -> tuple[str, tuple[int, ...]]:
        """Encode; with `truncate`, keep the LAST tokens and return their text."""
        with self._tokenizer_lock:
            try:
                input_ids = self.tokenizer.encode(inputs, add_special_tokens=add_special_tokens)
            except Exception as error:  # any tokenizer failure is the input's fault
                raise ValidationError(f"tokenizer error {error}") from error
            if truncate is not None and len(input_ids) > truncate:
                input_ids = input_ids[-truncate:]
                inputs = self.tokenizer.decode(
                    input_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
                )
        if not input_ids:
            raise ValidationError("`inputs` cannot be empty")
        num_input_tokens = len(input_ids)
        if num_input_tokens > self.max_input_tokens:
            raise ValidationError(self._input_length_message(num_input_tokens))
        return inputs, tuple(input_ids)

    def _max_new_tokens(self, num_input_tokens: int, max_new_tokens: int | None) -> int:
        """Resolve an unset `max_new_tokens` and check the total against the limit."""
        if max_new_tokens is None:
            max_new_tokens = self.max_total_tokens - num_input_tokens
            if max_new_tokens < 1:
                raise ValidationError(self._total_tokens_message(num_input_tokens, 1))
        elif num_input_tokens + max_new_tokens > self.max_total_tokens:
            raise ValidationError(self._total_tokens_message(num_input_tokens, max_new_tokens))
        return max_new_tokens

    def _input_length_message(self, num_input_tokens: int) -> str:
        limit = self.max_input_tokens
        return (
            f"`inputs` must have at most {limit} tokens (`--max-input-tokens`). "
            f"Given: {num_input_tokens} tokens. Shorten the input, set `truncate` to at most "
            f"{limit} to keep only its last tokens, or restart the server with a larger "
            f"`--max-input-tokens`."
        )

    def _total_tokens_message(self, num_input_tokens: int, max_new_tokens: int) -> str:
        limit = self.max_total_tokens
        message = (
            f"`inputs` tokens + `max_new_tokens` must be <= {limit} (`--max-total-tokens`). "
            f"Given: {num_input_tokens} `inputs` tokens and {max_new_tokens} `max_new_tokens` "
            f"({num_input_tokens + max_new_tokens} in total). "
        )
        room = limit - num_input_tokens
        if room >= 1:
            return message + (
                f"Set `max_new_tokens` to at most {room}, shorten the input, or restart the "
                f"server with a larger `--max-total-tokens`."
            )
        return message + (
            "The input alone leaves no room for a new token: shorten it (or set `truncate`), "
            "or restart the server with a larger `--max-total-tokens`."
        )

    def _tokenize_without_offsets(self, inputs: str, add_special_tokens: bool) -> list[SimpleToken]:
        with self._tokenizer_lock:
            input_ids = self.tokenizer.encode(inputs, add_special_tokens=add_special_tokens)
            texts = [
                self.tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in input_ids
            ]
        tokens, start = [], 0
        for token_id, text in zip(input_ids, texts, strict=True):
            tokens.append(SimpleToken(id=token_id, text=text, start=start, stop=start + len(text)))
            start += len(text)
        return tokens


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _any_sampling_parameter(p: GenerateParameters) -> bool:
    """TGI's test for `best_of`: sampling was asked for, by `do_sample` or any warper set."""
    warpers = (p.temperature, p.top_k, p.top_p, p.typical_p)
    return p.do_sample or any(value is not None for value in warpers)
