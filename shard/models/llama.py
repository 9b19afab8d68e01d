"""Llama-family decoder (Llama, Mistral, Qwen2) over packed tokens and a paged KV cache.

Upstream: `models.load_model` builds it from the HF config for one TP rank, and
`weights.load_weights` fills it (HF names are kept; q/k/v and gate/up are fused through
`packed_modules_mapping`). Downstream: `model_runner.py` calls `forward(input_ids, positions)`
inside `attention.forward_context(meta)` and `compute_logits` on the rows it samples from.

The three architectures differ only in config: Qwen2 has a q/k/v bias and usually tied
embeddings, Llama may have `attention_bias`/`mlp_bias`, Mistral and Qwen2 a sliding window.
"""

from typing import ClassVar

import torch
from torch import nn

from ..attention import Attention, get_forward_context, rows_as_decode
from ..distributed import ParallelState
from ..layers import cpu_kernels
from ..layers.activation import SiluAndMul
from ..layers.embedding import ParallelLMHead, VocabParallelEmbedding
from ..layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding, get_rope


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _attention_biases(config) -> tuple[bool, bool]:
    """(q/k/v bias, o_proj bias)."""
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def _sliding_window(config, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return window


class LlamaAttention(nn.Module):
    def __init__(
        self, config, tp: ParallelState, rotary_emb: RotaryEmbedding, layer_idx: int
    ) -> None:
        super().__init__()
        head_dim = _head_dim(config)
        qkv_bias, o_bias = _attention_biases(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, config.num_attention_heads, config.num_key_value_heads,
            qkv_bias, tp,
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * head_dim, config.hidden_size, o_bias, tp
        )
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            self.qkv_proj.num_heads_per_rank, self.qkv_proj.num_kv_heads_per_rank, head_dim,
            scale=head_dim**-0.5, sliding_window=_sliding_window(config, layer_idx),
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden], or only the given rows' outputs (every
        row's k/v is cached either way)."""
        num_tokens, head_dim = hidden.shape[0], self.attn.head_dim
        qkv = self.qkv_proj(hidden)  # [num_tokens, (heads + 2 * kv_heads) * head_dim] per rank
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, -1, head_dim)  # [num_tokens, heads, head_dim]
        k = k.view(num_tokens, -1, head_dim)  # [num_tokens, kv_heads, head_dim]
        v = v.view(num_tokens, -1, head_dim)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, rows))  # [num_tokens or rows, hidden]


# Largest gate_up output of one MLP chunk on CPU (see LlamaMLP.forward).
MLP_CHUNK_BYTES = 16 << 20


