"""Vocabulary-parallel token embedding and LM head.

Upstream: `models/llama.py`. Each rank owns `ceil(vocab / world_size)` consecutive rows of
the (vocab, hidden) matrix; rows past the real vocabulary are zero padding. The embedding
all-reduces the rows each rank looked up; the LM head all-gathers the logits, so every rank
returns the full `[num_tokens, vocab]` (downstream: `model_runner.py` and `sampling.py`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import ParallelState, all_gather, all_reduce
from . import cpu_kernels
from .linear import copy_checked, linear, load_narrow, loaded_shape, pack_module_weight


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp: ParallelState) -> None:
        super().__init__()
        self.tp = tp
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_rank = math.ceil(num_embeddings / tp.world_size)
        self.vocab_start = tp.rank * self.num_embeddings_per_rank
        rows_left = num_embeddings - self.vocab_start
        self.num_valid_rows = max(0, min(self.num_embeddings_per_rank, rows_left))
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_rank, embedding_dim), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if loaded_shape(loaded)[0] != self.num_embeddings:
            raise ValueError(
                f"checkpoint has {loaded_shape(loaded)[0]} embedding rows, "
                f"config says {self.num_embeddings}"
            )
        param.data.zero_()
        rows = self.num_valid_rows
        copy_checked(param.data[:rows], load_narrow(loaded, 0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)  # [num_tokens, hidden]
        local_ids = input_ids - self.vocab_start
        owned = (local_ids >= 0) & (local_ids < self.num_valid_rows)  # [num_tokens]
        hidden = F.embedding(local_ids.masked_fill(~owned, 0), self.weight)
        hidden = hidden * owned.unsqueeze(-1).to(hidden.dtype)  # [num_tokens, hidden]
        return all_reduce(hidden, self.tp)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden @ weight.T, gathered over ranks; may share its weight with the embedding."""

    packed_weight: torch.Tensor | cpu_kernels.PackedWeight | None = None
    shares_embedding: bool = False  # set by a model with tied embeddings

    def pack_weight(self) -> bool:
        """Packs the head (linear.py); a tied embedding keeps reading the dense weight."""
        return pack_module_weight(self, dense_read_elsewhere=self.shares_embedding)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight, self.packed_weight, None)  # [num_tokens, vocab_per_rank]
        logits = all_gather(logits, self.tp, dim=-1)[:, : self.num_embeddings]
        return logits.float()  # [num_tokens, vocab]
