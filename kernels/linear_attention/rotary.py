"""Rotary embeddings on the numerator of linear attention, as diffusers' SanaLinearAttnProcessor3_0 applies them.

diffusers rotates interleaved pairs (x[2i], x[2i+1]) of phi(q) and phi(k):
    out[2i]   = x[2i] cos_i - x[2i+1] sin_i
    out[2i+1] = x[2i] sin_i + x[2i+1] cos_i
with cos_i = freqs_cos[..., 2i] and sin_i = freqs_sin[..., 2i + 1] of its repeat-interleaved (N, D) tables. The kernels
read compact (N, D/2) float32 tables instead: half the bytes, and one table serves every batch row and head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class RotaryTables(NamedTuple):
    """cos and sin per (token, pair): two contiguous (N, D/2) float32 tensors."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def from_diffusers(cls, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor, n: int, d: int) -> "RotaryTables":
        """From diffusers' repeat-interleaved tables, shaped (N, D) or (1, N, 1, D) as SANA-Video passes them."""
        for name, t in (("cos", freqs_cos), ("sin", freqs_sin)):
            if not t.is_floating_point():
                raise TypeError(f"rotary {name} table must be floating point, got {t.dtype}")
            if t.ndim == 0 or t.shape[-1] != d or t.numel() != n * d:
                raise ValueError(
                    f"rotary {name} table of shape {tuple(t.shape)} does not fit {n} tokens x head dim {d}: expected "
                    f"(N, D) or (1, N, 1, D); tables that differ per batch row or head are not supported"
                )
        cos = freqs_cos.reshape(n, d)[:, 0::2]
        sin = freqs_sin.reshape(n, d)[:, 1::2]
        return cls(cos.float().contiguous(), sin.float().contiguous())

    def check(self, n: int, d: int, device: torch.device) -> None:
        for name, t in zip(self._fields, self):
            if t.shape != (n, d // 2) or t.dtype != torch.float32 or not t.is_contiguous() or t.device != device:
                raise ValueError(
                    f"RotaryTables.{name} must be a contiguous float32 ({n}, {d // 2}) tensor on {device}, "
                    f"got {t.dtype} {tuple(t.shape)} on {t.device}"
                )


def as_tables(rotary, n: int, d: int, device: torch.device) -> RotaryTables | None:
    """Accept None, RotaryTables, or diffusers' (freqs_cos, freqs_sin) pair."""
    if rotary is None:
        return None
    pair = isinstance(rotary, (tuple, list)) and len(rotary) == 2 and all(isinstance(t, torch.Tensor) for t in rotary)
    if not pair:  # RotaryTables is a pair of tensors too
        got = type(rotary).__name__ if not isinstance(rotary, (tuple, list)) else f"a {len(rotary)}-element {type(rotary).__name__}"
        raise TypeError(f"rotary must be None, RotaryTables or a (freqs_cos, freqs_sin) pair of tensors, got {got}")
    if d % 2:
        raise ValueError(f"rotary embeddings rotate pairs of channels: head dim {d} must be even")
    tables = rotary if isinstance(rotary, RotaryTables) else RotaryTables.from_diffusers(*rotary, n, d)
    tables.check(n, d, device)
    return tables


def rotate_pairs_reference(x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
    """x (..., N, D) -> x rotated pair by pair, in x's dtype."""
    cos, sin = tables.cos.to(x.dtype), tables.sin.to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


@triton.jit
def load_tables(COS, SIN, rows, row_ok, D: tl.constexpr, D_PAD: tl.constexpr):
    """cos and sin of a tile of tokens: (BLOCK_N, D_PAD // 2) float32, zero beyond the real pairs."""
    pairs = tl.arange(0, D_PAD // 2)
    mask = row_ok[:, None] & (pairs < D // 2)[None, :]
    offsets = rows[:, None] * (D // 2) + pairs[None, :]
    return tl.load(COS + offsets, mask=mask, other=0.0), tl.load(SIN + offsets, mask=mask, other=0.0)


@triton.jit
def rotate_pairs(x, cos, sin, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """Rotate interleaved channel pairs of a (BLOCK_N, D_PAD) float32 tile; the pair split stays in registers."""
    even, odd = tl.split(tl.reshape(x, (BLOCK_N, D_PAD // 2, 2)))
    rotated = tl.join(even * cos - odd * sin, even * sin + odd * cos)
    return tl.reshape(rotated, (BLOCK_N, D_PAD))
