"""Input checks shared by the kernels and the PyTorch reference: fail early, with the shapes in the message."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .rotary import RotaryTables, as_tables

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128  # the kernels keep a D x D float32 state tile in registers


class LinearAttentionState(NamedTuple):
    """Everything earlier chunks contribute, whatever their number.

    kv:    (B, H, D, D) float32, sum_j R(phi(k_j)) v_j^T  (row: key channel, column: value channel)
    k_sum: (B, H, D)    float32, sum_j phi(k_j)           (the normaliser; never rotated)
    """

    kv: torch.Tensor
    k_sum: torch.Tensor


def check_inputs(q, k, v, eps, rotary, out) -> RotaryTables | None:
    """The arguments both entry points share, before anything runs; returns the rotary tables (or None).
    Attribute checks only: no device syncs."""
    check_qkv(q, k, v)
    check_out(out, q)
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        raise TypeError(f"eps must be a Python float, got {type(eps).__name__}")
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if rotary is not None and q.shape[2] != k.shape[2]:
        raise ValueError(f"rotary embeddings need as many queries as keys: {q.shape[2]} vs {k.shape[2]}")
    return as_tables(rotary, k.shape[2], k.shape[3], k.device)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a 4-D (B, H, N, D) tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (B, H, N, D) tensor, got shape {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in DTYPES:
        raise TypeError(f"q, k, v must share one dtype among fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    (b, h, _, d), (bk, hk, _, dk) = q.shape, k.shape
    if b * h == 0:
        raise ValueError(f"q {tuple(q.shape)}: batch and heads must not be empty")
    if (bk, hk, dk) != (b, h, d) or v.shape != k.shape:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch, heads and head dim must match, "
            f"and k and v must have the same shape"
        )
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported: 1 to {MAX_HEAD_DIM}")


def check_out(out: torch.Tensor | None, q: torch.Tensor) -> None:
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor like q or None, got {type(out).__name__}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(
            f"out must match q: {q.dtype} {tuple(q.shape)} on {q.device}; "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def check_state(state, k: torch.Tensor) -> LinearAttentionState:
    """A state from an earlier chunk of the same batch, heads and head dim as k."""
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"state must be a LinearAttentionState (kv, k_sum) tuple, got {type(state).__name__}")
    kv, k_sum = state
    b, h, _, d = k.shape
    for name, t, shape in (("kv", kv, (b, h, d, d)), ("k_sum", k_sum, (b, h, d))):
        if not isinstance(t, torch.Tensor) or t.shape != shape or t.dtype != torch.float32 or t.device != k.device:
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"state.{name} does not match the inputs: expected float32 {shape} on {k.device}, got {got}"
            )
    return LinearAttentionState(kv.contiguous(), k_sum.contiguous())
