"""Batched sampling for the requests of one batch: row i of every tensor is request i.

Upstream: `batch.py` builds a `Sampler` from the requests' `SamplingParams` and prompts, and
filters/concatenates it together with its `Batch`; `model_runner.py` calls it on the logits of
each step. Downstream: the `SampleOutput` tensors become the `Generation`s of the step.

Pipeline of one step (semantics of transformers' logits processors and warpers, which TGI uses):
repetition penalty → frequency penalty → presence penalty → logit bias → per-request logits
processors → temperature (sampling rows) → logprobs; then greedy rows take the argmax and
sampling rows apply top-k → top-p → typical-p and draw from their own seeded generator.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from tgi_server.shard.layers import cpu_kernels

# (all token ids of the request so far, logits [vocab]) -> logits [vocab]
LogitsProcessor = Callable[[Sequence[int], Tensor], Tensor]


MIN_TEMPERATURE = 1e-30


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """The sampling parameters of one request; 0 / 1.0 disable a feature (see generate.proto)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # token id -> bias added to its logit
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.typical_p <= 1:
            raise ValueError(f"typical_p must be in (0, 1], got {self.typical_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def has_penalty(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


@dataclass(slots=True)
class SampleOutput:
    next_token_ids: Tensor  # [batch] int64
    logprobs: Tensor  # [batch] float32, logprob of the chosen token
    top_token_ids: Tensor  # [batch, max_top_n] int64, most likely first
    top_logprobs: Tensor  # [batch, max_top_n] float32


def _column_if(values: list[float], neutral: float, device: torch.device) -> Tensor | None:
    """The values as a `[n, 1]` tensor, or None when every row is at the neutral value."""
    if all(v == neutral for v in values):
        return None
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # [n, 1]


def _subset(flags: list[bool], device: torch.device) -> Tensor | None:
    """Indices of the flagged rows; None when every row is flagged."""
    rows = [i for i, flag in enumerate(flags) if flag]
    return None if len(rows) == len(flags) else torch.tensor(rows, device=device)


def _on_rows(rows: Tensor | None, fn: Callable[[Tensor], Tensor], logits: Tensor) -> Tensor:
    """`fn` applied to the given rows of `logits` only (to all of them when `rows` is None)."""
    if rows is None:
        return fn(logits)
    return logits.index_copy(0, rows, fn(logits.index_select(0, rows)))


@dataclass(frozen=True, slots=True)
class _Penalties:
    """Penalty parameters of the rows with any penalty, in batch order (`token_counts` rows)."""

    rows: Tensor | None  # [num_penalized] int64 into the batch; None: every row
    repetition: Tensor | None  # [num_penalized, 1]
    frequency: Tensor | None  # [num_penalized, 1]
    presence: Tensor | None  # [num_penalized, 1]

    @classmethod
    def build(cls, params: Sequence[SamplingParams], device: torch.device) -> "_Penalties | None":
        penalized = [p for p in params if p.has_penalty]
        if not penalized:
            return None
        return cls(
            rows=_subset([p.has_penalty for p in params], device),
            repetition=_column_if([p.repetition_penalty for p in penalized], 1.0, device),
            frequency=_column_if([p.frequency_penalty for p in penalized], 0.0, device),
            presence=_column_if([p.presence_penalty for p in penalized], 0.0, device),
        )

    def apply(self, logits: Tensor, counts: Tensor) -> Tensor:
        return _on_rows(self.rows, partial(_apply_penalties, counts=counts, t=self), logits)


@dataclass(frozen=True, slots=True)
class _Warper:
    """A warper's parameter on the sampling rows that enable it; the others are not touched."""

    rows: Tensor | None  # [num_enabled] int64 into the sampling rows; None: every sampling row
    values: Tensor  # [num_enabled, 1]

    @classmethod
    def build(cls, values: list, neutral: float, dtype: torch.dtype,
              device: torch.device) -> "_Warper | None":
        enabled = [v for v in values if v != neutral]
        if not enabled:
            return None
        rows = _subset([v != neutral for v in values], device)
        return cls(rows, torch.tensor(enabled, dtype=dtype, device=device)[:, None])

    def apply(self, fn: Callable[[Tensor, Tensor], Tensor], logits: Tensor) -> Tensor:
        return _on_rows(self.rows, lambda x: fn(x, self.values), logits)


@dataclass(frozen=True, slots=True)
class _BatchParams:
    """Per-row parameters as tensors, derived from the `SamplingParams` of a batch.

    A field is None when no row of the batch needs that step, so the step is skipped.
    Warper fields cover the sampling rows only, in the order of `sample_rows`.
    """

    penalties: _Penalties | None
    bias_index: tuple[Tensor, Tensor] | None  # (rows [num_biases], token ids [num_biases])
    bias_values: Tensor | None  # [num_biases]
    temperature: Tensor | None  # [batch, 1], 1.0 on greedy rows
    sample_rows: Tensor  # [num_sampling] int64
    num_sampling: int
    top_k: _Warper | None  # int64 k
    max_top_k: int
    top_p: _Warper | None
    typical_p: _Warper | None

    @classmethod
    def build(cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device):
        sampling = [p for p in params if p.do_sample]
        rows = [i for i, p in enumerate(params) if p.do_sample]
        top_k = [min(p.top_k, vocab_size) for p in sampling]
        return cls(
            penalties=_Penalties.build(params, device),
            **_bias_tensors(params, vocab_size, device),
            # NOTE: clamped so a tiny temperature (1e-300 is 0 in float32) cannot divide by
            # zero or overflow; at 1e-30 sampling is already the argmax.
            temperature=_column_if([max(p.temperature, MIN_TEMPERATURE) if p.do_sample else 1.0
                                    for p in params],
                                   1.0, device),
            sample_rows=torch.tensor(rows, dtype=torch.int64, device=device),
            num_sampling=len(rows),
            top_k=_Warper.build(top_k, 0, torch.int64, device),
            max_top_k=max(top_k, default=0),
            top_p=_Warper.build([p.top_p for p in sampling], 1.0, torch.float32, device),
            typical_p=_Warper.build([p.typical_p for p in sampling], 1.0, torch.float32, device),
        )


def _bias_tensors(params: Sequence[SamplingParams], vocab_size: int, device: torch.device):
    rows, ids, values = [], [], []
    for row, p in enumerate(params):
        for token_id, bias in p.logit_bias.items():
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"logit_bias token id {token_id} outside [0, {vocab_size})")
            rows.append(row), ids.append(token_id), values.append(bias)
    if not rows:
        return {"bias_index": None, "bias_values": None}
    index = (torch.tensor(rows, device=device), torch.tensor(ids, device=device))
    return {"bias_index": index, "bias_values": torch.tensor(values, device=device)}


