"""Backward of block-sparse attention, step 1 of 3: delta = rowsum(dO * O), one fp32 value per query row.

Why. With P = softmax(S) and dP = dO V^T, the gradient of the scores is dS = P * (dP - delta), where
delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id (O = P V). Both later kernels need delta for every row they touch
(the dK / dV kernel for the query rows of every query block it visits), so it is computed once here, from the
forward's output, instead of once per (query block, key block) pair.

Tiling. One program reads a BLOCK_M x D tile of O and of dO for one (batch, head) and writes BLOCK_M values of
delta (B, H, N_q), contiguous: memory-bound, one pass over O and dO.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n_q", "head_dim", "num_heads"])
def _block_sparse_attention_bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    n_q, head_dim, num_heads,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < n_q)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * n_q + rows, delta, mask=rows < n_q)


def launch_preprocess(o: torch.Tensor, do: torch.Tensor, delta: torch.Tensor, block_m: int = 64) -> None:
    """delta (B, H, N_q) fp32, contiguous <- rowsum(dO * O) of o and do (B, H, N_q, D), any strides."""
    bsz, heads, n_q, dim = o.shape
    block_d = max(16, triton.next_power_of_2(dim))
    _block_sparse_attention_bwd_preprocess[(triton.cdiv(n_q, block_m), bsz * heads)](
        o, do, delta, *o.stride(), *do.stride(), n_q, dim, heads, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )
