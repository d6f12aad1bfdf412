"""Triton kernels (IO-aware attention). Each op lives in its own module with a PyTorch reference beside it."""

from .linear_attention import block_causal_linear_attention, linear_attention

from .block_sparse import (
    BlockSparseMask,
    block_causal_mask,
    block_diagonal_mask,
    block_sparse_attention,
    block_sparse_attention_reference,
    interval_mask,
    local_3d_mask,
    strided_shards_mask,
    table_mask,
)

__all__ = [
    "linear_attention", "block_causal_linear_attention", "block_sparse_attention", "block_sparse_attention_reference",
    "BlockSparseMask", "table_mask", "interval_mask", "block_diagonal_mask", "block_causal_mask", "local_3d_mask",
    "strided_shards_mask",
]
