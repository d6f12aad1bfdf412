"""The inference forward of `block_sparse_attention` as a torch.library custom op, for torch.compile.

Dynamo cannot trace a Triton or Gluon launch with host-side tensor descriptors (nor the alignment checks that pick
the kernel): each call split the compiled graph (38 graph breaks in a compiled Wan-1.3B step). As a custom op the
call is one opaque node: the mask travels as its tensors and static fields, the kernel is chosen and launched
inside, and the fake implementation tells the compiler the output is a new tensor like q.

`block_sparse_attention` routes here only while compiling, for calls without gradients, `out` or `config`; eager
calls launch directly (and keep the mask's cached launch order).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .attention import _launch, choose_config
from .mask import BlockSparseMask


@torch.library.custom_op("accel::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    full_counts: torch.Tensor, full_indices: torch.Tensor, partial_counts: torch.Tensor, partial_indices: torch.Tensor,
    q_aux: Optional[torch.Tensor], k_aux: Optional[torch.Tensor],
    block_size: int, rule: str, radius: Sequence[int], scale: float,
) -> torch.Tensor:
    mask = BlockSparseMask.trusted(
        q.shape[2], k.shape[2], block_size, full_counts, full_indices, partial_counts, partial_indices, rule,
        q_aux, k_aux, tuple(radius),
    )
    out = torch.empty_like(q)
    _launch(q, k, v, out, mask, scale, choose_config(q, k, v, mask, out))
    return out


@block_sparse_attention_op.register_fake
def _(q, k, v, full_counts, full_indices, partial_counts, partial_indices, q_aux, k_aux, block_size, rule, radius,
      scale):
    return torch.empty_like(q)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float) -> torch.Tensor:
    """The op on a checked mask's fields."""
    return block_sparse_attention_op(
        q, k, v, mask.full_counts, mask.full_indices, mask.partial_counts, mask.partial_indices, mask.q_aux,
        mask.k_aux, mask.block_size, mask.rule, list(mask.radius), scale,
    )
