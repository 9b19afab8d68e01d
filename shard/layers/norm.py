"""RMSNorm with Hugging Face's numerics (normalize in float32, cast back, then scale).

Upstream: `models/llama.py` builds one per decoder sublayer plus the final norm; its `weight`
is loaded whole on every rank by `weights.py` through `weight_loader`.
"""

import torch
from torch import nn

from .linear import copy_checked, load_full


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        copy_checked(param.data, load_full(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: the cast back to the input dtype happens before the scale, as in transformers,
        # so bfloat16 outputs match it bit for bit.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)
