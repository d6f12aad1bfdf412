"""Kernel 2 of 2: the fused query pass. Per query, in one read of q and one write of o:

    o_i = R(phi(q_i)) . S / (phi(q_i) . z + eps)      (phi = ReLU, R = optional RoPE on the numerator only)

Reference: `naive.attend`. Both forms end here: non-causal attention is kernel 1 (state.py) over all tokens then this
kernel; a block-causal chunk step is kernel 1 over the chunk, started from the prior state, then this kernel.

Tiling: grid (B*H, PARTS). Program (bh, p) loads its head's float32 state once (S^T: D_PAD x D_PAD into shared memory,
z: D_PAD) and walks the queries [p*SPAN, (p+1)*SPAN) in tiles of BLOCK_N tokens x D_PAD channels: ReLU, the normaliser
as a row sum (float32, so fp16 inputs cannot overflow it) and RoPE in registers, then one tensor-core dot
o^T = S^T R(phi(q))^T (K = D_PAD; the query tile is the operand staged through swizzled shared memory, so the q tile's
own copy is only ever read row-wise), a divide and a cast. Walking a span instead of one tile per program keeps the
64 KiB state out of the per-tile traffic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .inputs import LinearAttentionState
from .launch import grid_split, launch, pad_dim, prune_fp32, query_dot
from .rotary import RotaryTables, load_tables, rotate_pairs

# Tuned on first use for 16-bit inputs. The float32 state operand takes 64 KiB of shared memory for D = 128; with
# 32-token tiles two programs fit an SM, RoPE tables included. float32 inputs (3-pass TF32 dots, twice the bytes a
# tile) take the last one alone (prune_fp32).
CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2),  # float32
]


@triton.jit
def _fused_query_kernel(
    Q, COS, SIN, KV, KSUM, OUT,
    H, N, SPAN, eps,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_ob, stride_oh, stride_on, stride_od,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    part = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    cols = tl.arange(0, D_PAD)
    col_ok = cols < D
    tile = tl.arange(0, BLOCK_N)

    # Padding rows/columns of the state load as zeros, so padded channels add nothing to either sum.
    state_mask = col_ok[:, None] & col_ok[None, :]
    kv_t = tl.load(KV + bh.to(tl.int64) * D * D + cols[None, :] * D + cols[:, None], mask=state_mask, other=0.0)
    k_sum = tl.load(KSUM + bh.to(tl.int64) * D + cols, mask=col_ok, other=0.0)

    q_base = Q + b * stride_qb + h * stride_qh
    o_base = OUT + b * stride_ob + h * stride_oh
    start = part * SPAN
    end = tl.minimum(start + SPAN, N)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tile
        row_ok = rows < end
        mask = row_ok[:, None] & col_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qn + cols[None, :] * stride_qd, mask=mask, other=0.0)
        q = q.to(tl.float32)
        phi = tl.where(q < 0, 0.0, q)  # ReLU that keeps NaN as torch.relu does (tl.maximum drops it; state.py)
        denominator = tl.sum(phi * k_sum[None, :], axis=1) + eps
        if ROPE:
            cos, sin = load_tables(COS, SIN, rows, row_ok, D, D_PAD)
            # Rounded to the input dtype as diffusers does; exact again in the float32 operand.
            phi = rotate_pairs(phi, cos, sin, BLOCK_N, D_PAD).to(Q.dtype.element_ty).to(tl.float32)
        o_t = tl.dot(kv_t, tl.trans(phi), input_precision=PRECISION) / denominator[None, :]
        tl.store(
            o_base + rows[None, :] * stride_on + cols[:, None] * stride_od, o_t.to(OUT.dtype.element_ty),
            mask=col_ok[:, None] & row_ok[None, :],
        )


_tuned_fused_query_kernel = triton.autotune(
    CONFIGS, key=["D_PAD", "ROPE"], prune_configs_by={"early_config_prune": prune_fp32}
)(_fused_query_kernel)


def fused_query(
    q: torch.Tensor, state: LinearAttentionState, rotary: RotaryTables | None, eps: float, out: torch.Tensor,
) -> torch.Tensor:
    """Writes every element of `out` (same shape and dtype as q). Inputs are checked by the caller."""
    b, h, n, d = q.shape
    if n == 0:
        return out
    # Each program reads its head's state (4 D^2 bytes, from L2): about D / 2 tokens of q and o at HBM speed.
    parts, span = grid_split(n, b * h, q.device, overhead=d // 2)
    cos, sin = rotary if rotary is not None else (state.kv, state.kv)  # unused pointers when ROPE is off
    launch(
        _fused_query_kernel, _tuned_fused_query_kernel, (b * h, parts),
        q, cos, sin, state.kv, state.k_sum, out, h, n, span, eps, *q.stride(), *out.stride(),
        D=d, D_PAD=pad_dim(d), ROPE=rotary is not None, PRECISION=query_dot(q.dtype, _fused_query_kernel),
    )
    return out
