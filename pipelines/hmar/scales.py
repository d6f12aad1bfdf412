"""The token layout of next-scale prediction: scale k is a pn_k x pn_k token map, flattened row-major, and the scales
are concatenated from coarse to fine: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) gives 1 + 4 + ... + 256 = 680 tokens.

VAR's attention is block-causal over these segments (a token sees its own scale and every coarser one); HMAR's is
block-diagonal (a token sees its own scale only). Both masks come from `accel.kernels` (`block_causal_mask`,
`block_diagonal_mask`: exact token-level segment edges, no N x N mask), built once per layout and device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
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

    def block_causal(self, num_scales: int, device) -> BlockSparseMask:
        """VAR's training / prefix mask over the first num_scales scales."""
        return _segment_mask("causal", self.lengths[:num_scales], str(torch.device(device)))

    def block_diagonal(self, device) -> BlockSparseMask:
        """HMAR's mask: every scale attends within itself only."""
        return _segment_mask("diagonal", self.lengths, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _segment_mask(kind: str, lengths: tuple[int, ...], device: str) -> BlockSparseMask:
    # Building a mask classifies block pairs on the host side; a model calls it on every forward, so keep it.
    build = block_causal_mask if kind == "causal" else block_diagonal_mask
    return build(list(lengths), device=torch.device(device))
