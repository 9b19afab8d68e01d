"""Paged attention: the per-step metadata, the forward context that carries it, the kernel choice.

Upstream: `model_runner.py` builds an `AttentionMetadata` for each prefill/decode step and
runs the model inside `forward_context(meta)`; `kv_cache.py` binds each `Attention` module's
`k_cache`/`v_cache` views. Downstream: the attention kernels. This is the only module that
chooses a kernel backend: torch SDPA everywhere, flash-attn on CUDA when it is installed and
the block size allows it, and on CPU the decode kernel of `layers/cpu_kernels.py` when built
(for decode steps, and for prefills of short contexts, one query row at a time).

Layout: the tokens of all sequences are packed along one dimension; the new tokens of sequence
i are rows `cu_seqlens_q[i]:cu_seqlens_q[i + 1]` and sit at the END of its context (positions
`context_lens[i] - query_len_i ... context_lens[i] - 1`), so a prompt whose prefix is already
cached is a causal query with an offset. Token j of sequence i lives in KV slot
`block_tables[i, j // block_size] * block_size + j % block_size`.
"""

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tgi_server.shard.layers import cpu_kernels


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: Tensor  # [num_tokens] int64: KV slot where each new token's k/v are written
    cu_seqlens_q: Tensor  # [batch + 1] int64: new tokens of sequence i are rows cu[i]:cu[i+1]
    context_lens: Tensor  # [batch] int64: tokens of sequence i in the cache after this step
    block_tables: Tensor  # [batch, max_num_blocks] int64, padded with 0
    max_query_len: int
    max_context_len: int
    # Every sequence's queries start at position 0 (a prefill with no cached prefix): the
    # mask is plain causality, which SDPA can apply without reading a mask.
    fresh: bool = False
    # A prefill: the rows are prompt tokens, after any cached prefix (not a decode step's).
    prefill: bool = False

    @classmethod
    def from_lists(
        cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
        block_size: int, device: torch.device | str = "cpu",
    ) -> "AttentionMetadata":
        """Builds the tensors from per-sequence Python lists (block_tables[i]: block ids of i)."""
        slots = [
            table[pos // block_size] * block_size + pos % block_size
            for q_len, ctx_len, table in zip(query_lens, context_lens, block_tables)
            for pos in range(ctx_len - q_len, ctx_len)
        ]
        cu_seqlens_q = [0]
        for q_len in query_lens:
            cu_seqlens_q.append(cu_seqlens_q[-1] + q_len)
        width = max(len(table) for table in block_tables)
        padded = [table + [0] * (width - len(table)) for table in block_tables]

        def tensor(values: list) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(
            slot_mapping=tensor(slots), cu_seqlens_q=tensor(cu_seqlens_q),
            context_lens=tensor(context_lens), block_tables=tensor(padded),
            max_query_len=max(query_lens), max_context_len=max(context_lens),
            fresh=query_lens == context_lens,
        )


_CONTEXT: AttentionMetadata | None = None


@contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    """Installs `meta` for the duration of one model forward; nesting is an error."""
    global _CONTEXT
    if _CONTEXT is not None:
        raise RuntimeError("forward_context() does not nest: a forward is already running")
    _CONTEXT = meta
    try:
        yield meta
    finally:
        _CONTEXT = None


def get_forward_context() -> AttentionMetadata:
    if _CONTEXT is None:
        raise RuntimeError("no forward_context() is active: the model needs AttentionMetadata")
    return _CONTEXT


def _token_coords(cu_seqlens_q: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """(sequence index, row within its query) of every packed token, without host syncs."""
    query_lens = cu_seqlens_q.diff()  # [batch]
    batch_ids = torch.arange(query_lens.shape[0], device=query_lens.device)
    seq_ids = torch.repeat_interleave(batch_ids, query_lens, output_size=num_tokens)  # [num_tokens]
    rows = torch.arange(num_tokens, device=query_lens.device) - cu_seqlens_q[seq_ids]
    return seq_ids, rows


def _pad(x: Tensor, coords: tuple[Tensor, Tensor], batch: int, max_len: int) -> Tensor:
    padded = x.new_zeros(batch, max_len, *x.shape[1:])  # [batch, max_len, heads, head_dim]
    padded[coords] = x
    return padded


def _sdpa_padded(
    q: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata, context_lens: Tensor,
    scale: float, sliding_window: int | None,
) -> Tensor:
    """Masked SDPA of packed queries over padded per-sequence keys.

    q [num_tokens, heads, D]; k/v [batch, max_context, kv_heads, D] -> [num_tokens, heads, D].
    """
    num_tokens, batch = q.shape[0], context_lens.shape[0]
    is_decode = meta.max_query_len == 1  # every sequence has exactly one new token
    # NOTE: right padding is harmless under causality: only padded (discarded) query rows
    # see the padded keys. With no cached prefix and no window, is_causal stands for the mask
    # and lets SDPA skip the blocks above the diagonal (half the work of a long prompt),
    # where a boolean mask makes it compute and then mask them.
    causal_only = meta.fresh and sliding_window is None and not is_decode
    mask = None if causal_only else _mask(meta, context_lens, k.shape[1], sliding_window)
    if is_decode:
        return _sdpa_decode(q, k, v, mask, scale)
    coords = _token_coords(meta.cu_seqlens_q, num_tokens)
    q_pad = _pad(q, coords, batch, meta.max_query_len)  # [batch, max_query, heads, D]
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=None if mask is None else mask.unsqueeze(1), is_causal=causal_only,
        scale=scale, enable_gqa=True,
    )
    return out.transpose(1, 2)[coords]  # [batch, max_query, heads, D] -> [tokens, heads, D]


def _mask(meta: AttentionMetadata, context_lens: Tensor, max_context: int,
          sliding_window: int | None) -> Tensor:
    """[batch, max_query, max_context]: which keys each (padded) query row may see."""
    device = context_lens.device
    query_start = context_lens - meta.cu_seqlens_q.diff()  # [batch] position of the first new token
    rows = torch.arange(meta.max_query_len, device=device)
    q_pos = query_start[:, None] + rows  # [batch, max_query] absolute position of each query row
    k_pos = torch.arange(max_context, device=device)  # [max_context]
    # NOTE: keys past a sequence's context are masked by causality alone; only the padded
    # query rows (discarded by the caller) can see them.
    mask = k_pos <= q_pos[..., None]
    if sliding_window is not None:
        mask &= k_pos > q_pos[..., None] - sliding_window
    return mask


def _sdpa_decode(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """One new token per sequence: the heads that share a KV head become that KV head's query
    rows, so SDPA sees `group` queries per KV head and no head is repeated.

    q [batch, heads, D]; k/v [batch, max_context, kv_heads, D]; mask [batch, 1, max_context].
    """
    # NOTE: 5-10x faster than enable_gqa with one query row on CPU (bfloat16 most of all).
    batch, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q_grouped = q.view(batch, kv_heads, heads // kv_heads, head_dim)  # head h uses kv h // group
    out = F.scaled_dot_product_attention(
        q_grouped, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.unsqueeze(1), scale=scale,
    )  # [batch, kv_heads, group, D]
    return out.reshape(batch, heads, head_dim)


def _gather_blocks(cache: Tensor, table: Tensor, num_tokens: int) -> Tensor:
    """Each sequence's blocks, in order: cache [num_blocks, block_size, kv_heads, D] and table
    [batch, num_blocks] -> [batch, num_tokens, kv_heads, D]."""
    # NOTE: index_select of whole blocks as rows of bytes: a plain memcpy per block. On float32
    # rows it copies each through BLAS (~3x slower at batch 32), on the 4-d cache or with
    # advanced indexing (cache[table]) element by element (~4x slower).
    rows = cache.view(cache.shape[0], -1).view(torch.uint8)  # [num_blocks, block bytes]
    blocks = rows.index_select(0, table.flatten()).view(cache.dtype)  # [batch * blocks, -1]
    return blocks.view(table.shape[0], -1, *cache.shape[2:])[:, :num_tokens]


def _torch_paged_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float,
    sliding_window: int | None,
) -> Tensor:
    block_size = k_cache.shape[1]
    num_blocks = -(-meta.max_context_len // block_size)
    table = meta.block_tables[:, :num_blocks]  # [batch, num_blocks]
    k = _gather_blocks(k_cache, table, meta.max_context_len)  # [batch, max_context, kv_heads, D]
    v = _gather_blocks(v_cache, table, meta.max_context_len)
    return _sdpa_padded(q, k, v, meta, meta.context_lens, scale, sliding_window)


def _store_kernel_takes(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether fused_ops.cpp's store_kv_ writes this step's k/v: rows of kv_heads * D contiguous
    values in the caches' dtype (a view of the fused qkv output is fine), contiguous caches."""
    rows = all(t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] for t in (k, v))
    return (rows and k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and cpu_kernels.fused(k, multiple=1))


def _torch_fresh_attention(
    q: Tensor, k: Tensor, v: Tensor, meta: AttentionMetadata, scale: float,
    sliding_window: int | None,
) -> Tensor:
    """Prefill with no cache bound (the profiling run): each query attends over its own k/v."""
    batch = meta.cu_seqlens_q.shape[0] - 1
    coords = _token_coords(meta.cu_seqlens_q, q.shape[0])
    k_pad = _pad(k, coords, batch, meta.max_query_len)  # [batch, max_query, kv_heads, D]
    v_pad = _pad(v, coords, batch, meta.max_query_len)
    return _sdpa_padded(q, k_pad, v_pad, meta, meta.cu_seqlens_q.diff(), scale, sliding_window)


@functools.cache
def _flash_attn_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _use_flash(k_cache: Tensor) -> bool:
    # NOTE: flash-attn 2's paged KV needs blocks of a multiple of 256 tokens; smaller blocks
    # (the default 16) run the torch path on CUDA too.
    return k_cache.is_cuda and k_cache.shape[1] % 256 == 0 and _flash_attn_installed()


def _use_cpu_kernels(q: Tensor, head_dim: int) -> bool:
    # NOTE: they read each sequence's blocks in place instead of gathering them per layer:
    # decode_attention for steps that continue cached sequences, prefill_attention for fresh
    # prompts (it transposes a sequence's keys once for all its rows: 0.42-0.88x the time of
    # those rows through the decode kernel, which was itself 0.65-0.75x SDPA's flash kernel
    # over gathered blocks at 128-512 tokens; benchmarks/NOTES.md 41, 54).
    return (q.device.type == "cpu" and head_dim % 16 == 0 and head_dim <= 256
            and cpu_kernels.available(q.dtype))


def rows_as_decode(meta: AttentionMetadata, num_tokens: int) -> tuple[Tensor, Tensor]:
    """(block table, context length) of every query row taken as its own one-token query: row
    j of sequence i sees its sequence's tokens up to and including its own position."""
    if meta.max_query_len == 1:
        return meta.block_tables, meta.context_lens
    seq_ids, rows = _token_coords(meta.cu_seqlens_q, num_tokens)
    query_start = meta.context_lens - meta.cu_seqlens_q.diff()  # position of each first new token
    return meta.block_tables[seq_ids], query_start[seq_ids] + rows + 1


def _rows_as_queries(meta: AttentionMetadata, rows: Tensor, num_tokens: int) -> AttentionMetadata:
    """The metadata of a step whose queries are the given rows of `meta`'s, each a one-token
    query over its sequence up to its own position (their k/v already stored)."""
    tables, lens = rows_as_decode(meta, num_tokens)
    lens = lens[rows]
    return AttentionMetadata(
        slot_mapping=meta.slot_mapping[rows],
        cu_seqlens_q=torch.arange(rows.shape[0] + 1, device=rows.device),
        context_lens=lens, block_tables=tables[rows], max_query_len=1,
        max_context_len=meta.max_context_len,
    )


def _flash_paged_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float,
    sliding_window: int | None,
) -> Tensor:
    # NOTE: untested here (no GPU in CI); the torch path is the reference.
    from flash_attn import flash_attn_varlen_func

    cu_seqlens_k = F.pad(meta.context_lens.cumsum(0), (1, 0)).to(torch.int32)
    return flash_attn_varlen_func(
        q, k_cache, v_cache,
        cu_seqlens_q=meta.cu_seqlens_q.to(torch.int32), cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=meta.max_query_len, max_seqlen_k=meta.max_context_len,
        softmax_scale=scale, causal=True,
        window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1),
        block_table=meta.block_tables.to(torch.int32),
    )  # [num_tokens, heads, D]


class Attention(nn.Module):
    """Stores the new k/v in the paged cache, then attends over each sequence's context."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.sliding_window = scale, sliding_window
        # Bound by kv_cache.allocate_kv_cache: [num_blocks, block_size, num_kv_heads, head_dim].
        self.k_cache: Tensor | None = None
        self.v_cache: Tensor | None = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor, rows: Tensor | None = None) -> Tensor:
        """q [num_tokens, heads, D], k/v [num_tokens, kv_heads, D] -> [num_tokens, heads * D];
        with `rows`, every token's k/v is stored and only those rows attend: [rows, heads * D]."""
        meta = get_forward_context()
        if self.k_cache is None:
            out = _torch_fresh_attention(q, k, v, meta, self.scale, self.sliding_window)
            out = out if rows is None else out[rows]
        else:
            self._store(k, v, meta.slot_mapping)
            if rows is not None:
                q, meta = q[rows], _rows_as_queries(meta, rows, q.shape[0])
            out = self._attend_paged(q, meta)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)

    def _attend_paged(self, q: Tensor, meta: AttentionMetadata) -> Tensor:
        if _use_flash(self.k_cache):
            return _flash_paged_attention(q, self.k_cache, self.v_cache, meta, self.scale,
                                          self.sliding_window)
        if _use_cpu_kernels(q, self.head_dim):
            if (meta.fresh or meta.prefill) and meta.max_query_len > 1:
                return cpu_kernels.prefill_attention(q, self.k_cache, self.v_cache,
                                                     meta.block_tables, meta.cu_seqlens_q,
                                                     meta.context_lens, self.scale,
                                                     self.sliding_window)
            # NOTE: a decode step's rows (a speculative step's drafts too) as one-token queries
            # each, as the fused decode layers take them (the same bits either way).
            tables, lens = rows_as_decode(meta, q.shape[0])
            return cpu_kernels.decode_attention(q, self.k_cache, self.v_cache, tables, lens,
                                                self.scale, self.sliding_window)
        return _torch_paged_attention(q, self.k_cache, self.v_cache, meta, self.scale,
                                      self.sliding_window)

    def _store(self, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
        if _store_kernel_takes(k, v, self.k_cache, self.v_cache):
            cpu_kernels.store_kv_(self.k_cache, self.v_cache, k, v, slot_mapping)
            return
        # [num_blocks * block_size, kv_heads, D]: slot-addressed views of the layer's cache
        k_slots = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_slots = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k_slots.index_copy_(0, slot_mapping, k.to(k_slots.dtype))
        v_slots.index_copy_(0, slot_mapping, v.to(v_slots.dtype))
