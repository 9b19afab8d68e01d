"""Rotary position embedding (neox layout) with the rope scalings of Hugging Face configs.

Upstream: `models/llama.py` builds one `RotaryEmbedding` from the HF config with
`get_rope(config, head_dim)` and applies it to the packed q/k of every layer with explicit
positions (the prefix of a cached prompt does not start at position 0). Supported
`rope_type`s: default, linear, dynamic (NTK), llama3, yarn. transformers 5 keeps them in
`config.rope_parameters` (theta included); older configs in `rope_scaling` + `rope_theta`.
"""

import math

import torch
from torch import nn

from . import cpu_kernels


def rope_parameters(config) -> dict:
    """The config's rope settings as one dict with `rope_type` and `rope_theta` filled in."""
    legacy = getattr(config, "rope_scaling", None)
    params = dict(getattr(config, "rope_parameters", None) or legacy or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def override_rope(config, scaling: str | None, factor: float | None) -> None:
    """TGI's `--rope-scaling` / `--rope-factor`: replaces `config`'s rope scaling (theta kept).
    Linear scaling by `factor` stretches the positions the model covers, so
    `max_position_embeddings` grows with it; dynamic NTK rescales past it at run time."""
    if scaling is None and factor is None:
        return
    rope_type, factor = scaling or "linear", float(factor or 1.0)
    if rope_type not in ("linear", "dynamic") or factor <= 0:
        raise ValueError(f"rope override {rope_type!r} x {factor}: linear or dynamic, factor > 0")
    theta = rope_parameters(config)["rope_theta"]
    # NOTE: rope_parameters only: in transformers 5 `rope_scaling` is its deprecated alias,
    # and setting it replaces the dict (theta included).
    config.rope_parameters = {"rope_type": rope_type, "factor": factor, "rope_theta": theta}
    if rope_type == "linear" and factor > 1:
        config.max_position_embeddings = int(config.max_position_embeddings * factor)


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [dim / 2]


def _llama3_inv_freq(params: dict, dim: int) -> torch.Tensor:
    inv_freq = _default_inv_freq(params["rope_theta"], dim)
    factor, old_len = params["factor"], params["original_max_position_embeddings"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(params: dict, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    base, old_len = params["rope_theta"], params["original_max_position_embeddings"]
    factor = params.get("factor") or max_positions / old_len
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(params.get("beta_fast") or 32)
    high = correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    interpolated = 1.0 / (factor * pos_freqs)
    inv_freq = interpolated * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _dynamic_inv_freq(params: dict, dim: int, max_positions: int, seq_len: int) -> torch.Tensor:
    factor, seq_len = params["factor"], max(seq_len, max_positions)
    stretch = (factor * seq_len / max_positions) - (factor - 1)
    base = params["rope_theta"] * stretch ** (dim / (dim - 2))
    return _default_inv_freq(base, dim)


def compute_inv_freq(params: dict, dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim / 2] float32, scale applied to cos/sin)."""
    rope_type = params["rope_type"]
    if rope_type == "default":
        return _default_inv_freq(params["rope_theta"], dim), 1.0
    if rope_type == "linear":
        return _default_inv_freq(params["rope_theta"], dim) / params["factor"], 1.0
    if rope_type == "dynamic":
        return _dynamic_inv_freq(params, dim, max_positions, max_positions), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(params, dim), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(params, dim, max_positions)
    raise ValueError(
        f"unsupported rope_type {rope_type!r} (default, linear, dynamic, llama3, yarn)"
    )


def _cos_sin(inv_freq: torch.Tensor, num_positions: int, scaling: float) -> torch.Tensor:
    positions = torch.arange(num_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(positions, inv_freq)  # [num_positions, dim / 2]
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)  # [num_positions, dim]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # [num_tokens, heads, dim / 2] each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their positions; cos/sin are cached for `max_positions` positions."""

    def __init__(self, head_dim: int, max_positions: int, params: dict) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.params = head_dim, max_positions, params
        inv_freq, self.scaling = compute_inv_freq(params, head_dim, max_positions)
        cos_sin = _cos_sin(inv_freq, max_positions, self.scaling)  # [max_positions, head_dim]
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)

    @property
    def kernel_table(self) -> bool:
        """Whether the CPU rotary kernel can read `cos_sin_cache` as is: a float32 table for
        every position (dynamic NTK recomputes it past max_positions)."""
        return self.params["rope_type"] != "dynamic" and self.cos_sin_cache.dtype == torch.float32

    def _cos_sin_for(self, positions: torch.Tensor) -> torch.Tensor:
        if self.params["rope_type"] == "dynamic":
            # NOTE: like transformers, dynamic NTK rescales once the longest sequence of the
            # batch outgrows max_positions (one host sync, only for this rope type).
            seq_len = int(positions.max()) + 1
            if seq_len > self.max_positions:
                inv_freq = _dynamic_inv_freq(
                    self.params, self.head_dim, self.max_positions, seq_len
                )
                return _cos_sin(inv_freq.to(positions.device), seq_len, 1.0)[positions]
        return self.cos_sin_cache[positions]  # [num_tokens, head_dim]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [num_tokens, heads, D], k [num_tokens, kv_heads, D], positions [num_tokens].
        On CPU q and k are rotated in place (they are views of the fused qkv output)."""
        if (cpu_kernels.fused(q, 32) and self.kernel_table
                and q.stride(-1) == 1 and k.stride(-1) == 1
                and q.stride(1) == q.shape[2] and k.stride(1) == k.shape[2]):
            cpu_kernels.rotary_(q, k, self.cos_sin_cache, positions)
            return q, k
        cos_sin = self._cos_sin_for(positions).unsqueeze(1)  # [num_tokens, 1, D]
        cos, sin = cos_sin.chunk(2, dim=-1)  # [num_tokens, 1, D / 2] each
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def get_rope(config, head_dim: int) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, config.max_position_embeddings, rope_parameters(config))