class LlamaMLP(nn.Module):
    def __init__(self, config, tp: ParallelState) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} (only silu)")
        bias, size = bool(getattr(config, "mlp_bias", False)), config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias, tp)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias, tp)
        self.act_fn = SiluAndMul()
        self.gate_up_per_rank = 2 * size // tp.world_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden]; on CPU, a long prefill in chunks.

        NOTE: whole, a 4096-token float32 prefill's gate_up output is 128 MiB, past glibc's
        mmap threshold (32 MiB, `keep_freed_memory`): a fresh mapping, faulted in page by page
        at every layer, and 64 MiB more for SiLU's. Chunks of at most MLP_CHUNK_BYTES come from
        the heap glibc keeps, and stay in L3 from one op to the next (benchmarks/NOTES.md 29).
        """
        rows = max(1, MLP_CHUNK_BYTES // (self.gate_up_per_rank * hidden.element_size()))
        if hidden.device.type != "cpu" or hidden.shape[0] <= rows:
            return self._forward(hidden)
        out = torch.empty_like(hidden)
        for part, dst in zip(hidden.split(rows), out.split(rows)):
            dst.copy_(self._forward(part))
        return out

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(hidden)))


_UNSET = object()


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config, tp: ParallelState, rotary_emb: RotaryEmbedding, layer_idx: int
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, tp, rotary_emb, layer_idx)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._fused_weights: tuple | object = _UNSET  # (packed q/k/v weight, its args)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, rows: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it is added): the add is fused into
        the next norm. The first layer gets residual None. With `rows`, both only for those
        rows: past the attention's k/v, the rest of the layer runs on them alone."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, rows)
        if rows is not None:
            residual = residual[rows]
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def fused_decode_args(self, dtype: torch.dtype) -> tuple | None:
        """This layer's arguments to `cpu_kernels.decode_layer` after the per-step ones, or None
        where an op of the layer would not run there (the same ops `forward` would pick)."""
        # NOTE: the weights' part is worked out once per packing of the weights (keyed by the
        # packed q/k/v weight: None before pack_linear_weights, another if packed again).
        packed = self.self_attn.qkv_proj.packed_weight
        if self._fused_weights is _UNSET or self._fused_weights[0] is not packed:
            self._fused_weights = (packed, self._fused_decode_weights())
        weights, attn = self._fused_weights[1], self.self_attn.attn
        caches = (attn.k_cache, attn.v_cache)
        if (weights is None or self.input_layernorm.weight.dtype != dtype
                or any(c is None or c.dtype != dtype or not c.is_contiguous() for c in caches)):
            return None
        return (*caches, *weights)

    def _fused_decode_weights(self) -> tuple | None:
        """The static part of `fused_decode_args`, once the weights are packed."""
        attn, mlp = self.self_attn, self.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        packed = [layer.packed_weight for layer in linears]
        if not all(isinstance(w, cpu_kernels.PackedWeight) for w in packed):
            return None  # not packed yet, or packed for oneDNN
        dtype, rope, head_dim = packed[0].data.dtype, attn.rotary_emb, attn.attn.head_dim
        tensors = [self.input_layernorm.weight, self.post_attention_layernorm.weight,
                   *(layer.bias for layer in linears if layer.bias is not None)]
        if (attn.qkv_proj.tp.world_size != 1 or not rope.kernel_table
                or head_dim % 32 or head_dim > 256
                or self.input_layernorm.weight.shape[0] % 16 or mlp.gate_up_per_rank % 32
                or any(w.data.dtype != dtype for w in packed)
                or any(t.dtype != dtype or t.device.type != "cpu" for t in tensors)):
            return None
        shape = [attn.attn.num_heads, attn.attn.num_kv_heads, head_dim, mlp.gate_up_per_rank // 2]
        weights = [(w.data, layer.bias) for w, layer in zip(packed, linears)]
        return (rope.cos_sin_cache, self.input_layernorm.weight,
                self.post_attention_layernorm.weight, self.input_layernorm.eps,
                *(t for pair in weights for t in pair), shape, attn.attn.scale,
                attn.attn.sliding_window or 0)


# Rows of a step that continues cached sequences (speculative verification, a prefix-cached
# prompt's tail) that still run through decode_layer: its attention reads each row's context
# once, which stays cheap for a few rows per sequence at any context length.
FUSED_MAX_ROWS = 64
# NOTE: a prefill's rows past a cached prefix go through the modules, whose prefill kernel
# reads a sequence's keys once for all its rows, from 32 rows on: tails of 64 / 128 rows after
# 1024 cached tokens 0.87x / 0.77x the time in bfloat16, 16 rows 1.03-1.15x (NOTES 57).
FUSED_MAX_PREFILL_ROWS = 32


class LlamaModel(nn.Module):
    # On CPU a decode step runs each layer as one call of cpu_kernels.decode_layer where it
    # can (False: always the modules, as tests compare them).
    fused_decode = True

    def __init__(self, config, tp: ParallelState) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        rotary_emb = get_rope(config, _head_dim(config))  # one cos/sin cache shared by all layers
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, tp, rotary_emb, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """[num_tokens] -> [num_tokens, hidden], or [len(rows), hidden]: the final hidden states
        of the rows whose logits the caller needs (None: all)."""
        hidden, residual = self.embed_tokens(input_ids), None  # [num_tokens, hidden]
        fused = self._fused_decode_layers(hidden)
        if fused is not None:
            meta, residual = get_forward_context(), hidden  # nothing to add at the first layer
            # each row attends as a one-token query over its own context
            tables, lens = rows_as_decode(meta, hidden.shape[0])
            for args in fused:
                hidden = cpu_kernels.decode_layer(hidden, residual, positions, meta.slot_mapping,
                                                  tables, lens, *args)
            if rows is not None:
                hidden, residual = hidden[rows], residual[rows]
            return self.norm(hidden, residual)[0]
        # NOTE: a prompt's rows feed the next token through the last one alone, so the last
        # layer runs past its k/v on the rows asked for only: one layer of the prefill's
        # linears and attention fewer (1/12 of a 12-layer model's; NOTES 65).
        *first, last = self.layers
        for layer in first:
            hidden, residual = layer(positions, hidden, residual)
        hidden, residual = last(positions, hidden, residual, rows)
        return self.norm(hidden, residual)[0]

    def _fused_decode_layers(self, hidden: torch.Tensor) -> list[tuple] | None:
        """Every layer's `fused_decode_args` when this is a CPU decode step they all can run:
        one token per sequence, or a few rows continuing cached sequences (speculation)."""
        # NOTE: the modules cost ~40 Python dispatches a layer: 1.2 ms of a 17.9 ms float32
        # step at one sequence (NOTES 36).
        meta = get_forward_context()
        most = FUSED_MAX_PREFILL_ROWS if meta.prefill else FUSED_MAX_ROWS
        small_continuation = not meta.fresh and hidden.shape[0] <= most
        if (not self.fused_decode or hidden.device.type != "cpu"
                or not (meta.max_query_len == 1 or small_continuation)
                or not cpu_kernels.available(hidden.dtype)):
            return None
        args = [layer.fused_decode_args(hidden.dtype) for layer in self.layers]
        return None if any(a is None for a in args) else args


class LlamaForCausalLM(nn.Module):
    # HF module name -> (our fused module, shard id passed to its weight_loader)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, tp: ParallelState) -> None:
        super().__init__()
        self.config, self.tp = config, tp
        self.model = LlamaModel(config, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        self.ignored_weight_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.lm_head.shares_embedding = True
            self.ignored_weight_suffixes += ("lm_head.weight",)
        # Filled by load_model from generation_config.json; the config's own eos by default.
        eos = config.eos_token_id
        self.eos_token_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def head_dim(self) -> int:
        return _head_dim(self.config)

    @property
    def num_kv_heads_per_rank(self) -> int:
        return self.model.layers[0].self_attn.attn.num_kv_heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> [num_tokens, hidden] (or the hidden states of
        `rows` only, the rows to compute logits on); reads the forward context."""
        return self.model(input_ids, positions, rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [num_tokens, vocab] float32, full vocab on every rank
