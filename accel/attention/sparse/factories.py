"""The pattern factories and their names: what `apply_sparse_attention(model, pattern)` and
`SparseAttentionConfig(pattern)` take.

PATTERNS maps each name to its factory (the factory's defaults for a bare name); "name(key=value, ...)" strings call
it with literal keyword arguments ("dynamic(budget=0.1)", `_parse_call`). `_as_pattern` turns whatever a caller gives
(a name, a factory's result, a callable (grid, heads, device) -> BlockSparseMask, a fixed mask) into a
`SparsePattern` (patterns.py).
"""

from __future__ import annotations

import ast
import math
import re
from typing import Callable, Union

import torch

from accel.kernels.block_sparse import BlockSparseMask, local_3d_mask, strided_shards_mask, table_mask
from accel.kernels.block_sparse.mask import check_block_size, is_int, num_blocks
from accel.kernels.block_sparse.patterns import check_shards, check_window, window_global_random_mask
from accel.kernels.block_sparse.tile_order import (
    TiledMask, check_tile, check_tile_window, criss_cross_mask, tile_permutation, tiled_window_mask,
)

from .patterns import (
    DynamicPattern, Grid, HybridPattern, MaskPattern, Pattern, PBSPattern, SparsePattern, TiledPattern,
)
from .presets import preset


def local_3d(radius: tuple[int, int, int] = (2, 8, 8), block_size: int = 128) -> Pattern:
    """Each latent token sees the tokens within `radius` (frames, rows, cols) of it (video DiT locality)."""
    check_window(None, radius)  # here, not at the first forward
    check_block_size(block_size)
    return lambda grid, heads, device: local_3d_mask(grid, radius, block_size, device=device)


def strided_shards(num_shards: int = 4, local_blocks: int = 1, block_size: int = 128) -> Pattern:
    """S2-Attention-style: head h sees key blocks j = h (mod num_shards), plus the blocks around the diagonal.
    num_shards must not exceed the model's head count (checked when the mask is built)."""
    check_shards(num_shards, local_blocks)
    check_block_size(block_size)
    return lambda grid, heads, device: strided_shards_mask(heads, math.prod(grid), num_shards, local_blocks, block_size, device)


def dense(block_size: int = 128) -> Pattern:
    """Every block: exact dense attention, for checks and baselines (on CUDA block_sparse_attention hands a mask
    that allows every pair to SDPA; the interpreter runs the kernel)."""
    check_block_size(block_size)

    def build(grid: Grid, heads: int, device: torch.device) -> BlockSparseMask:
        m = num_blocks(math.prod(grid), block_size)
        return table_mask(torch.ones(1, 1, m, m, dtype=torch.bool, device=device), math.prod(grid), block_size=block_size)

    return build


def tiled_3d(tile: tuple[int, int, int] = (2, 8, 8), window: tuple[int, int, int] = (1, 1, 1),
             block_size: int = 128) -> TiledPattern:
    """Sliding-tile 3-D windows (STA): tokens in (tf, th, tw) tiles, each query tile sees the tiles within `window`
    tiles on every axis; in tile order a pure block table (Gluon's path on Hopper). Best with tile volume ==
    block_size; other grids and tiles are exact too (tile_order.py says what the mask is then)."""
    tile, window = check_tile(tile), check_tile_window(window)
    check_block_size(block_size)
    return TiledPattern(lambda grid, heads, device: tiled_window_mask(grid, tile, window, block_size, device))


def criss_cross(tile: tuple[int, int, int] = (1, 8, 16), frame_window: int = 1, width: int = 0,
                block_size: int = 128) -> TiledPattern:
    """CCNet's criss-cross over the (h, w) grid, in tiles: a query tile sees its tile row and tile column (`width`
    tiles either side) in the frames within `frame_window` tiles."""
    tile = check_tile(tile)
    check_block_size(block_size)
    if not is_int(frame_window) or frame_window < 0 or not is_int(width) or width < 0:
        raise ValueError(f"frame_window and width must be ints >= 0, got {frame_window!r}, {width!r}")
    return TiledPattern(lambda grid, heads, device: criss_cross_mask(grid, tile, frame_window, width, block_size, device))


def window_global_random(window_blocks: int = 2, global_blocks: int = 1, random_blocks: int = 2, seed: int = 0,
                         tile: tuple[int, int, int] | None = (2, 8, 8), block_size: int = 128) -> SparsePattern:
    """Orion-MSP's block-sparse attention: a window of `window_blocks` blocks either side, `global_blocks` first
    blocks that see and are seen by all, and `random_blocks` random key blocks per query block and head (seeded: the
    same blocks every call). With `tile`, blocks are taken over the tile order (3-D neighbourhoods), else raster."""
    check_block_size(block_size)
    for name, value in (("window_blocks", window_blocks), ("global_blocks", global_blocks),
                        ("random_blocks", random_blocks), ("seed", seed)):
        if not is_int(value) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    tile = None if tile is None else check_tile(tile)

    def build(grid, heads, device):
        mask = window_global_random_mask(heads, math.prod(grid), window_blocks, global_blocks, random_blocks, seed,
                                         block_size, device)
        if tile is None:
            return TiledMask(mask, *(torch.arange(math.prod(grid), device=device),) * 2, grid, (1, 1, 1))
        return TiledMask(mask, *tile_permutation(grid, tile, device), grid, tile)

    return TiledPattern(build)


