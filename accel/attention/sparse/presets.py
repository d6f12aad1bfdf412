"""Per-family sparse attention presets (SPARSE_PRESETS) and the "preset" pattern, the default: the model family's
entry, a tiled_3d window whose tile is chosen per latent grid (dense where the grid is too small for a window to pay),
the choice logged once per grid.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from accel.kernels.block_sparse.tile_order import TiledMask, check_grid, tile_grid, tiled_window_mask

from .patterns import Grid, HybridPattern, SparsePattern, TiledPattern

logger = logging.getLogger("accel")


@dataclasses.dataclass(frozen=True)
class SparsePreset:
    """A model family's default sparse pattern: a sliding-tile window (tiled_3d) whose tile is picked per grid.

    tiles: candidate tiles, in order of preference (each of volume block_size: whole blocks, the block-table path);
    window: the tile window; max_density: the most block pairs (share) a tiled window may keep to be worth its
    gathers -- above it, below min_tokens latent tokens (64 blocks: attention is a small share of the step there, and
    on the shipped 1,088-token shapes-video model a tiled window costs ~24 dB PSNR against dense,
    eval/harness/sparse_quality.py), or where no tile suits the grid, the preset runs `fallback` (dense: exact attention, the
    kernel's all-pairs mask goes to SDPA on CUDA). A tile suits a grid when it fits inside it on every axis and the
    grid holds more than 2 * window + 1 tiles along some axis (else the window covers the whole grid)."""

    tiles: tuple[tuple[int, int, int], ...]
    window: tuple[int, int, int] = (1, 1, 1)
    max_density: float = 0.5
    block_size: int = 128
    min_tokens: int = 8192
    fallback: str = "dense"
    note: str = ""


# Per model family (the transformer's class: FAMILIES, __init__.py). Tile (2, 8, 8) window (1, 1, 1) is the configuration
# measured on Wan-1.3B at 480p / 81 frames (grid (21, 30, 52), density 0.12): 2.03x a dense step on an H200
# (benchmarks/results/sparse_video_h200.json). The other tiles serve grids it does not suit: (1, 8, 16) single frames
# or short clips, (4, 4, 8) narrow frames. HunyuanVideo (head dim 128, like Wan) takes the same block-size tiles: at
# 720p / 129 frames (grid (33, 45, 80), density 0.035) a step ran 4.69x diffusers' dense one on an H100
# (benchmarks/results/sparse_video_hunyuan_h100.json). SANA-Video has none: its self-attention is linear (no softmax
# to mask).
SPARSE_PRESETS: dict[str, SparsePreset] = {
    "wan": SparsePreset(tiles=((2, 8, 8), (1, 8, 16), (4, 4, 8)), window=(1, 1, 1), max_density=0.5,
                        note="measured 2.03x a dense Wan-1.3B step (H200) at grid (21, 30, 52), density 0.12"),
    "hunyuan_video": SparsePreset(tiles=((2, 8, 8), (1, 8, 16), (4, 4, 8)), window=(1, 1, 1), max_density=0.5,
                                  note="Wan's tiles (same head dim and block size); measured 4.69x a dense HunyuanVideo step "
                                       "(H100) at grid (33, 45, 80), density 0.035"),
}


def _unsuited(grid: Grid, tile, window) -> str | None:
    """Why `tile` does not suit `grid` (None where it does)."""
    if any(t > g for t, g in zip(tile, grid)):
        return f"tile {tile} is larger than the grid"
    if all(n <= 2 * w + 1 for n, w in zip(tile_grid(grid, tile), window)):
        return f"tile {tile}: the window covers the whole grid"
    return None


def resolve_preset(preset: SparsePreset, grid: Grid, device=None) -> tuple[str, SparsePattern, TiledMask | None]:
    """The preset's choice for `grid`: (description, pattern, the tiled mask built for it or None)."""
    from .factories import PATTERNS, _as_pattern, tiled_3d  # imported on use: PATTERNS names `preset`, below
    grid = check_grid(grid)
    tried = []
    if math.prod(grid) < preset.min_tokens:
        tried.append(f"{math.prod(grid)} tokens < min_tokens={preset.min_tokens}")
    for tile in preset.tiles if not tried else ():
        why = _unsuited(grid, tile, preset.window)
        if why:
            tried.append(why)
            continue
        tiled = tiled_window_mask(grid, tile, preset.window, preset.block_size, device)
        density = tiled.density()
        if density <= preset.max_density:
            text = f"tiled_3d(tile={tile}, window={preset.window}, block_size={preset.block_size}), density {density:.3f}"
            return text, tiled_3d(tile, preset.window, preset.block_size), tiled
        tried.append(f"tile {tile} keeps {density:.2f} of the block pairs (> {preset.max_density})")
    text = f"{preset.fallback}(block_size={preset.block_size}) (fallback: {'; '.join(tried)})"
    return text, _as_pattern(PATTERNS[preset.fallback](block_size=preset.block_size)), None


_LOGGED: set[tuple[str, Grid, str]] = set()  # (family, grid, choice) already logged in this process


class PresetPattern(SparsePattern):
    """The family preset (SPARSE_PRESETS), resolved per latent grid when the grid's masks are built, and logged:
    INFO for a tiled window, WARNING when the grid is too small for one and the preset falls back to dense.
    `resolved` maps each grid seen to the choice made (a description string)."""

    def __init__(self, family: str | None = None):
        if family is not None and family not in SPARSE_PRESETS:
            raise ValueError(f"no sparse attention preset for family {family!r}; presets: {', '.join(SPARSE_PRESETS)}")
        self.family = family
        self.resolved: dict[Grid, str] = {}
        self._inner: dict[Grid, SparsePattern] = {}

    def for_family(self, family: str) -> "PresetPattern":
        """This preset bound to `family` (apply time, from the model's class), unless one was given."""
        return self if self.family is not None else PresetPattern(family)

    def inner(self, grid: Grid) -> SparsePattern:
        if self.family is None:
            raise RuntimeError("the 'preset' pattern resolves per model family: apply it to a model (apply_sparse_attention)")
        if grid not in self._inner:
            text, pattern, _ = resolve_preset(SPARSE_PRESETS[self.family], grid)
            self._inner[grid], self.resolved[grid] = pattern, text
            if (self.family, grid, text) not in _LOGGED:  # each choice said once a process, not at every patch
                _LOGGED.add((self.family, grid, text))
                fell_back = not isinstance(pattern, TiledPattern)
                logger.log(logging.WARNING if fell_back else logging.INFO,
                           "accel: sparse attention preset %r for latent grid %s: %s%s", self.family, grid, text,
                           " -- no speed-up from sparsity at this size" if fell_back else "")
        return self._inner[grid]

    def build(self, grid, heads, device):
        inner = self.inner(grid)
        return inner, inner.build(grid, heads, device)

    def attend(self, built, q, k, v):
        return built[0].attend(built[1], q, k, v)

    def select_heads(self, built, start, stop):
        return built[0], built[0].select_heads(built[1], start, stop)

    def joint(self, built, num_text):
        return built[0], built[0].joint(built[1], num_text)

    def attend_joint(self, joint, q, k, v, k_text, v_text):
        return joint[0].attend_joint(joint[1], q, k, v, k_text, v_text)


def preset(family: str | None = None) -> PresetPattern:
    """The model family's preset (SPARSE_PRESETS): a sliding-tile window whose tile is chosen per latent grid, or
    dense attention (logged) where the grid is too small for one. family: "wan", "hunyuan_video", or None to take it
    from the model the pattern is applied to."""
    return PresetPattern(family)


def _bind_family(pattern: SparsePattern, family: str) -> SparsePattern:
    """A "preset" pattern (also inside a hybrid) bound to the model's family."""
    if isinstance(pattern, PresetPattern):
        return pattern.for_family(family)
    if isinstance(pattern, HybridPattern) and isinstance(pattern.inner, PresetPattern):
        return HybridPattern(pattern.inner.for_family(family), pattern.dense_every, pattern.dense_layers)
    return pattern
