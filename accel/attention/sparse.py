"""Block-sparse self-attention for diffusers video transformers (WanTransformer3DModel's `attn1` layers).

    restore = apply_sparse_attention(transformer, pattern="local_3d")   # or local_3d(radius=(2, 8, 8)), ...
    ...
    restore()                                                           # the original processor objects, exactly

The replacement processor keeps diffusers' projections, q/k RMS norms, rotary embedding and output projection,
and runs the attention through `accel.kernels.block_sparse_attention`. A pattern turns the latent token grid
(frames, height, width after patching) and the head count into a `BlockSparseMask`; the mask is built once per
grid and reused by every layer and step. The grid is read from the transformer's input by a forward pre-hook.
Cross-attention (`attn2`) is left alone. Blocks are not touched, so block-level caches (`cg_taylor`) compose.

Patterns beyond one fixed mask (`SparsePattern`):
- tile order (`tiled_3d`, `criss_cross`, `window_global_random`): q, k, v are gathered into tile order after the
  rotary embedding, the kernel runs a pure block table, and the output is gathered back (tile_order.py);
- `dynamic`: a mask chosen per call from the current q and k on the GPU (dynamic_mask.py), no host sync;
- `pbs`: PBS-Attn, keys permuted within frames by importance before a dynamic mask (pbs.py);
- `hybrid`: LongGen's schedule, some layers left with their original dense processor.

Under diffusers' Ulysses context parallelism (`ContextParallelConfig(ulysses_degree=N)`) each rank's layers hold a
shard of the sequence: as diffusers' own Ulysses attention does, an all-to-all gives each rank the whole sequence of
H/N heads, the pattern attends there with its mask restricted to those heads, and an all-to-all takes the output
back. Ring attention is refused (each rank would hold a shard of the keys, which the masks cannot index).
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from typing import TYPE_CHECKING, Callable, Union

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from accel.diffusers_internals import get_wan_qkv_projections
from accel.kernels.block_sparse import BlockSparseMask, block_sparse_attention, local_3d_mask, strided_shards_mask, table_mask
from accel.kernels.block_sparse.dynamic_mask import check_selection, dynamic_block_mask
from accel.kernels.block_sparse.mask import check_block_size, is_int, num_blocks
from accel.kernels.block_sparse.patterns import check_shards, check_window, window_global_random_mask
from accel.kernels.block_sparse.pbs import pbs_block_sparse_attention
from accel.kernels.block_sparse.tile_order import (
    TiledMask, check_tile, check_tile_window, criss_cross_mask, tile_permutation, tiled_window_mask,
)
from accel.parallel import context_parallel

if TYPE_CHECKING:
    from diffusers import ContextParallelConfig

Grid = tuple[int, int, int]
Pattern = Callable[[Grid, int, torch.device], BlockSparseMask]  # (grid, heads, device) -> mask
SUPPORTED = ("WanTransformer3DModel",)


class SparsePattern:
    """A pattern that needs more than one fixed mask per grid: a token permutation, a mask built per call from q and
    k, or a per-layer schedule. `build` runs once per (grid, heads, device) and its result is cached; `attend` runs
    in every layer the pattern covers, on q, k, v of layout (B, N, H, D) after the rotary embedding, and returns the
    attention output in the same layout and token order."""

    def build(self, grid: Grid, heads: int, device: torch.device):
        raise NotImplementedError

    def attend(self, built, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sparse_layers(self, num_layers: int) -> list[bool]:
        """Which self-attention layers get the sparse processor (the others keep theirs, untouched)."""
        return [True] * num_layers

    def select_heads(self, built, start: int, stop: int):
        """`built` for heads [start, stop) of the `heads` it was built for: a rank's heads under Ulysses."""
        raise NotImplementedError(f"{type(self).__name__} cannot run under Ulysses context parallelism: it does not "
                                  f"say how to restrict what it builds to a rank's heads (SparsePattern.select_heads)")


def _mask_heads(mask: BlockSparseMask, start: int, stop: int) -> BlockSparseMask:
    if mask.shape[1] == 1:  # one pattern for every head
        return mask
    tables = ("full_counts", "full_indices", "partial_counts", "partial_indices")
    return dataclasses.replace(mask, **{name: getattr(mask, name)[:, start:stop].contiguous() for name in tables})


