"""Autograd for block-sparse attention: the forward saves each row's log-sum-exp, the backward runs three Triton
kernels in the FlashAttention-2 style, each reading only the block pairs the mask lists.

    forward   attention.py's kernel, also writing lse (B, H, N_q) fp32 (log2 units; +inf on rows that see nothing)
    backward  1. backward_preprocess.py  delta = rowsum(dO * O)                      (B, H, N_q) fp32
              2. backward_dkdv.py        dK, dV: one program per key tile, over the query blocks that see it
                                         (the mask's transposed lists, `BlockSparseMask.query_lists`)
              3. backward_dq.py          dQ: one program per query tile, over the key blocks it sees (the forward's lists)

Both gradient kernels recompute P = exp2(S - lse) tile by tile, so nothing N x N is stored, and apply the mask's
token rule (segments, 3-D windows) inside partial blocks exactly as the forward does. Every gradient element has one
writer: no atomics, no zero-initialisation, deterministic results. The PyTorch reference of the same formulas is
`block_sparse_attention_backward_reference` (reference.py).

What is not differentiated, with an error rather than silence: a second derivative (double backward), and calls
forced onto the Gluon kernel for Hopper (`KernelConfig(gluon=True)`: it writes no lse); without a config, a call that
needs gradients runs the Triton forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from . import attention
from .backward_dkdv import launch_dkdv
from .backward_dq import launch_dq
from .backward_preprocess import launch_preprocess
from .mask import BlockSparseMask, is_int


@dataclass(frozen=True)
class BackwardConfig:
    """Tiles and launch parameters of the two gradient kernels; every tile must divide the mask's block size.

    dkdv_block_n: keys per dK / dV program (its K, V, dK, dV tiles stay on chip); dkdv_block_m: query rows per step.
    dq_block_m: query rows per dQ program (its Q, dO, dQ tiles stay on chip); dq_block_n: keys per step.
    """

    dkdv_block_m: int = 32
    dkdv_block_n: int = 64
    dq_block_m: int = 64
    dq_block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("dkdv_block_m", "dkdv_block_n", "dq_block_m", "dq_block_n"):  # tensor-core tiles
            value = getattr(self, name)
            if not is_int(value) or value < 16 or value & (value - 1):
                raise ValueError(f"BackwardConfig.{name} must be a power of two >= 16, got {value!r}")
        for name in ("num_warps", "num_stages"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"BackwardConfig.{name} must be a positive int, got {value!r}")

    def tiles(self) -> tuple[int, int, int, int]:
        return self.dkdv_block_m, self.dkdv_block_n, self.dq_block_m, self.dq_block_n


def default_backward_config(q: torch.Tensor, block_size: int) -> BackwardConfig:
    """The gradient kernels' tiles for q's device, clipped to the mask's block size.

    Hopper: the backward shape of Triton's fused-attention tutorial (a wide key tile against narrow query steps for
    dK / dV, the mirror image for dQ). Not yet tuned on the GPU: benchmarks/block_sparse_backward_gpu.py tunes over
    candidates beside it and records the best per mask block size.
    """
    major = attention._cuda_arch(q.device)[0] if q.device.type == "cuda" else 0
    if major >= 9:
        cfg = BackwardConfig(32, 128, 128, 32, num_warps=4, num_stages=3)
    elif major == 8:
        cfg = BackwardConfig(32, 64, 64, 32, num_warps=4, num_stages=2)
    else:
        cfg = BackwardConfig()
    return dataclasses.replace(cfg, **{name: min(getattr(cfg, name), block_size) for name in
                                       ("dkdv_block_m", "dkdv_block_n", "dq_block_m", "dq_block_n")})


def check_backward_config(config, mask: BlockSparseMask) -> None:
    if not isinstance(config, BackwardConfig):
        raise TypeError(f"backward_config must be a BackwardConfig or None, got {type(config).__name__}")
    if any(mask.block_size % t for t in config.tiles()):
        raise ValueError(f"backward_config tiles {config.tiles()} must divide the mask's block_size={mask.block_size}")


def block_sparse_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: BlockSparseMask,
    scale: float,
    config: BackwardConfig | None = None,
    *,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk, dv) of block-sparse attention for the output gradient grad_out, from the forward's out and lse.

    q, k, v, out, grad_out (B, H, N, D), any strides; lse (B, H, N_q) fp32 contiguous as the forward writes it.
    dq / dk / dv: optional buffers like q / k / v (any strides) that the kernels write whole; `needs` skips the dQ
    kernel (needs[0] False) or the dK / dV kernel (needs[1] and needs[2] False), returning None for those.
    """
    config = config or default_backward_config(q, mask.block_size)
    check_backward_config(config, mask)
    if grad_out.shape != q.shape or out.shape != q.shape or tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"grad_out {tuple(grad_out.shape)}, out {tuple(out.shape)} and lse {tuple(lse.shape)} must "
                         f"match q {tuple(q.shape)} (lse: its first three dims)")
    if lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError("lse must be the forward's contiguous float32 log-sum-exp")
    block_m, block_n, dq_block_m, dq_block_n = config.tiles()
    dot_f32 = attention.INTERPRETED
    delta = torch.empty_like(lse)
    launch_preprocess(out, grad_out, delta)
    if needs[1] or needs[2]:
        dk = torch.empty_like(k) if dk is None else dk
        dv = torch.empty_like(v) if dv is None else dv
        launch_dkdv(q, k, v, grad_out, dk, dv, lse, delta, mask, scale, block_m, block_n, config.num_warps,
                    config.num_stages, dot_f32)
    if needs[0]:
        dq = torch.empty_like(q) if dq is None else dq
        launch_dq(q, k, v, grad_out, dq, lse, delta, mask, scale, dq_block_m, dq_block_n, config.num_warps,
                  config.num_stages, dot_f32)
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None)


class BlockSparseAttentionFunction(torch.autograd.Function):
    """block_sparse_attention as an autograd op: the Triton forward (saving lse) and the Triton backward above.

    apply(out, q, k, v, mask, scale, config, backward_config): `out` (a buffer like q, or None) is written in place and
    returned; the checks are `block_sparse_attention`'s. `out` comes first: autograd routes the gradients of an
    in-place op on a view (CopySlices) as if the modified tensor were the op's first input."""

    @staticmethod
    def forward(ctx, out, q, k, v, mask: BlockSparseMask, scale: float, config, backward_config):
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        mask.query_lists  # noqa: B018  (the backward's transposed lists: built once per mask, here rather than there)
        if out is None:
            out = torch.empty_like(q)
        else:
            ctx.mark_dirty(out)
        attention._launch(q, k, v, out, mask, scale, config, lse=lse)
        ctx.mask, ctx.scale, ctx.backward_config = mask, scale, backward_config
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @once_differentiable  # a second derivative raises a clear error
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[1:4])
        dq, dk, dv = block_sparse_attention_backward(
            grad_out, q, k, v, out, lse, ctx.mask, ctx.scale, ctx.backward_config, needs=needs)
        return None, dq, dk, dv, None, None, None, None
