"""Block-sparse attention: the Triton kernel, the Gluon kernel for Hopper, their PyTorch reference, the mask object
and its builders."""

from .attention import GLUON_CONFIGS, KernelConfig, block_sparse_attention, choose_config, default_config
from .mask import BlockSparseMask, from_block_tables, table_mask
from .patterns import block_causal_mask, block_diagonal_mask, interval_mask, local_3d_mask, strided_shards_mask
from .reference import block_sparse_attention_reference

__all__ = [
    "GLUON_CONFIGS",
    "BlockSparseMask",
    "KernelConfig",
    "block_causal_mask",
    "block_diagonal_mask",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "choose_config",
    "default_config",
    "from_block_tables",
    "interval_mask",
    "local_3d_mask",
    "strided_shards_mask",
    "table_mask",
]