def dynamic(budget: float = 0.25, mass: float | None = None, sink_blocks: int = 1, diagonal: bool = True,
            tile: tuple[int, int, int] | None = (2, 8, 8), block_size: int = 128) -> DynamicPattern:
    """Dynamic block masks chosen on the GPU from the current q and k (per layer, step, batch and head; no host sync).

    budget: share of key blocks each query block attends to (top-k of pooled block scores; the knob); with `mass` in
    (0, 1], the fewest top blocks holding that share of the pooled softmax, at most `budget` of the blocks.
    sink_blocks first blocks and the diagonal block are always on (within the budget). tile: choose blocks over the
    tile order (3-D tiles pool better than raster strips) or None for raster order."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a share of key blocks in (0, 1], got {budget!r}")
    if mass is not None and not (isinstance(mass, float) and 0.0 < mass <= 1.0):
        raise ValueError(f"mass must be None or a float in (0, 1], got {mass!r}")
    if not is_int(sink_blocks) or sink_blocks < 0:
        raise ValueError(f"sink_blocks must be an int >= 0, got {sink_blocks!r}")
    if not isinstance(diagonal, bool):
        raise TypeError(f"diagonal must be a bool, got {diagonal!r}")
    check_block_size(block_size)
    return DynamicPattern(float(budget), mass, sink_blocks, diagonal, None if tile is None else check_tile(tile),
                          block_size)


def pbs(budget: float = 0.25, segment="frame", sink_blocks: int = 1, block_size: int = 128) -> PBSPattern:
    """PBS-Attn: keys permuted within segments ("frame": the tokens of a latent frame; or a token count) so that the
    important ones share blocks, then top-k blocks (a `budget` share of them) per query block, chosen on the GPU."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a share of key blocks in (0, 1], got {budget!r}")
    if segment != "frame" and (not is_int(segment) or segment < 1):
        raise ValueError(f"segment must be 'frame' or a token count >= 1, got {segment!r}")
    if not is_int(sink_blocks) or sink_blocks < 0:
        raise ValueError(f"sink_blocks must be an int >= 0, got {sink_blocks!r}")
    check_block_size(block_size)
    return PBSPattern(float(budget), segment, sink_blocks, block_size)


def hybrid(pattern: Union[str, Pattern, SparsePattern, BlockSparseMask] = "tiled_3d", dense_every: int = 3,
           dense_layers=None) -> HybridPattern:
    """LongGen's hybrid layers: every `dense_every`-th layer (0, dense_every, ...) keeps dense attention -- 1/3 of
    them by default -- or exactly the layers listed in `dense_layers`; the others run `pattern`."""
    if not is_int(dense_every) or dense_every < 1:
        raise ValueError(f"dense_every must be an int >= 1, got {dense_every!r}")
    if dense_layers is not None and not (isinstance(dense_layers, (list, tuple)) and all(is_int(i) for i in dense_layers)):
        raise ValueError(f"dense_layers must be a list of layer indices, got {dense_layers!r}")
    inner = _as_pattern(pattern)
    if isinstance(inner, HybridPattern):
        raise ValueError("a hybrid pattern cannot wrap another hybrid pattern")
    return HybridPattern(inner, dense_every, None if dense_layers is None else tuple(dense_layers))


PATTERNS: dict[str, Callable[..., Union[Pattern, SparsePattern]]] = {
    "local_3d": local_3d,
    "strided_shards": strided_shards,
    "dense": dense,
    "tiled_3d": tiled_3d,
    "dynamic": dynamic,
    "criss_cross": criss_cross,
    "window_global_random": window_global_random,
    "pbs": pbs,
    "hybrid": hybrid,
    "preset": preset,
}
_CALL = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$", re.S)


def _parse_call(text: str) -> SparsePattern | Pattern:
    """"name(key=value, ...)" with literal values, e.g. "dynamic(budget=0.1)" (for string-only settings: the CLI)."""
    name, args = _CALL.match(text).groups()
    if name not in PATTERNS:
        raise ValueError(f"unknown sparse attention pattern {name!r}; available: {', '.join(map(repr, PATTERNS))}")
    try:
        call = ast.parse(f"f({args})", mode="eval").body
        if call.args:
            raise ValueError("positional arguments")
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as err:
        raise ValueError(f"sparse attention pattern {text!r}: give keyword arguments with literal values "
                         f"(e.g. \"dynamic(budget=0.1)\"): {err}") from None
    return PATTERNS[name](**kwargs)


def _as_pattern(pattern: Union[str, Pattern, SparsePattern, BlockSparseMask]) -> SparsePattern:
    if isinstance(pattern, str):
        if _CALL.match(pattern):
            return _as_pattern(_parse_call(pattern))
        if pattern not in PATTERNS:
            raise ValueError(f"unknown sparse attention pattern {pattern!r}; available: {', '.join(map(repr, PATTERNS))}")
        return _as_pattern(PATTERNS[pattern]())
    if isinstance(pattern, SparsePattern):
        return pattern
    if isinstance(pattern, BlockSparseMask):
        return MaskPattern(lambda grid, heads, device: pattern.to(device))
    if callable(pattern):
        return MaskPattern(pattern)
    names = list(map(repr, PATTERNS))
    raise TypeError(
        f"pattern must be a name ({', '.join(names[:3])}) or one of the video patterns ({', '.join(names[3:])}), "
        f"optionally with arguments (\"dynamic(budget=0.1)\"), a BlockSparseMask, a SparsePattern or a callable "
        f"(grid, heads, device) -> mask, got {type(pattern).__name__}"
    )
