"""Mean of each block of tokens of q and k, in one launch: the first stage of dynamic block masks (dynamic_mask.py).

Tiling. One program per (block, batch * head): programs 0 .. Mq-1 pool query blocks, Mq .. Mq+Mk-1 key blocks. A
program walks its block CHUNK rows at a time (CHUNK x BLOCK_D tiles, fp32 sums kept in registers) and writes the
mean over the block's real tokens (the ragged last block divides by its own length). Memory-bound: it reads q and k
once (B H N D elements each) and writes B H (Mq + Mk) D floats.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pool_one(X, OUT, b, h, blk, stride_b, stride_h, stride_n, stride_d, n, head_dim, num_blocks,
              num_heads, BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, CHUNK)
    d_ok = offs_d < head_dim
    start = blk * BLOCK_SIZE
    base = X + b * stride_b + h * stride_h
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r in range(0, BLOCK_SIZE, CHUNK):
        rows = start + r + offs_r
        x = tl.load(base + rows[:, None] * stride_n + offs_d[None, :] * stride_d,
                    mask=(rows < n)[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    count = tl.minimum(n - start, BLOCK_SIZE).to(tl.float32)
    out = OUT + ((b * num_heads + h) * num_blocks + blk) * head_dim
    tl.store(out + offs_d, acc / count, mask=d_ok)


@triton.jit(do_not_specialize=["n_q", "n_k", "mq", "mk"])
def _block_pool_kernel(
    Q, K, QP, KP,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    n_q, n_k, mq, mk, head_dim, num_heads,
    BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    if pid < mq:
        _pool_one(Q, QP, b, h, pid, stride_qb, stride_qh, stride_qn, stride_qd, n_q, head_dim, mq, num_heads,
                  BLOCK_SIZE, CHUNK, BLOCK_D)
    else:
        _pool_one(K, KP, b, h, pid - mq, stride_kb, stride_kh, stride_kn, stride_kd, n_k, head_dim, mk, num_heads,
                  BLOCK_SIZE, CHUNK, BLOCK_D)


def block_pool(q: torch.Tensor, k: torch.Tensor, block_size: int,
               out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled q (B, H, Mq, D), pooled k (B, H, Mk, D)), float32: the mean of each block of block_size tokens.

    q (B, H, N_q, D), k (B, H, N_k, D), any float dtype and strides; out: optional contiguous float32 buffers."""
    bsz, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    mq, mk = triton.cdiv(n_q, block_size), triton.cdiv(n_k, block_size)
    shapes = ((bsz, heads, mq, dim), (bsz, heads, mk, dim))
    if out is None:
        qp, kp = (torch.empty(s, dtype=torch.float32, device=q.device) for s in shapes)
    else:
        qp, kp = out
        for t, s in zip(out, shapes):
            if tuple(t.shape) != s or t.dtype != torch.float32 or not t.is_contiguous() or t.device != q.device:
                raise ValueError(f"out buffers must be contiguous float32 {shapes} on {q.device}")
    block_d = max(16, triton.next_power_of_2(dim))
    chunk = min(block_size, 32 if block_d <= 128 else 16)
    # 2 warps: H100, D 128, 128-token blocks (benchmarks/block_pool_gpu.py): 2.9-3.0 TB/s at Wan-14B's shape, against
    # 1.7 with 4 warps and 0.9 with 8 (one block's rows are too few to keep more warps loading).
    _block_pool_kernel[(mq + mk, bsz * heads)](
        q, k, qp, kp, *q.stride(), *k.stride(), n_q, n_k, mq, mk, dim, heads,
        BLOCK_SIZE=block_size, CHUNK=chunk, BLOCK_D=block_d, num_warps=2,
    )
    return qp, kp


def block_pool_reference(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """The mean of each block of block_size tokens along dim 2 (the last block over its real tokens); x's dtype
    for float64 inputs, else float32."""
    n = x.shape[2]
    m = -(-n // block_size)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    padded = torch.nn.functional.pad(x.to(compute), (0, 0, 0, m * block_size - n))
    sums = padded.unflatten(2, (m, block_size)).sum(3)
    counts = torch.full((m,), block_size, dtype=compute, device=x.device)
    counts[-1] = n - block_size * (m - 1)
    return sums / counts[:, None]
