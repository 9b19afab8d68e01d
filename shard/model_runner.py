"""One forward step of a batch: inputs → model → logits → sampling → per-request outputs.

Upstream: `server.py` calls `prefill`/`decode` with a `Batch` (`batch.py`) and `warmup` once.
Downstream: the model (`models/`) reads the `AttentionMetadata` installed by
`forward_context`; `sampling.py` picks the tokens. Results go back as `StepOutput`s, which
`server.py` turns into protobuf.
"""

import logging
import math
from dataclasses import dataclass

import torch

from tgi_server.proto import generate_pb2 as pb
from tgi_server.shard.attention import AttentionMetadata, forward_context
from tgi_server.shard.batch import Batch
from tgi_server.shard.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block
from tgi_server.shard.sampling import SampleOutput
from tgi_server.shard.speculation import draft_lengths

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepOutput:
    request_id: int
    # The step's tokens: one, or several when speculated drafts were accepted (speculation.py).
    token_ids: list[int]
    logprobs: list[float]
    # The top_n_tokens alternatives of each of those tokens, most likely first.
    top_token_ids: list[list[int]]
    top_logprobs: list[list[float]]
    finish_reason: int  # pb.FinishReason
    # Draft tokens the step verified for this request (speculation).
    drafted: int = 0
    # Prompt tokens and their logprobs (the first is NaN), when prefill_logprobs was asked.
    prefill_token_ids: list[int] | None = None
    prefill_logprobs: list[float] | None = None


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    # Row of each sequence's last token in the packed token dimension.
    last_token_rows: torch.Tensor  # [batch] int64


class NotEnoughMemoryError(RuntimeError):
    pass


