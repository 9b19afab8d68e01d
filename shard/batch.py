"""The shard's state of one cached batch, as a struct of arrays.

Upstream: `server.py` builds a `Batch` from a Prefill request (`from_pb`) and keeps it by id;
Decode concatenates cached batches, FilterBatch filters them. Downstream: `model_runner.py`
reads the arrays to build the step's inputs and appends the sampled tokens.

Row i of every list, and of the sampler, is request i. A request's KV lives in the blocks of
`block_tables[i]`, allocated by the router for `num_prompt_tokens + max_new_tokens` tokens.
"""

from dataclasses import dataclass, field

import torch

from tgi_server.proto import generate_pb2 as pb
from tgi_server.shard.sampling import Sampler, SamplingParams
from tgi_server.shard.speculation import NgramDrafter


@dataclass(slots=True)
class Batch:
    batch_id: int
    request_ids: list[int]
    # Prompt + generated tokens of each request.
    token_ids: list[list[int]]
    num_prompt_tokens: list[int]
    # Tokens whose k/v are already in the cache (prefix-cached prompt tokens before prefill).
    num_computed_tokens: list[int]
    block_tables: list[list[int]]
    max_new_tokens: list[int]
    ignore_eos: list[bool]
    top_n_tokens: list[int]
    prefill_logprobs: list[bool]
    sampler: Sampler
    # Per request: its n-gram drafter (None: it never drafts, e.g. in warmup batches).
    drafters: list[NgramDrafter | None]
    # Requests that finished on the shard (length / eos), waiting for the router's FilterBatch.
    finished: set[int] = field(default_factory=set)
    # Requests of a Prefill whose chunk (`Request.chunk_len`) ends before their prompt does.
    chunked: set[int] = field(default_factory=set)

    @classmethod
    def from_pb(cls, batch: pb.Batch, vocab_size: int, device: torch.device) -> "Batch":
        """The batch of a Prefill; a request whose `chunk_len` stops short of its prompt's end
        holds the prompt up to there (`chunked` says which: its token is not one to keep)."""
        requests = list(batch.requests)
        params = [sampling_params_from_pb(r.sampling) for r in requests]
        prompts = [list(r.input_ids[:r.cache_len + r.chunk_len] if r.chunk_len else r.input_ids)
                   for r in requests]
        return cls(
            batch_id=batch.id,
            request_ids=[r.id for r in requests],
            token_ids=prompts,
            num_prompt_tokens=[len(p) for p in prompts],
            num_computed_tokens=[r.cache_len for r in requests],
            block_tables=[list(r.block_ids) for r in requests],
            max_new_tokens=[r.stopping.max_new_tokens for r in requests],
            ignore_eos=[r.stopping.ignore_eos_token for r in requests],
            top_n_tokens=[r.top_n_tokens for r in requests],
            prefill_logprobs=[r.prefill_logprobs for r in requests],
            sampler=Sampler.build(params, prompts, vocab_size, device),
            drafters=[NgramDrafter() for _ in params],
            chunked={r.id for r, p in zip(requests, prompts) if len(p) < len(r.input_ids)},
        )

    @classmethod
    def of_prompts(cls, batch_id: int, prompts: list[list[int]], block_tables: list[list[int]],
                   max_new_tokens: int, vocab_size: int, device: torch.device,
                   prefill_logprobs: list[bool] | None = None) -> "Batch":
        """Fresh prompts with default sampling (greedy), to their length, that never draft:
        the warmup's profiling prefill and the benchmarks' batches (request ids 0..n-1)."""
        n = len(prompts)
        return cls(
            batch_id=batch_id, request_ids=list(range(n)), token_ids=prompts,
            num_prompt_tokens=[len(p) for p in prompts], num_computed_tokens=[0] * n,
            block_tables=block_tables, max_new_tokens=[max_new_tokens] * n,
            ignore_eos=[True] * n, top_n_tokens=[0] * n,
            prefill_logprobs=prefill_logprobs or [False] * n,
            sampler=Sampler.build([SamplingParams()] * n, prompts, vocab_size, device),
            drafters=[None] * n,
        )

    def __len__(self) -> int:
        return len(self.request_ids)

    def num_generated_tokens(self, i: int) -> int:
        return len(self.token_ids[i]) - self.num_prompt_tokens[i]

    @property
    def max_tokens(self) -> int:
        """Tokens reserved in the KV cache by this batch's requests."""
        return sum(p + n for p, n in zip(self.num_prompt_tokens, self.max_new_tokens))

    @property
    def current_tokens(self) -> int:
        return sum(self.num_computed_tokens)

    def filter(self, request_ids: list[int]) -> "Batch":
        """Keep only `request_ids` (in their current order); unknown ids are ignored."""
        keep = set(request_ids)
        rows = [i for i, rid in enumerate(self.request_ids) if rid in keep]

        def pick(values: list) -> list:
            return [values[i] for i in rows]

        return Batch(
            batch_id=self.batch_id,
            request_ids=pick(self.request_ids),
            token_ids=pick(self.token_ids),
            num_prompt_tokens=pick(self.num_prompt_tokens),
            num_computed_tokens=pick(self.num_computed_tokens),
            block_tables=pick(self.block_tables),
            max_new_tokens=pick(self.max_new_tokens),
            ignore_eos=pick(self.ignore_eos),
            top_n_tokens=pick(self.top_n_tokens),
            prefill_logprobs=pick(self.prefill_logprobs),
            sampler=self.sampler.filter(rows),
            drafters=pick(self.drafters),
            finished=self.finished & keep,
        )

    @classmethod
    def concatenate(cls, batches: list["Batch"]) -> "Batch":
        """One batch holding the requests of `batches` in order; it takes the first one's id."""
        if len(batches) == 1:
            return batches[0]

        def cat(name: str) -> list:
            return [v for b in batches for v in getattr(b, name)]

        return Batch(
            batch_id=batches[0].batch_id,
            request_ids=cat("request_ids"),
            token_ids=cat("token_ids"),
            num_prompt_tokens=cat("num_prompt_tokens"),
            num_computed_tokens=cat("num_computed_tokens"),
            block_tables=cat("block_tables"),
            max_new_tokens=cat("max_new_tokens"),
            ignore_eos=cat("ignore_eos"),
            top_n_tokens=cat("top_n_tokens"),
            prefill_logprobs=cat("prefill_logprobs"),
            sampler=Sampler.concatenate([b.sampler for b in batches]),
            drafters=cat("drafters"),
            finished=set().union(*(b.finished for b in batches)),
        )

    def to_pb(self) -> pb.CachedBatch:
        return pb.CachedBatch(
            id=self.batch_id,
            request_ids=self.request_ids,
            size=len(self),
            max_tokens=self.max_tokens,
            current_tokens=self.current_tokens,
        )


def sampling_params_from_pb(p: pb.SamplingParameters) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature or 1.0,
        top_k=p.top_k,
        top_p=p.top_p or 1.0,
        typical_p=p.typical_p or 1.0,
        do_sample=p.do_sample,
        seed=p.seed,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        logit_bias=dict(p.logit_bias),
    )
