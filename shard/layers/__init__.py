"""Tensor-parallel building blocks of the shard's models (see ARCHITECTURE.md, shard table)."""