def _prompt_counts(prompts: Sequence[Sequence[int]], vocab_size: int,
                   device: torch.device) -> Tensor:
    """How often each token occurs in each prompt. Ids >= vocab_size (never sampled) are dropped."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)  # [batch]
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64)  # [num_prompt_tokens]
    rows = torch.repeat_interleave(torch.arange(len(prompts)), lengths)  # [num_prompt_tokens]
    keep = ids < vocab_size
    counts = torch.zeros(len(prompts), vocab_size, dtype=torch.int32)  # [batch, vocab]
    counts.index_put_((rows[keep], ids[keep]), torch.ones(1, dtype=torch.int32), accumulate=True)
    return counts.to(device)


def _argmax_logsumexp(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of float32 `logits` [batch, vocab]: argmax, max and log(sum(exp(x - max)))."""
    if cpu_kernels.fused(logits, multiple=1):
        return cpu_kernels.argmax_logsumexp(logits)
    maxes = logits.amax(dim=-1)  # [batch]
    return logits.argmax(dim=-1), maxes, (logits - maxes[:, None]).exp().sum(dim=-1).log()


def _make_generator(p: SamplingParams) -> torch.Generator | None:
    """Sampling rows draw from their own CPU generator, so a seed reproduces its tokens
    whatever else is in the batch; greedy rows need none."""
    if not p.do_sample:
        return None
    generator = torch.Generator()
    generator.manual_seed(p.seed)
    return generator


