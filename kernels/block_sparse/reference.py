"""PyTorch reference of block-sparse attention: dense masked softmax, a chunk of query rows at a time.

The token mask of a chunk comes from `BlockSparseMask.dense_rows`, so memory is O(chunk x N_k), never N^2 at
once. Used by the tests (in float64), by the CPU fallback, and by the GPU benchmark's correctness pass.
"""

from __future__ import annotations

import math

import torch

from .mask import BlockSparseMask


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    scale: float | None = None,
    rows_per_chunk: int = 1024,
    q_offset: int = 0,
) -> torch.Tensor:
    """softmax(q k^T * scale) v over the keys each query may see; a query that sees none gets zeros.

    q (B, H, N_q, D), k and v (B, H, N_k, D). Computes in float32, or float64 for float64 inputs; returns the
    input dtype. q_offset: q holds the mask's query rows q_offset .. q_offset + N_q (to check a slice of rows).
    """
    if q_offset < 0 or q_offset + q.shape[2] > mask.q_len or k.shape[2] != mask.kv_len:
        raise ValueError(
            f"rows {q_offset}..{q_offset + q.shape[2]} / {k.shape[2]} keys do not fit a mask for {(mask.q_len, mask.kv_len)}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    out = torch.empty(q.shape, dtype=compute, device=q.device)
    for start in range(0, q.shape[2], rows_per_chunk):
        stop = min(start + rows_per_chunk, q.shape[2])
        scores = torch.matmul(qc[:, :, start:stop], kc.transpose(-1, -2)) * scale
        allowed = mask.dense_rows(q_offset + start, q_offset + stop).to(q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        peak = scores.amax(-1, keepdim=True)
        weights = torch.exp(scores - torch.where(torch.isinf(peak), 0.0, peak))  # exp(-inf) = 0 on empty rows
        total = weights.sum(-1, keepdim=True)
        out[:, :, start:stop] = torch.matmul(weights, vc) / torch.where(total > 0, total, 1.0)
    return out.to(q.dtype)


def block_sparse_attention_backward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    mask: BlockSparseMask,
    scale: float | None = None,
    rows_per_chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `block_sparse_attention_reference` for the output gradient grad_out, by the softmax gradient
    written out (the formulas the Triton backward tiles), a chunk of query rows at a time:

        P = softmax(q k^T * scale) over the allowed keys (0 elsewhere and on rows that see none),
        dv = P^T dO,  dP = dO v^T,  dS = P * (dP - rowsum(dO * O)),  dq = scale dS k,  dk = scale dS^T q.

    Computes in float32, or float64 for float64 inputs; returns the input dtype."""
    if q.shape[2] != mask.q_len or k.shape[2] != mask.kv_len:
        raise ValueError(f"{q.shape[2]} queries / {k.shape[2]} keys do not fit a mask for {(mask.q_len, mask.kv_len)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc, doc = q.to(compute), k.to(compute), v.to(compute), grad_out.to(compute)
    dq = torch.empty(q.shape, dtype=compute, device=q.device)
    dk = torch.zeros(k.shape, dtype=compute, device=q.device)
    dv = torch.zeros(v.shape, dtype=compute, device=q.device)
    for start in range(0, q.shape[2], rows_per_chunk):
        stop = min(start + rows_per_chunk, q.shape[2])
        scores = torch.matmul(qc[:, :, start:stop], kc.transpose(-1, -2)) * scale
        allowed = mask.dense_rows(start, stop).to(q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        peak = scores.amax(-1, keepdim=True)
        weights = torch.exp(scores - torch.where(torch.isinf(peak), 0.0, peak))
        total = weights.sum(-1, keepdim=True)
        p = weights / torch.where(total > 0, total, 1.0)
        do = doc[:, :, start:stop]
        dv += torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, vc.transpose(-1, -2))
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        dq[:, :, start:stop] = torch.matmul(ds, kc) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qc[:, :, start:stop]) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
