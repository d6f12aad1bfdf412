"""Triton kernels (IO-aware attention): the index of `accel.kernels`.

The ops live in the repository's top-level `kernels/` folder, one sub-package per op with its PyTorch reference
beside it (see `pyproject.toml`: that folder has no `__init__.py` of its own, so it never shadows an installed
top-level `kernels` package, such as Hugging Face's, when Python runs from the repository root).
"""

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
