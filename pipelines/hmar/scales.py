"""The token layout of next-scale prediction: scale k is a pn_k x pn_k token map, flattened row-major, and the scales
are concatenated from coarse to fine: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) gives 1 + 4 + ... + 256 = 680 tokens.

VAR's attention is block-causal over these segments (a token sees its own scale and every coarser one); HMAR's is
block-diagonal (a token sees its own scale only). A `SegmentMask` says which, and attention.py picks how to run it:
the block-sparse kernel (its masks from `accel.kernels`' `block_causal_mask` / `block_diagonal_mask`: exact
token-level segment edges, no N x N mask, built once per layout and device), one SDPA call per segment, or the
segments packed as variable-length sequences.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch

from accel.kernels import BlockSparseMask, block_causal_mask, block_diagonal_mask

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def check_scales(owner: str, scales) -> tuple[int, ...]:
    """At least two scales (VAR's Phi choice divides by K - 1), positive ints, strictly increasing."""
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) < 2:
        raise ValueError(f"{owner}: scales must be a sequence of at least 2 side lengths, got {scales!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales):
        raise ValueError(f"{owner}: scales must be positive ints, got {list(scales)}")
    if any(b <= a for a, b in zip(scales, scales[1:])):
        raise ValueError(f"{owner}: scales must be strictly increasing (coarse to fine), got {list(scales)}")
    return tuple(int(s) for s in scales)


@dataclass(frozen=True)
class ScaleLayout:
    """Where each scale's tokens sit in the concatenated sequence."""

    scales: tuple[int, ...]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(s * s for s in self.scales)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    def start(self, k: int) -> int:
        return sum(self.lengths[:k])

    def span(self, k: int) -> slice:
        return slice(self.start(k), self.start(k) + self.lengths[k])

    def level_ids(self) -> torch.Tensor:
        """The scale index of every token: (N,) long."""
        return torch.repeat_interleave(torch.arange(self.num_scales), torch.tensor(self.lengths))

    def guidance_ramp(self, k: int, guidance_scale: float) -> float:
        """VAR's linear CFG ramp: no guidance on the first scale, the full scale on the last."""
        return guidance_scale * k / (self.num_scales - 1)

    def block_causal(self, num_scales: int, backend: str = "auto") -> "SegmentMask":
        """VAR's training / prefix mask over the first num_scales scales."""
        return SegmentMask(self.lengths[:num_scales], causal=True, backend=backend)

    def block_diagonal(self, backend: str = "auto") -> "SegmentMask":
        """HMAR's mask: every scale attends within itself only."""
        return SegmentMask(self.lengths, causal=False, backend=backend)


SEGMENT_BACKENDS = ("auto", "block_sparse", "sdpa", "varlen")
# The block-sparse masks' block: 64 beat 128 at the HMAR shape (H100, benchmarks/results/hmar_h100.json: block-diagonal
# forward 0.54 vs 0.62 ms, backward 1.49 vs 1.74; block-causal backward 1.74 vs 1.92); 32 lost both
# (benchmarks/results/block_sparse_backward_h100.json).
SEGMENT_MASK_BLOCK = 64


def check_segment_backend(owner: str, backend) -> str:
    if backend not in SEGMENT_BACKENDS:
        raise ValueError(f"{owner}: segment attention backend must be one of {SEGMENT_BACKENDS}, got {backend!r}")
    return backend


@dataclass(frozen=True)
class SegmentMask:
    """Attention over consecutive segments of `lengths` tokens: within each segment (block-diagonal) or, with
    `causal`, within it and every earlier one (block-causal). `backend` picks the implementation (attention.py)."""

    lengths: tuple[int, ...]
    causal: bool
    backend: str = field(default="auto", compare=False)

    def __post_init__(self):
        check_segment_backend("SegmentMask", self.backend)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def spans(self) -> list[tuple[int, int, int]]:
        """(query start, query end, first key) of each segment; the keys end where the queries do."""
        ends = [sum(self.lengths[: i + 1]) for i in range(len(self.lengths))]
        starts = [end - n for end, n in zip(ends, self.lengths)]
        return [(s, e, 0 if self.causal else s) for s, e in zip(starts, ends)]

    def block_mask(self, device) -> BlockSparseMask:
        """The same mask for `accel.kernels.block_sparse_attention`."""
        return _segment_mask("causal" if self.causal else "diagonal", self.lengths, str(torch.device(device)))

    def packed_offsets(self, batch: int, device) -> torch.Tensor:
        """int32 (batch * segments + 1,): where each (batch entry, segment) starts when the batch is packed as one
        sequence of batch * total tokens (the cu_seqlens of variable-length attention)."""
        return _packed_offsets(self.lengths, batch, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _packed_offsets(lengths: tuple[int, ...], batch: int, device: str) -> torch.Tensor:
    return torch.tensor([0, *lengths * batch], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


@functools.lru_cache(maxsize=32)
def _segment_mask(kind: str, lengths: tuple[int, ...], device: str) -> BlockSparseMask:
    # Building a mask classifies block pairs on the host side; a model calls it on every forward, so keep it.
    build = block_causal_mask if kind == "causal" else block_diagonal_mask
    return build(list(lengths), SEGMENT_MASK_BLOCK, device=torch.device(device))