class ModelRunner:
    def __init__(self, model, device: torch.device, dtype: torch.dtype, block_size: int,
                 speculate: int = 0):
        self.model = model
        # Draft tokens a decode step may verify per request (`--speculate`; 0: none).
        self.speculate = speculate
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.vocab_size = model.config.vocab_size
        self.eos_token_ids = set(model.eos_token_ids)
        self.num_blocks = 0
        self.kv_cache: torch.Tensor | None = None

    # ---- inputs -----------------------------------------------------------------------

    def _slot_mapping(self, block_tables: torch.Tensor, seq_idx: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        block_ids = block_tables[seq_idx, positions // self.block_size]  # [num_tokens]
        return block_ids * self.block_size + positions % self.block_size

    def _block_tables(self, batch: Batch) -> torch.Tensor:
        width = max(len(t) for t in batch.block_tables)
        rows = [t + [0] * (width - len(t)) for t in batch.block_tables]
        return torch.tensor(rows, dtype=torch.int64, device=self.device)  # [batch, max_blocks]

    def _inputs(self, batch: Batch, starts: list[int], ends: list[int],
                tokens: list[list[int]] | None = None, prefill: bool = False) -> StepInputs:
        """Inputs for positions [starts[i], ends[i]) of each request i (ends = context lengths):
        its own tokens there, or `tokens[i]` (a decode step's last token and its drafts)."""
        query_lens = [e - s for s, e in zip(starts, ends)]
        if tokens is None:
            tokens = [ids[s:e] for ids, s, e in zip(batch.token_ids, starts, ends)]
        token_ids = [t for row in tokens for t in row]
        dev = self.device
        if all(n == 1 for n in query_lens):
            # NOTE: decode, one token per sequence: the general gathers below cost ~0.2 ms a
            # step on CPU at any batch size, as much as the rest of the inputs together.
            seq_idx = torch.arange(len(batch), device=dev)
            cu_seqlens_q = torch.arange(len(batch) + 1, device=dev)
            positions = torch.tensor(starts, dtype=torch.int64, device=dev)
        else:
            q_lens = torch.tensor(query_lens, dtype=torch.int64, device=dev)
            cu_seqlens_q = torch.zeros(len(batch) + 1, dtype=torch.int64, device=dev)
            torch.cumsum(q_lens, 0, out=cu_seqlens_q[1:])
            seq_idx = torch.repeat_interleave(torch.arange(len(batch), device=dev), q_lens)
            starts_t = torch.tensor(starts, dtype=torch.int64, device=dev)
            # position of each token = its sequence's start + its offset in the query
            positions = (starts_t[seq_idx] + torch.arange(len(token_ids), device=dev)
                         - cu_seqlens_q[seq_idx])
        block_tables = self._block_tables(batch)
        meta = AttentionMetadata(
            slot_mapping=self._slot_mapping(block_tables, seq_idx, positions),
            cu_seqlens_q=cu_seqlens_q,
            context_lens=torch.tensor(ends, dtype=torch.int64, device=dev),
            block_tables=block_tables,
            max_query_len=max(query_lens),
            max_context_len=max(ends),
            fresh=not any(starts),
            prefill=prefill,
        )
        return StepInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.int64, device=dev),
            positions=positions,
            meta=meta,
            last_token_rows=cu_seqlens_q[1:] - 1,
        )

    def prepare_prefill(self, batch: Batch) -> StepInputs:
        return self._inputs(batch, batch.num_computed_tokens, [len(t) for t in batch.token_ids],
                            prefill=True)

    def prepare_decode(self, batch: Batch) -> StepInputs:
        ends = [len(t) for t in batch.token_ids]
        return self._inputs(batch, [e - 1 for e in ends], ends)

    # ---- steps ------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, batch: Batch) -> list[StepOutput]:
        return self._step(batch, self.prepare_prefill(batch), is_prefill=True)

    @torch.inference_mode()
    def decode(self, batch: Batch) -> list[StepOutput]:
        drafts = self._drafts(batch)
        if drafts is None:
            return self._step(batch, self.prepare_decode(batch), is_prefill=False)
        ends = [len(t) for t in batch.token_ids]
        inputs = self._inputs(batch, [e - 1 for e in ends],
                              [e + len(d) for e, d in zip(ends, drafts)],
                              [[ids[-1], *d] for ids, d in zip(batch.token_ids, drafts)])
        return self._step(batch, inputs, is_prefill=False, drafts=drafts)

    def _drafts(self, batch: Batch) -> list[list[int]] | None:
        """Each request's draft tokens for this step; None when no request has any."""
        if not self.speculate or not any(batch.drafters):
            return None
        remaining = [m - batch.num_generated_tokens(i) for i, m in enumerate(batch.max_new_tokens)]
        lengths = draft_lengths(self.speculate, self.device.type, len(batch), remaining)
        # NOTE: a row with logits processors (their history would miss the accepted drafts)
        # does not draft.
        drafts = [drafter.propose(ids, k) if drafter is not None and k > 0 and not procs else []
                  for drafter, ids, k, procs in zip(batch.drafters, batch.token_ids, lengths,
                                                    batch.sampler.processors)]
        return drafts if any(drafts) else None

    def _step(self, batch: Batch, inputs: StepInputs, is_prefill: bool,
              drafts: list[list[int]] | None = None) -> list[StepOutput]:
        # A prompt's step needs the logits of each sequence's last row only, unless its
        # prompt's logprobs are asked for (then every row, as for drafts).
        rows = None
        if drafts is None and inputs.meta.max_query_len > 1 and not any(batch.prefill_logprobs):
            rows = inputs.last_token_rows
        with forward_context(inputs.meta):
            # [num_tokens, hidden], or [batch, hidden] given the rows
            hidden = self.model(inputs.input_ids, inputs.positions, rows)
        if drafts is None:
            # one token per sequence (a decode step) or the rows asked for: the last ones
            one_each = hidden.shape[0] == len(batch)
            last = hidden if one_each else hidden[inputs.last_token_rows]
            logits = self.model.compute_logits(last)  # [batch, vocab]
            candidates = _rows(batch.sampler(logits, batch.top_n_tokens), batch.top_n_tokens)
            candidates = [[c] for c in candidates]
        else:
            candidates = self._verify(batch, inputs, hidden, drafts)
        prompt_logprobs = self._prompt_logprobs(batch, inputs, hidden) if is_prefill else {}
        outputs = []
        for i, chosen in enumerate(candidates):
            out = StepOutput(batch.request_ids[i], [], [], [], [], pb.FINISH_REASON_NONE,
                             drafted=len(drafts[i]) if drafts else 0)
            # `chosen`: the step's token, then (`_verify`) the choice after each draft that
            # was the model's own choice before it, up to the first that was not
            for token_id, logprob, top_ids, top_lps in chosen:
                batch.token_ids[i].append(token_id)
                out.token_ids.append(token_id)
                out.logprobs.append(logprob)
                out.top_token_ids.append(top_ids)
                out.top_logprobs.append(top_lps)
                out.finish_reason = self._finish_reason(batch, i, token_id)
                if out.finish_reason != pb.FINISH_REASON_NONE:
                    batch.finished.add(out.request_id)
                    break
            # k/v is cached for every token but the newest (rejected drafts' slots are
            # overwritten by the next step)
            batch.num_computed_tokens[i] = len(batch.token_ids[i]) - 1
            if i in prompt_logprobs:
                out.prefill_token_ids = batch.token_ids[i][: batch.num_prompt_tokens[i]]
                out.prefill_logprobs = prompt_logprobs[i]
            outputs.append(out)
        return outputs

    def _verify(self, batch: Batch, inputs: StepInputs, hidden: torch.Tensor,
                drafts: list[list[int]]) -> list[list[tuple]]:
        """The model's choices along each request's drafts while they hold: after its last
        token, then after draft j for as long as every draft up to j was the choice (then
        the context of draft j's row is the real sequence)."""
        logits = self.model.compute_logits(hidden)  # [num_tokens, vocab]
        cu = inputs.meta.cu_seqlens_q.tolist()
        top_n = batch.top_n_tokens
        chosen = [[c] for c in _rows(batch.sampler(logits[cu[:-1]], top_n), top_n)]
        # NOTE: one choice per position, through the batch's sampler for the requests still on
        # their drafts: a sampling row draws from its seeded generator once per token it
        # yields, and a penalized row's counts hold every token before the position, as
        # without drafts, so the tokens are the same either way. (A filtered copy counts into
        # copies of the counts: `record` writes its choices back. Drafting rows have no
        # processors, `_drafts`.)
        live = [i for i, d in enumerate(drafts) if d and chosen[i][0][0] == d[0]]
        j = 1
        while live:
            live_top_n = [top_n[i] for i in live]
            sample = batch.sampler.filter(live)(logits[[cu[i] + j for i in live]], live_top_n)
            batch.sampler.record(live, sample.next_token_ids)
            for i, c in zip(live, _rows(sample, live_top_n)):
                chosen[i].append(c)
            live = [i for i in live if j < len(drafts[i]) and chosen[i][j][0] == drafts[i][j]]
            j += 1
        return chosen

    def _finish_reason(self, batch: Batch, i: int, token_id: int) -> int:
        if token_id in self.eos_token_ids and not batch.ignore_eos[i]:
            return pb.FINISH_REASON_EOS_TOKEN
        if batch.num_generated_tokens(i) >= batch.max_new_tokens[i]:
            return pb.FINISH_REASON_LENGTH
        return pb.FINISH_REASON_NONE

    def _prompt_logprobs(self, batch: Batch, inputs: StepInputs,
                         hidden: torch.Tensor) -> dict[int, list[float]]:
        """Logprob of each prompt token given the ones before it (NaN for the first)."""
        result = {}
        cu = inputs.meta.cu_seqlens_q.tolist()
        for i, wanted in enumerate(batch.prefill_logprobs):
            if not wanted:
                continue
            start, end = cu[i], cu[i + 1]
            logits = self.model.compute_logits(hidden[start : end - 1])  # [q_len - 1, vocab]
            targets = inputs.input_ids[start + 1 : end]
            lps = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
            # NOTE: prefix-cached tokens have no logits; they are reported as NaN.
            cached = batch.num_computed_tokens[i]
            result[i] = [math.nan] * (cached + 1) + lps.tolist()
        return result

    # ---- warmup and KV sizing ---------------------------------------------------------

    @torch.inference_mode()
    def warmup(self, max_input_tokens: int, max_prefill_tokens: int,
               max_batch_total_tokens: int, memory_fraction: float, world_size: int) -> int:
        """Run the largest prefill the router will send, then allocate the KV cache.

        Returns the number of KV blocks allocated. `max_batch_total_tokens` > 0 caps the cache;
        otherwise it is sized from the memory left after the warmup prefill.
        """
        self._profile_prefill(max_input_tokens, max_prefill_tokens)
        per_block = kv_cache_bytes_per_block(self.model, self.block_size, self.dtype)
        budget = int(available_memory_bytes(self.device) * memory_fraction / max(world_size, 1))
        fits = budget // per_block
        wanted = math.ceil(max_batch_total_tokens / self.block_size) if max_batch_total_tokens else fits
        if wanted > fits:
            raise NotEnoughMemoryError(
                f"Not enough memory for a KV cache of {max_batch_total_tokens} tokens: "
                f"{wanted} blocks of {per_block} bytes are needed but only {fits} fit in "
                f"{budget / 2**30:.2f} GiB (memory fraction {memory_fraction}); lower "
                f"--max-batch-total-tokens or raise --memory-fraction"
            )
        min_blocks = math.ceil(max_input_tokens / self.block_size) + 1
        if wanted < min_blocks:
            raise NotEnoughMemoryError(
                f"Not enough memory for one request of {max_input_tokens} input tokens: "
                f"{wanted} KV blocks fit, {min_blocks} are needed; lower --max-input-tokens"
            )
        self.kv_cache = None
        self.kv_cache = allocate_kv_cache(self.model, wanted, self.block_size, self.dtype, self.device)
        self.num_blocks = wanted
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", wanted, self.block_size,
                    wanted * per_block / 2**20)
        return wanted

    def _profile_prefill(self, max_input_tokens: int, max_prefill_tokens: int) -> None:
        """A prefill of `max_prefill_tokens` tokens in prompts of at most `max_input_tokens`."""
        lengths = [max_input_tokens] * (max_prefill_tokens // max_input_tokens)
        if max_prefill_tokens % max_input_tokens:
            lengths.append(max_prefill_tokens % max_input_tokens)
        blocks = [math.ceil((n + 1) / self.block_size) for n in lengths]
        self.kv_cache = allocate_kv_cache(self.model, sum(blocks), self.block_size, self.dtype,
                                          self.device)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, self.vocab_size, (n,), generator=gen).tolist() for n in lengths]
        first = [0] + [sum(blocks[:i + 1]) for i in range(len(blocks))]
        tables = [list(range(first[i], first[i + 1])) for i in range(len(lengths))]
        self.prefill(Batch.of_prompts(0, prompts, tables, 1, self.vocab_size, self.device))


def _rows(sample: SampleOutput, top_n: list[int]) -> list[tuple]:
    """Per row: (token id, logprob, top_n ids, top_n logprobs) as Python values."""
    top_ids, top_lps = sample.top_token_ids.tolist(), sample.top_logprobs.tolist()
    return [(token_id, logprob, top_ids[i][:top_n[i]], top_lps[i][:top_n[i]])
            for i, (token_id, logprob) in enumerate(zip(sample.next_token_ids.tolist(),
                                                        sample.logprobs.tolist()))]


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")
