"""Gated MLP activations: `models/llama.py` applies `SiluAndMul` to `gate_up_proj`'s output."""

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels


class SiluAndMul(nn.Module):
    """silu(gate) * up, where the input is the fused [gate | up] projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.fused(x, 32) and x.is_contiguous() and x.dim() == 2:
            return cpu_kernels.silu_and_mul(x)  # one pass, same roundings
        gate, up = x.chunk(2, dim=-1)  # [num_tokens, intermediate_per_rank] each
        return F.silu(gate) * up