def _kernel(q, k, v, mask) -> torch.Tensor:
    """block_sparse_attention on (B, N, H, D) tensors: (B, H, N, D) views in, the output back as (B, N, H, D)."""
    return block_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)


class MaskPattern(SparsePattern):
    """A fixed mask per grid from a callable (grid, heads, device) -> BlockSparseMask, in raster token order."""

    def __init__(self, build_mask: Pattern):
        self.build_mask = build_mask

    def build(self, grid, heads, device):
        mask = self.build_mask(grid, heads, device)
        if not isinstance(mask, BlockSparseMask):
            raise TypeError(f"the sparse attention pattern must return a BlockSparseMask, got {type(mask).__name__}")
        n = math.prod(grid)
        if (mask.q_len, mask.kv_len) != (n, n):
            raise ValueError(f"pattern built a mask for {(mask.q_len, mask.kv_len)} tokens, the layer has {n}")
        return mask

    def attend(self, built, q, k, v):
        return _kernel(q, k, v, built)

    def select_heads(self, built, start, stop):
        return _mask_heads(built, start, stop)


class TiledPattern(SparsePattern):
    """A block table over the tile order (tile_order.py): q, k, v are gathered into tile order after the rotary
    embedding, the kernel runs on whole blocks, and the output is gathered back into raster order."""

    def __init__(self, build_tiled: Callable[[Grid, int, torch.device], TiledMask]):
        self.build_tiled = build_tiled

    def build(self, grid, heads, device):
        tiled = self.build_tiled(grid, heads, device)
        if not isinstance(tiled, TiledMask) or tiled.perm.numel() != math.prod(grid):
            raise TypeError(f"a tiled pattern must return a TiledMask over the {math.prod(grid)} tokens of the grid")
        return tiled

    def attend(self, built, q, k, v):
        perm = built.perm
        out = _kernel(q.index_select(1, perm), k.index_select(1, perm), v.index_select(1, perm), built.mask)
        return out.index_select(1, built.inverse)

    def select_heads(self, built, start, stop):
        return dataclasses.replace(built, mask=_mask_heads(built.mask, start, stop))


class DynamicPattern(SparsePattern):
    """A block mask chosen per call from the current q and k, on the device (dynamic_mask.py), optionally in tile
    order (pooled blocks are then 3-D tiles of the video rather than strips of rows)."""

    def __init__(self, budget: float, mass: float | None, sink_blocks: int, diagonal: bool, tile, block_size: int):
        self.budget, self.mass, self.sink_blocks, self.diagonal = budget, mass, sink_blocks, diagonal
        self.tile, self.block_size = tile, block_size

    def build(self, grid, heads, device):
        n = math.prod(grid)
        mk = num_blocks(n, self.block_size)
        width = min(mk, max(1, math.ceil(self.budget * mk)))
        forced = min(self.sink_blocks, mk) + int(self.diagonal)
        width = max(width, min(forced, mk))
        budget = None if self.mass is not None else width
        diagonal = self.diagonal and forced <= width
        check_selection(mk, budget, self.mass, min(self.sink_blocks, width), diagonal, width)
        perm = tile_permutation(grid, self.tile, device) if self.tile is not None else None
        return dict(budget=budget, width=width, diagonal=diagonal, sink=min(self.sink_blocks, width), perm=perm)

    def masks(self, built, q, k):
        """The mask this pattern chooses for q, k (B, H, N, D), already in the order it attends in."""
        return dynamic_block_mask(q, k, built["budget"], self.mass, built["width"], built["sink"], built["diagonal"],
                                  self.block_size)

    def attend(self, built, q, k, v):
        if built["perm"] is not None:
            q, k, v = (x.index_select(1, built["perm"][0]) for x in (q, k, v))
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = block_sparse_attention(qt, kt, vt, self.masks(built, qt, kt)).transpose(1, 2)
        return out if built["perm"] is None else out.index_select(1, built["perm"][1])

    def select_heads(self, built, start, stop):
        return built  # the same for every head: each head's mask is chosen from its own q and k


