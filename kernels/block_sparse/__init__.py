"""Block-sparse attention: the Triton kernel and its backward (autograd), the Gluon kernel for Hopper, their PyTorch
references, the mask object and its builders."""

from .attention import GLUON_CONFIGS, KernelConfig, block_sparse_attention, choose_config, default_config
from .backward import BackwardConfig, block_sparse_attention_backward, default_backward_config
from .mask import BlockSparseMask, from_block_tables, table_mask
from .patterns import block_causal_mask, block_diagonal_mask, interval_mask, local_3d_mask, strided_shards_mask
from .reference import block_sparse_attention_backward_reference, block_sparse_attention_reference
from .block_pool import block_pool, block_pool_reference
from .device_mask import DeviceBlockSparseMask, device_table_mask
from .dynamic_mask import (
    block_scores, dynamic_block_mask, dynamic_block_mask_reference, select_blocks, select_blocks_reference,
)
from .patterns import window_global_random_mask
from .pbs import pbs_block_sparse_attention, pbs_key_permutation
from .tile_order import TiledMask, criss_cross_mask, tile_permutation, tiled_block_mask, tiled_window_mask

__all__ = [
    "DeviceBlockSparseMask",
    "TiledMask",
    "block_pool",
    "block_pool_reference",
    "block_scores",
    "criss_cross_mask",
    "device_table_mask",
    "dynamic_block_mask",
    "dynamic_block_mask_reference",
    "pbs_block_sparse_attention",
    "pbs_key_permutation",
    "select_blocks",
    "select_blocks_reference",
    "tile_permutation",
    "tiled_block_mask",
    "tiled_window_mask",
    "window_global_random_mask",
    "GLUON_CONFIGS",
    "BackwardConfig",
    "BlockSparseMask",
    "KernelConfig",
    "block_causal_mask",
    "block_diagonal_mask",
    "block_sparse_attention",
    "block_sparse_attention_backward",
    "block_sparse_attention_backward_reference",
    "block_sparse_attention_reference",
    "choose_config",
    "default_backward_config",
    "default_config",
    "from_block_tables",
    "interval_mask",
    "local_3d_mask",
    "strided_shards_mask",
    "table_mask",
]
