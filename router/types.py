"""Internal request types of the router, after validation.

Upstream: `validation.py` builds a `ValidRequest` from a `protocol.GenerateParameters`.
Downstream: `queue.py` (budgets and block allocation), `batcher.py` / `client.py` (converted
to the shard's `Request` proto: `SamplingParams` mirrors `SamplingParameters`,
`StoppingParams` mirrors `StoppingParameters` plus the stop sequences the router applies).
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType


class FinishReason(str, Enum):
    """Why a request stopped generating; the values are TGI's JSON strings."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Resolved sampling parameters. 0 / 1.0 mean "disabled", as in the shard's proto."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    # False: greedy. Validation sets it when any warper is active (TGI's shard does the same).
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # token id -> bias added to its logit; read-only by default.
    logit_bias: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class StoppingParams:
    """When to stop: the shard applies max_new_tokens and eos, the router the stop sequences."""

    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos_token: bool = False


@dataclass(frozen=True, slots=True)
class ValidRequest:
    """A request that passed validation: tokenized, truncated, every default resolved."""

    # The prompt as text, after truncation (the decoded kept tokens when truncated).
    inputs: str
    input_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StoppingParams
    top_n_tokens: int
    details: bool
    decoder_input_details: bool
    return_full_text: bool
    best_of: int
    stream: bool

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def max_num_tokens(self) -> int:
        """KV tokens this request may occupy: its prompt plus every token it may generate."""
        return len(self.input_ids) + self.stopping.max_new_tokens