class PBSPattern(SparsePattern):
    """PBS-Attn (pbs.py): keys and values permuted within segments (a frame by default) by importance under the mean
    query, then a dynamic top-k block mask on the permuted keys; queries keep their order."""

    def __init__(self, budget: float, segment, sink_blocks: int, block_size: int):
        self.budget, self.segment, self.sink_blocks, self.block_size = budget, segment, sink_blocks, block_size

    def build(self, grid, heads, device):
        n = math.prod(grid)
        mk = num_blocks(n, self.block_size)
        budget = min(mk, max(1, math.ceil(self.budget * mk), min(self.sink_blocks, mk)))
        segment = grid[1] * grid[2] if self.segment == "frame" else self.segment
        check_selection(mk, budget, None, min(self.sink_blocks, budget), False, budget)
        return dict(budget=budget, segment=segment, sink=min(self.sink_blocks, budget))

    def attend(self, built, q, k, v):
        out = pbs_block_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), built["budget"],
                                         built["segment"], built["sink"], self.block_size)
        return out.transpose(1, 2)

    def select_heads(self, built, start, stop):
        return built  # the same for every head: each head's blocks are chosen from its own q and k


class HybridPattern(SparsePattern):
    """LongGen's hybrid schedule: the layers in `dense_layers` keep their original (dense) processor; the others run
    `inner`."""

    def __init__(self, inner: SparsePattern, dense_every: int, dense_layers):
        self.inner, self.dense_every, self.dense_layers = inner, dense_every, dense_layers

    def build(self, grid, heads, device):
        return self.inner.build(grid, heads, device)

    def attend(self, built, q, k, v):
        return self.inner.attend(built, q, k, v)

    def select_heads(self, built, start, stop):
        return self.inner.select_heads(built, start, stop)

    def sparse_layers(self, num_layers):
        if self.dense_layers is None:
            dense_set = set(range(0, num_layers, self.dense_every))
        else:
            bad = [i for i in self.dense_layers if not -num_layers <= i < num_layers]
            if bad:
                raise ValueError(f"dense_layers {bad} out of range for a model of {num_layers} layers")
            dense_set = {i % num_layers for i in self.dense_layers}
        return [i not in dense_set for i in range(num_layers)]


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