def _apply_penalties(logits: Tensor, counts: Tensor, t: _Penalties) -> Tensor:
    """Repetition (HF), frequency and presence (OpenAI) penalties; all [num_penalized, vocab].

    NOTE: the frequency penalty uses raw counts (OpenAI's definition); TGI's processor divides
    them by the sequence length.
    """
    seen = counts > 0
    if t.repetition is not None:
        penalized = torch.where(logits < 0, logits * t.repetition, logits / t.repetition)
        logits = torch.where(seen, penalized, logits)
    if t.frequency is not None:
        logits = logits - t.frequency * counts.to(logits.dtype)
    if t.presence is not None:
        logits = logits - t.presence * seen.to(logits.dtype)
    return logits


def _apply_top_k(logits: Tensor, top_k: Tensor, max_top_k: int) -> Tensor:
    """HF `TopKLogitsWarper` per row (ties with the k-th value are kept); k = 0 disables."""
    top_values = torch.topk(logits, max_top_k, dim=-1).values  # [n, max_top_k]
    kth = top_values.gather(1, (top_k - 1).clamp(min=0))  # [n, 1]
    kth = kth.masked_fill(top_k == 0, float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """HF `TopPLogitsWarper` per row (min_tokens_to_keep=1); top_p = 1 disables."""
    sorted_logits, sorted_ids = torch.sort(logits, descending=False)  # [n, vocab]
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [n, vocab]
    sorted_remove = cum_probs <= (1 - top_p)
    sorted_remove[:, -1] = False
    sorted_remove &= top_p < 1.0
    remove = sorted_remove.scatter(1, sorted_ids, sorted_remove)  # [n, vocab]
    return logits.masked_fill(remove, float("-inf"))


def _apply_typical_p(logits: Tensor, mass: Tensor) -> Tensor:
    """HF `TypicalLogitsWarper` per row (min_tokens_to_keep=1); typical_p = 1 disables."""
    normalized = torch.log_softmax(logits, dim=-1)  # [n, vocab]
    entropy = -(normalized * normalized.exp()).nansum(-1, keepdim=True)  # [n, 1]
    shifted = torch.abs(-normalized - entropy)  # [n, vocab]
    sorted_shifted, sorted_ids = torch.sort(shifted, descending=False)
    cum_probs = logits.gather(-1, sorted_ids).softmax(dim=-1).cumsum(dim=-1)  # [n, vocab]
    last = (cum_probs < mass).sum(dim=1, keepdim=True).clamp(max=logits.shape[-1] - 1)  # [n, 1]
    sorted_remove = sorted_shifted > sorted_shifted.gather(1, last)
    sorted_remove[:, 0] = False
    sorted_remove &= mass < 1.0
    remove = sorted_remove.scatter(1, sorted_ids, sorted_remove)  # [n, vocab]
    return logits.masked_fill(remove, float("-inf"))


def _inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Token ids drawn from `probs` [n, vocab] with one uniform in [0, 1) per row [n]."""
    cum = probs.to(torch.float64).cumsum(dim=-1)  # [n, vocab]
    total = cum[:, -1:].contiguous()  # [n, 1]
    ids = torch.searchsorted(cum, uniforms[:, None] * total, right=True)  # [n, 1]
    # NOTE: u * total may round up to total; the first index reaching total is the last token
    # with mass, so clamping there never picks a zero-probability token.
    last = torch.searchsorted(cum, total, right=False)  # [n, 1]
    return torch.minimum(ids, last)[:, 0]


@dataclass(slots=True)
class Sampler:
    """Sampling state of a batch: one row per request, in the batch's order.

    Invariants: `params`, `generators`, `processors` and `histories` have one entry per row.
    `token_counts` has one row per request with a penalty, in batch order (None when there is
    none): how often each token occurs in its prompt + generated tokens. `histories[i]` (prompt
    + generated ids) is kept only for rows with processors. `filter`/`concatenate` hand the
    generators and histories over: the source samplers must not be used afterwards.
    """

    params: list[SamplingParams]
    generators: list[torch.Generator | None]  # None on greedy rows
    processors: list[tuple[LogitsProcessor, ...]]
    histories: list[list[int] | None]
    token_counts: Tensor | None  # [num_penalized, vocab] int32
    vocab_size: int
    device: torch.device
    tensors: _BatchParams

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
        processors: Sequence[Sequence[LogitsProcessor]] | None = None,
    ) -> "Sampler":
        params = list(params)
        procs = [tuple(p) for p in processors] if processors is not None else [()] * len(params)
        if not len(params) == len(prompt_token_ids) == len(procs):
            raise ValueError("params, prompt_token_ids and processors need one entry per row")
        penalized = [ids for ids, p in zip(prompt_token_ids, params) if p.has_penalty]
        return cls(
            params=params,
            generators=[_make_generator(p) for p in params],
            processors=procs,
            histories=[list(ids) if ps else None for ids, ps in zip(prompt_token_ids, procs)],
            token_counts=_prompt_counts(penalized, vocab_size, device) if penalized else None,
            vocab_size=vocab_size,
            device=torch.device(device),
            tensors=_BatchParams.build(params, vocab_size, device),
        )

    def __len__(self) -> int:
        return len(self.params)

    def __call__(self, logits: Tensor, top_n: Sequence[int]) -> SampleOutput:
        """Choose one token per row from `logits` [batch, vocab] and record it."""
        if logits.shape != (len(self), self.vocab_size) or len(top_n) != len(self):
            raise ValueError(f"logits {tuple(logits.shape)} / top_n {len(top_n)} do not match "
                             f"a batch of {len(self)} over a vocab of {self.vocab_size}")
        logits = self.process(logits.float())  # [batch, vocab]
        # NOTE: log_softmax(x) = (x - max) - log_sum, so the logprobs of the chosen and the top
        # tokens come from their logits without a [batch, vocab] log_softmax (NOTES 33).
        greedy, maxes, log_sums = _argmax_logsumexp(logits)  # [batch] each
        next_ids = self._choose(logits, greedy)  # [batch]
        self._record(next_ids)
        max_top_n = min(max(top_n, default=0), self.vocab_size)
        chosen = (logits.gather(1, next_ids[:, None])[:, 0] - maxes) - log_sums  # [batch]
        if max_top_n == 0:  # topk(logits, 0) still costs ~20 us on CPU
            none = logits.new_empty(len(self), 0)
            return SampleOutput(next_ids, chosen, none.long(), none)
        top = torch.topk(logits, max_top_n, dim=-1)  # [batch, max_top_n], most likely first
        top_logprobs = (top.values - maxes[:, None]) - log_sums[:, None]
        return SampleOutput(next_ids, chosen, top.indices, top_logprobs)

    def process(self, logits: Tensor) -> Tensor:
        """Penalties, logit bias, processors, then temperature: the logits logprobs come from."""
        t = self.tensors
        if t.penalties is not None:
            logits = t.penalties.apply(logits, self.token_counts)
        if t.bias_index is not None:
            logits = logits.index_put(t.bias_index, t.bias_values, accumulate=True)
        logits = self._apply_processors(logits)
        if t.temperature is not None:
            logits = logits / t.temperature
        return logits  # [batch, vocab]

    def warp(self, logits: Tensor) -> Tensor:
        """Top-k → top-p → typical-p of the sampling rows of processed `logits` [batch, vocab]."""
        t = self.tensors
        if t.num_sampling < len(logits):
            logits = logits.index_select(0, t.sample_rows)  # [num_sampling, vocab]
        if t.top_k is not None:
            logits = t.top_k.apply(partial(_apply_top_k, max_top_k=t.max_top_k), logits)
        if t.top_p is not None:
            logits = t.top_p.apply(_apply_top_p, logits)
        if t.typical_p is not None:
            logits = t.typical_p.apply(_apply_typical_p, logits)
        return logits  # [num_sampling, vocab]

    def _apply_processors(self, logits: Tensor) -> Tensor:
        rows = [i for i, procs in enumerate(self.processors) if procs]
        if not rows:
            return logits
        logits = logits.clone()  # never write into the caller's tensor
        for i in rows:
            row = logits[i]  # [vocab]
            for processor in self.processors[i]:
                row = processor(self.histories[i], row)
            logits[i] = row
        return logits

    def _choose(self, logits: Tensor, greedy: Tensor) -> Tensor:
        """`greedy` [batch]: each row's argmax."""
        t = self.tensors
        if t.num_sampling == 0:
            return greedy
        probs = self.warp(logits).softmax(dim=-1)  # [num_sampling, vocab]
        # The one per-row loop: each sampling row draws from its own generator.
        uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64)
                              for g in self.generators if g is not None])  # [num_sampling]
        sampled = _inverse_cdf(probs, uniforms.to(probs.device))  # [num_sampling]
        if t.num_sampling == len(logits):
            return sampled
        return greedy.index_copy(0, t.sample_rows, sampled)  # [batch]

    def _record(self, next_ids: Tensor) -> None:
        penalties = self.tensors.penalties
        if penalties is not None:
            ids = next_ids if penalties.rows is None else next_ids[penalties.rows]
            ones = torch.ones_like(ids, dtype=torch.int32)[:, None]  # [num_penalized, 1]
            self.token_counts.scatter_add_(1, ids[:, None], ones)
        if any(h is not None for h in self.histories):
            for history, token_id in zip(self.histories, next_ids.tolist()):
                if history is not None:
                    history.append(token_id)

    def record(self, rows: Sequence[int], next_ids: Tensor) -> None:
        """Counts `next_ids` [len(rows)], chosen for `rows` by a `filter`ed copy (whose counts
        are its own), into these rows' penalty counts. Rows must have no processors."""
        if self.token_counts is None:
            return
        count_row = self._count_rows()
        pairs = [(count_row[r], t) for r, t in zip(rows, next_ids.tolist()) if r in count_row]
        if pairs:
            counts_rows, ids = zip(*pairs)
            index = (torch.tensor(counts_rows, device=self.device),
                     torch.tensor(ids, device=self.device))
            self.token_counts.index_put_(index, torch.ones(len(pairs), dtype=torch.int32,
                                                           device=self.device), accumulate=True)

    def _count_rows(self) -> dict[int, int]:
        """Batch row -> its `token_counts` row, for the rows with a penalty."""
        penalized = (i for i, p in enumerate(self.params) if p.has_penalty)
        return {row: k for k, row in enumerate(penalized)}

    def filter(self, indices: Sequence[int]) -> "Sampler":
        """Keep these rows, in this order."""
        indices = list(indices)
        params = [self.params[i] for i in indices]
        count_row = self._count_rows()
        kept = [count_row[i] for i in indices if i in count_row]
        counts = self.token_counts[torch.tensor(kept, device=self.device)] if kept else None
        return Sampler(
            params=params,
            generators=[self.generators[i] for i in indices],
            processors=[self.processors[i] for i in indices],
            histories=[self.histories[i] for i in indices],
            token_counts=counts,
            vocab_size=self.vocab_size,
            device=self.device,
            tensors=_BatchParams.build(params, self.vocab_size, self.device),
        )

    @classmethod
    def concatenate(cls, samplers: Sequence["Sampler"]) -> "Sampler":
        if not samplers:
            raise ValueError("nothing to concatenate")
        first = samplers[0]
        if any(s.vocab_size != first.vocab_size or s.device != first.device for s in samplers):
            raise ValueError("samplers of different vocab sizes or devices")
        params = [p for s in samplers for p in s.params]
        counts = [s.token_counts for s in samplers if s.token_counts is not None]
        return cls(
            params=params,
            generators=[g for s in samplers for g in s.generators],
            processors=[p for s in samplers for p in s.processors],
            histories=[h for s in samplers for h in s.histories],
            token_counts=torch.cat(counts) if counts else None,  # [num_penalized, vocab]
            vocab_size=first.vocab_size,
            device=first.device,
            tensors=_BatchParams.build(params, first.vocab_size, first.device),
        )
