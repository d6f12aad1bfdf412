"""The sparse processors under Ulysses context parallelism: the all-to-alls between token and head shards.

Under diffusers' Ulysses context parallelism (`ContextParallelConfig(ulysses_degree=N)`) each rank's layers hold a
shard of the sequence: as diffusers' own Ulysses attention does, an all-to-all gives each rank the whole sequence of
H/N heads, the pattern attends there with its mask restricted to those heads, and an all-to-all takes the output
back. Ring attention is refused (each rank would hold a shard of the keys, which the masks cannot index).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed._functional_collectives as funcol

from accel.parallel import context_parallel

if TYPE_CHECKING:
    from diffusers import ContextParallelConfig


def _ulysses(model: torch.nn.Module) -> ContextParallelConfig | None:
    """The model's context-parallel config where it runs Ulysses over several ranks, else None; an error where the
    sparse processor cannot follow it."""
    cp = context_parallel(model)
    if cp is None:
        return None
    if cp.ring_degree > 1:
        raise ValueError(
            f"sparse attention cannot run under ring attention (ContextParallelConfig(ring_degree={cp.ring_degree})): "
            f"each rank would hold a shard of the keys, which the block masks cannot index; use Ulysses "
            f"(ContextParallelConfig(ulysses_degree=N)), which gives each rank every token of some heads"
        )
    if getattr(cp, "ulysses_anything", False):
        raise ValueError("sparse attention under Ulysses needs equal shards: use ulysses_anything=False, with token "
                         "and head counts divisible by ulysses_degree")
    return cp


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Chunk r of dim 0 goes to rank r of `group`; chunk r of the result came from rank r (differentiable: the
    backward is the same exchange of the gradients)."""
    out = funcol.all_to_all_single_autograd(x.contiguous(), None, None, group)
    # Eager mode wraps the result, to wait at its first use; the Triton kernels need the plain tensor's storage.
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def _sequence_to_heads(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """(B, N/W, H, D), this rank's tokens of every head -> (B, N, H/W, D), every token of this rank's heads.

    Rank r of the group gets heads [r H/W, (r + 1) H/W); the tokens come in rank order, as diffusers' split of the
    sequence hands them out (rank r holds tokens [r N/W, (r + 1) N/W))."""
    b, n, h, d = x.shape
    # Chunk r (sent to rank r): rank r's heads of our tokens. Chunk r received: our heads of rank r's tokens.
    x = _all_to_all(x.reshape(b, n, world, h // world, d).permute(2, 0, 1, 3, 4), group)  # (W, B, N/W, H/W, D)
    return x.permute(1, 0, 2, 3, 4).reshape(b, world * n, h // world, d)


def _heads_to_sequence(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """The inverse of _sequence_to_heads: (B, N, H/W, D) -> (B, N/W, H, D)."""
    b, n, h, d = x.shape  # h = H/W: this rank's heads
    # Chunk r (sent to rank r): our heads of rank r's tokens. Chunk r received: rank r's heads of our tokens.
    x = _all_to_all(x.reshape(b, world, n // world, h, d).transpose(0, 1), group)  # (W, B, N/W, H/W, D)
    return x.permute(1, 2, 0, 3, 4).reshape(b, n // world, world * h, d)