def _ulysses(model: torch.nn.Module) -> ContextParallelConfig | None:
    """The model's context-parallel config where it runs Ulysses over several ranks, else None; an error where the
    sparse processor cannot follow it."""
    cp = context_parallel(model)
    if cp is None:
        return None
    if cp.ring_degree > 1:
        raise ValueError(
            f"sparse attention cannot run under ring attention (ContextParallelConfig(ring_degree={cp.ring_degree})): "
            f"each rank would hold a shard of the keys, which the block masks cannot index; use Ulysses "
            f"(ContextParallelConfig(ulysses_degree=N)), which gives each rank every token of some heads"
        )
    if getattr(cp, "ulysses_anything", False):
        raise ValueError("sparse attention under Ulysses needs equal shards: use ulysses_anything=False, with token "
                         "and head counts divisible by ulysses_degree")
    return cp


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Chunk r of dim 0 goes to rank r of `group`; chunk r of the result came from rank r (differentiable: the
    backward is the same exchange of the gradients)."""
    out = funcol.all_to_all_single_autograd(x.contiguous(), None, None, group)
    # Eager mode wraps the result, to wait at its first use; the Triton kernels need the plain tensor's storage.
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def _sequence_to_heads(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """(B, N/W, H, D), this rank's tokens of every head -> (B, N, H/W, D), every token of this rank's heads.

    Rank r of the group gets heads [r H/W, (r + 1) H/W); the tokens come in rank order, as diffusers' split of the
    sequence hands them out (rank r holds tokens [r N/W, (r + 1) N/W))."""
    b, n, h, d = x.shape
    # Chunk r (sent to rank r): rank r's heads of our tokens. Chunk r received: our heads of rank r's tokens.
    x = _all_to_all(x.reshape(b, n, world, h // world, d).permute(2, 0, 1, 3, 4), group)  # (W, B, N/W, H/W, D)
    return x.permute(1, 0, 2, 3, 4).reshape(b, world * n, h // world, d)


def _heads_to_sequence(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """The inverse of _sequence_to_heads: (B, N, H/W, D) -> (B, N/W, H, D)."""
    b, n, h, d = x.shape  # h = H/W: this rank's heads
    # Chunk r (sent to rank r): our heads of rank r's tokens. Chunk r received: rank r's heads of our tokens.
    x = _all_to_all(x.reshape(b, world, n // world, h, d).transpose(0, 1), group)  # (W, B, N/W, H/W, D)
    return x.permute(1, 2, 0, 3, 4).reshape(b, n // world, world * h, d)


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

    def record(self, module, args, kwargs) -> None:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.grid = tuple(s // p for s, p in zip(latents.shape[2:], self.patch_size))  # the whole grid, unsplit here
        self.ulysses = _ulysses(module)  # read per call: enable_parallelism may come after the patch

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


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan rotary embedding (interleaved pairs), in the same arithmetic."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSparseAttnProcessor:
    """WanAttnProcessor for self-attention with the attention itself block-sparse."""

    def __init__(self, state: _GridState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError("WanSparseAttnProcessor is for self-attention without an attention mask")
        if hidden_states.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"sparse attention needs float16 or bfloat16 activations, got {hidden_states.dtype}: run the model in bf16"
            )
        query, key, value = get_wan_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        if self.state.ulysses is None:
            built = self.state.built(query.shape[1], attn.heads, query.device)
            out = self.state.pattern.attend(built, query, key, value)  # (B, N, H, D)
        else:
            out = self._attend_ulysses(self.state.ulysses, attn.heads, query, key, value)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _attend_ulysses(self, cp: ContextParallelConfig, heads: int, query, key, value) -> torch.Tensor:
        """Attention on this rank's tokens (B, N/W, H, D) through every token of its heads, as diffusers' Ulysses."""
        group, world = cp._ulysses_mesh.get_group(), cp.ulysses_degree
        if heads % world:
            raise ValueError(f"sparse attention under Ulysses needs the head count ({heads}) divisible by "
                             f"ulysses_degree ({world})")
        start = dist.get_rank(group) * (heads // world)  # the heads the first all-to-all sends to this rank
        query, key, value = (_sequence_to_heads(x, group, world) for x in (query, key, value))
        built = self.state.built(query.shape[1], heads, query.device, (start, start + heads // world))
        return _heads_to_sequence(self.state.pattern.attend(built, query, key, value), group, world)


def apply_sparse_attention(
    model: torch.nn.Module, pattern: Union[str, Pattern, BlockSparseMask] = "local_3d"
) -> Callable[[], None]:
    """Run the self-attention of `model` (WanTransformer3DModel) through block-sparse attention.

    pattern: a name of PATTERNS ("local_3d", "strided_shards", "dense", "tiled_3d", "dynamic", "criss_cross",
        "window_global_random", "pbs", "hybrid": the defaults of the factories of the same names), such a name with keyword
        arguments ("dynamic(budget=0.1)"), a pattern built by those factories, any callable
        (grid, heads, device) -> BlockSparseMask, or a fixed mask. Hybrid patterns replace only their sparse layers.
    Returns `restore()`, which puts back the original processor objects and removes the grid hook.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a diffusers transformer), got {type(model).__name__}")
    if type(model).__name__ not in SUPPORTED:
        raise NotImplementedError(
            f"sparse attention supports {', '.join(SUPPORTED)}, not model={type(model).__name__} (for a pipeline, use "
            f"accel.patch(pipe, method='sparse_attention') or pass pipe.transformer)"
        )
    _ulysses(model)  # ring attention refused now where parallelism came first
    layers = [block.attn1 for block in model.blocks]
    if any(isinstance(layer.processor, WanSparseAttnProcessor) for layer in layers):
        raise RuntimeError(f"{type(model).__name__} already runs sparse attention; call the restore function first")
    state = _GridState(_as_pattern(pattern), tuple(model.config.patch_size))
    chosen = state.pattern.sparse_layers(len(layers))
    layers = [layer for layer, sparse in zip(layers, chosen) if sparse]
    originals = [layer.processor for layer in layers]
    hook = model.register_forward_pre_hook(state.record, with_kwargs=True)
    processor = WanSparseAttnProcessor(state)
    for layer in layers:
        layer.set_processor(processor)

    def restore() -> None:
        hook.remove()
        config = getattr(model, "_parallel_config", None)
        for layer, original in zip(layers, originals):
            if getattr(config, "context_parallel_config", None) is not None and hasattr(original, "_parallel_config"):
                # What enable_parallelism gives the processors in place, had it run while ours were: without it the
                # original processor would attend over its rank's shard of the tokens only.
                original._parallel_config = config
            layer.set_processor(original)

    return restore
