"""What the sparse processors share: the latent grid, read from the transformer's input by a forward pre-hook, the
context-parallel config, and what the pattern built for the grid (built once per grid and reused by every layer and
step; under Ulysses, restricted to the rank's heads).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .patterns import Grid, SparsePattern
from .ulysses import _ulysses

if TYPE_CHECKING:
    from diffusers import ContextParallelConfig


class _GridState:
    """The current latent grid and context-parallel config (set by the model's pre-hook) and what the pattern built
    for the grid."""

    def __init__(self, pattern: SparsePattern, patch_size: tuple[int, int, int]):
        self.pattern, self.patch_size = pattern, patch_size
        self.grid: Grid | None = None
        self.ulysses: ContextParallelConfig | None = None
        self.masks: dict[tuple, object] = {}  # (grid, heads, device) -> the pattern's build (a mask for mask patterns)
        # Under Ulysses: (grid, heads, device, (start, stop)) -> the build restricted to heads [start, stop) (the whole
        # build is not kept: a rank needs only its heads)
        self.rank_masks: dict[tuple, object] = {}
        # HunyuanVideo: the batch items grouped by their valid text keys, read from the attention mask (a host sync)
        # by the first layer of each transformer call and reused by the others, which get the same mask
        self.text_groups: dict[tuple[int, ...], list[int]] | None = None

    def record(self, module, args, kwargs) -> None:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.grid = tuple(s // p for s, p in zip(latents.shape[2:], self.patch_size))  # the whole grid, unsplit here
        self.ulysses = _ulysses(module)  # read per call: enable_parallelism may come after the patch
        self.text_groups = None  # a new call: a new mask

    def built(self, num_tokens: int, heads: int, device: torch.device, head_range: tuple[int, int] | None = None):
        if self.grid is None or math.prod(self.grid) != num_tokens:
            raise RuntimeError(f"sparse attention got {num_tokens} tokens but the latent grid is {self.grid}")
        if head_range is None:
            key, cache = (self.grid, heads, device), self.masks
        else:
            key, cache = (self.grid, heads, device, head_range), self.rank_masks
        if key not in cache:
            built = self.pattern.build(self.grid, heads, device)
            cache[key] = built if head_range is None else self.pattern.select_heads(built, *head_range)
        return cache[key]

    def joint_built(self, num_image: int, heads: int, device: torch.device, num_text: int):
        """What the pattern built for the grid, extended by `num_text` text keys (SparsePattern.joint)."""
        key = (self.grid, heads, device, "joint", num_text)
        if key not in self.masks:
            self.masks[key] = self.pattern.joint(self.built(num_image, heads, device), num_text)
        return self.masks[key]
