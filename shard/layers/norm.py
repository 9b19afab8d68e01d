"""RMSNorm with Hugging Face's numerics (normalize in float32, cast back, then scale), fused
with the residual add that precedes it.

Upstream: `models/llama.py` builds one per decoder sublayer plus the final norm; its `weight`
is loaded whole on every rank by `weights.py` through `weight_loader`. On CPU the work is one
pass of fused_ops.cpp (`cpu_kernels.fused`); elsewhere torch ops.
"""

import torch
from torch import nn

from . import cpu_kernels
from .linear import copy_checked, load_full


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        copy_checked(param.data, load_full(loaded))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`: (norm(x + residual), x + residual), and on CPU both are
        written in place of x and residual."""
        if (cpu_kernels.fused(x) and x.is_contiguous() and x.dim() == 2
                and (residual is None or residual.is_contiguous())):
            if residual is None:
                return cpu_kernels.rms_norm(x, self.weight, self.eps)
            cpu_kernels.add_rms_norm_(x, residual, self.weight, self.eps)
            return x, residual
        if residual is None:
            return self._norm(x)
        residual = residual + x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: the cast back to the input dtype happens before the scale, as in transformers,
        # so bfloat16 outputs match it bit for bit.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
