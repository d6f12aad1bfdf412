"""Block-sparse self-attention for diffusers video transformers (WanTransformer3DModel's `attn1` layers; the
image-image part of HunyuanVideoTransformer3DModel's joint image-text attention).

    restore = apply_sparse_attention(transformer, pattern="preset")     # or "local_3d", local_3d(radius=(2, 8, 8)), ...
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
- `hybrid`: LongGen's schedule, some layers left with their original dense processor;
- `preset` (the default): the model family's entry of SPARSE_PRESETS, a tiled_3d window whose tile is chosen per
  latent grid (dense where the grid is too small for a window to pay), the choice logged once per grid.

HunyuanVideo's blocks attend over [image tokens, text tokens]: image queries see the image keys the pattern allows
plus every text key the attention mask leaves in (joint_mask: text keys after the image keys, padded to a block
boundary), text queries every valid key (SDPA). Patterns chosen from q and k (`dynamic`, `pbs`) are refused there, as
is context parallelism. SANA / SANA-Video self-attention is linear (no softmax): refused, pointing to the
`linear_attention_kernels` method.

Under diffusers' Ulysses context parallelism (`ContextParallelConfig(ulysses_degree=N)`) each rank's layers hold a
shard of the sequence: as diffusers' own Ulysses attention does, an all-to-all gives each rank the whole sequence of
H/N heads, the pattern attends there with its mask restricted to those heads, and an all-to-all takes the output
back. Ring attention is refused (each rank would hold a shard of the keys, which the masks cannot index).
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import math
import re
from typing import TYPE_CHECKING, Callable, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.distributed._functional_collectives as funcol

from accel.diffusers_internals import get_wan_qkv_projections
from accel.kernels.block_sparse import BlockSparseMask, block_sparse_attention, local_3d_mask, strided_shards_mask, table_mask
from accel.kernels.block_sparse import attention as _attention_module
from accel.kernels.block_sparse.dynamic_mask import (
    DeviceBlockSparseMask, check_selection, dynamic_block_mask, dynamic_block_mask_reference, partial_lists,
)
from accel.kernels.block_sparse.mask import COORD_BITS, COORD_LIMIT, check_block_size, from_block_tables, is_int, num_blocks
from accel.kernels.block_sparse.patterns import check_shards, check_window, window_global_random_mask
from accel.kernels.block_sparse.pbs import pbs_block_sparse_attention
from accel.kernels.block_sparse.tile_order import (
    TiledMask, check_grid, check_tile, check_tile_window, criss_cross_mask, tile_grid, tile_permutation,
    tiled_window_mask,
)
from accel.parallel import context_parallel

if TYPE_CHECKING:
    from diffusers import ContextParallelConfig

Grid = tuple[int, int, int]
Pattern = Callable[[Grid, int, torch.device], BlockSparseMask]  # (grid, heads, device) -> mask
SUPPORTED = ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel")
FAMILIES = {"WanTransformer3DModel": "wan", "HunyuanVideoTransformer3DModel": "hunyuan_video"}
# Models whose self-attention is linear (ReLU kernels, no softmax): block-sparse softmax masks do not apply.
LINEAR_ATTENTION_MODELS = ("SanaVideoTransformer3DModel", "SanaTransformer2DModel", "CausalSanaVideoTransformer3DModel")
logger = logging.getLogger("accel")


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

    # Joint attention (HunyuanVideo: image and text tokens in one sequence). The pattern covers image-image pairs;
    # image queries also see every (valid) text key. `joint` extends what `build` made by `num_text` text keys placed
    # after the image keys (joint_mask); `attend_joint` attends image queries (B, N, H, D) over the image keys and
    # text keys (B, T, H, D) and returns the image rows in their order.
    def joint(self, built, num_text: int):
        raise NotImplementedError(f"{type(self).__name__} cannot run in joint image-text attention (HunyuanVideo): "
                                  f"use a fixed-mask or tile-order pattern (\"preset\", \"tiled_3d\", \"local_3d\", "
                                  f"\"dense\", \"criss_cross\", \"window_global_random\", or \"hybrid\" of one)")

    def attend_joint(self, joint, q, k, v, k_text, v_text) -> torch.Tensor:
        raise NotImplementedError


PAD_COORD = (COORD_LIMIT - 1) << (2 * COORD_BITS)  # box3d coordinate (frame 1023, row 0, col 0) of padding keys


def joint_mask(mask: BlockSparseMask, num_text: int) -> BlockSparseMask:
    """`mask` (image queries x image keys) extended by `num_text` text keys that every query sees.

    Keys are laid out [image keys, P padding keys, text keys], P = the padding that makes the text start on a block
    boundary, so that no key block mixes image keys the pattern leaves out with text keys every query needs. The
    padding keys are masked by the box3d rule (a coordinate out of every query's window; text keys get the global
    coordinate -1): the image-image pairs are exactly those of `mask`. Rule "none" masks become box3d with radius 0
    and every image token at coordinate 0 (the rule only decides inside partial blocks: the image tail block and the
    last text block)."""
    if mask.rule not in ("none", "box3d"):
        raise NotImplementedError(f"joint image-text attention takes masks of rule 'none' or 'box3d', not {mask.rule!r}")
    if mask.q_len != mask.kv_len:
        raise ValueError(f"an image mask must be square, got {(mask.q_len, mask.kv_len)}")
    if not is_int(num_text) or num_text < 1:
        raise ValueError(f"num_text must be an int >= 1, got {num_text!r}")
    n, bs, device = mask.q_len, mask.block_size, mask.device
    pad = -n % bs
    kv_len = n + pad + num_text
    full, partial = mask.block_tables()  # (B', H', Mq, Mi)
    if pad:  # the image tail block now holds padding keys: decided by the rule
        partial = partial.clone()
        partial[..., -1] |= full[..., -1]
        full = full.clone()
        full[..., -1] = False
    text_blocks = num_blocks(num_text, bs)
    on = torch.ones(*full.shape[:3], text_blocks, dtype=torch.bool, device=device)
    full = torch.cat([full, on], -1)
    partial = torch.cat([partial, torch.zeros_like(on)], -1)
    if mask.rule == "none" and not pad:
        return from_block_tables(full, partial, n, kv_len, bs)
    if mask.rule == "none":
        q_aux = k_img = torch.zeros(n, dtype=torch.int32, device=device)
        radius = (0, 0, 0)
    else:
        q_aux, k_img, radius = mask.q_aux, mask.k_aux, mask.radius
        frames = (q_aux >> (2 * COORD_BITS)) & (COORD_LIMIT - 1)
        if pad and (bool((q_aux < 0).any()) or int(frames.max()) + radius[0] >= COORD_LIMIT - 1):
            raise NotImplementedError("joint attention: this box3d mask has global queries or windows reaching frame "
                                      f"{COORD_LIMIT - 1}, which the padding keys need to stay unseen")
    k_aux = torch.cat([k_img.to(torch.int32), torch.full((pad,), PAD_COORD, dtype=torch.int32, device=device),
                       torch.full((num_text,), -1, dtype=torch.int32, device=device)])
    return from_block_tables(full, partial, n, kv_len, bs, "box3d", q_aux, k_aux, radius)


def _joint_kernel(q, k, v, k_text, v_text, mask: BlockSparseMask) -> torch.Tensor:
    """Image queries (B, N, H, D) over [image keys, zero padding, text keys] with a `joint_mask`."""
    pad = mask.kv_len - q.shape[1] - k_text.shape[1]
    zeros = k.new_zeros(k.shape[0], pad, *k.shape[2:])
    return _kernel(q, torch.cat([k, zeros, k_text], 1), torch.cat([v, zeros, v_text], 1), mask)


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

    def joint(self, built, num_text):
        return joint_mask(built, num_text)

    def attend_joint(self, joint, q, k, v, k_text, v_text):
        return _joint_kernel(q, k, v, k_text, v_text, joint)


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

    def joint(self, built, num_text):
        return dataclasses.replace(built, mask=joint_mask(built.mask, num_text))

    def attend_joint(self, joint, q, k, v, k_text, v_text):
        perm = joint.perm
        q, k, v = (x.index_select(1, perm) for x in (q, k, v))
        return _joint_kernel(q, k, v, k_text, v_text, joint.mask).index_select(1, joint.inverse)


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
        args = (q, k, built["budget"], self.mass, built["width"], built["sink"], built["diagonal"], self.block_size)
        if q.device.type == "cpu" and not _attention_module.INTERPRETED:
            # No Triton on the CPU outside the interpreter: the same selection in PyTorch (dynamic_mask's reference),
            # as block_sparse_attention itself falls back to its reference there.
            full_counts, full_indices, part_counts = dynamic_block_mask_reference(*args)
            mk = num_blocks(k.shape[2], self.block_size)
            part_counts, part_indices = partial_lists(
                tuple(part_counts.shape), part_counts if k.shape[2] % self.block_size else None, mk, q.device)
            return DeviceBlockSparseMask(q.shape[2], k.shape[2], self.block_size, full_counts.to(torch.int32),
                                         full_indices.to(torch.int32), part_counts, part_indices)
        return dynamic_block_mask(*args)

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

    def joint(self, built, num_text):
        return self.inner.joint(built, num_text)

    def attend_joint(self, joint, q, k, v, k_text, v_text):
        return self.inner.attend_joint(joint, q, k, v, k_text, v_text)

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


# Per model family (the transformer's class: FAMILIES). Tile (2, 8, 8) window (1, 1, 1) is the configuration measured
# on Wan-1.3B at 480p / 81 frames (grid (21, 30, 52), density 0.12): 2.03x a dense step on an H200
# (benchmarks/results/sparse_video_h200.json). The other tiles serve grids it does not suit: (1, 8, 16) single frames
# or short clips, (4, 4, 8) narrow frames. HunyuanVideo (head dim 128, like Wan) takes the same block-size tiles; its
# speed is not measured here. SANA-Video has none: its self-attention is linear (no softmax to mask).
SPARSE_PRESETS: dict[str, SparsePreset] = {
    "wan": SparsePreset(tiles=((2, 8, 8), (1, 8, 16), (4, 4, 8)), window=(1, 1, 1), max_density=0.5,
                        note="measured 2.03x a dense Wan-1.3B step (H200) at grid (21, 30, 52), density 0.12"),
    "hunyuan_video": SparsePreset(tiles=((2, 8, 8), (1, 8, 16), (4, 4, 8)), window=(1, 1, 1), max_density=0.5,
                                  note="Wan's tiles (same head dim and block size); not timed on a GPU here"),
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

    def joint_built(self, num_image: int, heads: int, device: torch.device, num_text: int):
        """What the pattern built for the grid, extended by `num_text` text keys (SparsePattern.joint)."""
        key = (self.grid, heads, device, "joint", num_text)
        if key not in self.masks:
            self.masks[key] = self.pattern.joint(self.built(num_image, heads, device), num_text)
        return self.masks[key]


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


class HunyuanVideoSparseAttnProcessor:
    """HunyuanVideoAttnProcessor2_0 (dual- and single-stream blocks) with the image-image attention block-sparse.

    The blocks attend over one sequence [image tokens, text tokens]. Image queries see the image keys the pattern
    allows and every text key the attention mask leaves in (one kernel call per distinct set of valid text keys,
    joint_mask); text queries see every valid key (SDPA with the mask, as diffusers). Projections, q/k norms, the
    rotary embedding of the image tokens and the output projections are diffusers' own."""

    def __init__(self, state: _GridState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise RuntimeError("HunyuanVideoSparseAttnProcessor is for joint image-text attention (text tokens given)")
        if hidden_states.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(
                f"sparse attention needs float16 or bfloat16 activations, got {hidden_states.dtype}: run the model in bf16"
            )
        num_text = encoder_hidden_states.shape[1]
        if attn.add_q_proj is None:  # single-stream blocks: one set of projections over the whole sequence
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = (proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            if attn.add_q_proj is None:
                query, key = (torch.cat([apply_rotary_emb(x[:, :-num_text], image_rotary_emb, sequence_dim=1),
                                         x[:, -num_text:]], dim=1) for x in (query, key))
            else:
                query, key = (apply_rotary_emb(x, image_rotary_emb, sequence_dim=1) for x in (query, key))
        if attn.add_q_proj is not None:  # dual-stream blocks: the text tokens' own projections
            text = [proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                    for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
            if attn.norm_added_q is not None:
                text[0] = attn.norm_added_q(text[0])
            if attn.norm_added_k is not None:
                text[1] = attn.norm_added_k(text[1])
            query, key, value = (torch.cat([x, t], dim=1) for x, t in zip((query, key, value), text))
        out = self.attend(query, key, value, num_text, attention_mask, attn.heads).flatten(2, 3).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :-num_text], out[:, -num_text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

    def attend(self, query, key, value, num_text: int, attention_mask, heads: int) -> torch.Tensor:
        """Joint attention on (B, N + T, H, D): the image rows block-sparse, the text rows dense; (B, N + T, H, D)."""
        b, total = query.shape[:2]
        n = total - num_text
        if self.state.ulysses is not None:
            raise NotImplementedError("sparse attention on HunyuanVideo does not run under context parallelism")
        keep = torch.ones(b, total, dtype=torch.bool, device=query.device)
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool or attention_mask.numel() != b * total:
                raise ValueError(f"sparse attention on HunyuanVideo takes a bool key mask of {b} x {total} tokens "
                                 f"(diffusers' (B, 1, 1, N)), got {attention_mask.dtype} {tuple(attention_mask.shape)}")
            keep = attention_mask.reshape(b, total)
            if not bool(keep[:, :n].all()):
                raise ValueError("sparse attention on HunyuanVideo: the attention mask hides image tokens; only text "
                                 "tokens may be masked")
        text_rows = F.scaled_dot_product_attention(
            query[:, n:].transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            attn_mask=keep[:, None, None, :]).transpose(1, 2)
        image_rows = torch.empty_like(query[:, :n])
        q, k, v = query[:, :n], key[:, :n], value[:, :n]
        groups: dict[tuple, list[int]] = {}  # batch items by their valid text keys
        for i, row in enumerate(keep[:, n:].tolist()):
            groups.setdefault(tuple(j for j, on in enumerate(row) if on), []).append(i)
        for valid, items in groups.items():
            idx = torch.tensor(items, device=query.device)
            qi, ki, vi = (x.index_select(0, idx) for x in (q, k, v))
            if not valid:  # no text key: the pattern alone
                out = self.state.pattern.attend(self.state.built(n, heads, query.device), qi, ki, vi)
            else:
                cols = torch.tensor(valid, device=query.device) + n
                kt, vt = (x.index_select(0, idx).index_select(1, cols) for x in (key, value))
                joint = self.state.joint_built(n, heads, query.device, len(valid))
                out = self.state.pattern.attend_joint(joint, qi, ki, vi, kt, vt)
            image_rows[idx] = out.to(image_rows.dtype)
        return torch.cat([image_rows, text_rows.to(image_rows.dtype)], dim=1)


_PROCESSORS = (WanSparseAttnProcessor, HunyuanVideoSparseAttnProcessor)


def _bind_family(pattern: SparsePattern, family: str) -> SparsePattern:
    """A "preset" pattern (also inside a hybrid) bound to the model's family."""
    if isinstance(pattern, PresetPattern):
        return pattern.for_family(family)
    if isinstance(pattern, HybridPattern) and isinstance(pattern.inner, PresetPattern):
        return HybridPattern(pattern.inner.for_family(family), pattern.dense_every, pattern.dense_layers)
    return pattern


def _check_model(model) -> None:
    name = type(model).__name__
    if name in LINEAR_ATTENTION_MODELS:
        raise NotImplementedError(
            f"sparse attention does not apply to {name}: its self-attention is linear (ReLU kernels, no softmax), so "
            f"block-sparse softmax masks have nothing to mask; use accel.patch(pipe, method=\"linear_attention_kernels\") "
            f"(accel's Triton linear-attention kernels) instead"
        )
    if name not in SUPPORTED:
        raise NotImplementedError(
            f"sparse attention supports {', '.join(SUPPORTED)}, not model={name} (for a pipeline, use "
            f"accel.patch(pipe, method='sparse_attention') or pass pipe.transformer)"
        )


def apply_sparse_attention(
    model: torch.nn.Module, pattern: Union[str, Pattern, BlockSparseMask] = "preset"
) -> Callable[[], None]:
    """Run the self-attention of `model` (WanTransformer3DModel's `attn1`; HunyuanVideoTransformer3DModel's joint
    attention, image-image part) through block-sparse attention.

    pattern: a name of PATTERNS ("local_3d", "strided_shards", "dense", "tiled_3d", "dynamic", "criss_cross",
        "window_global_random", "pbs", "hybrid", "preset": the defaults of the factories of the same names), such a
        name with keyword arguments ("dynamic(budget=0.1)"), a pattern built by those factories, any callable
        (grid, heads, device) -> BlockSparseMask, or a fixed mask. Hybrid patterns replace only their sparse layers.
        "preset" (the default): the model family's preset (SPARSE_PRESETS), its tile chosen per grid and logged.
        On HunyuanVideo, patterns chosen from q and k ("dynamic", "pbs") are refused.
    Returns `restore()`, which puts back the original processor objects and removes the grid hook.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a diffusers transformer), got {type(model).__name__}")
    _check_model(model)
    family = FAMILIES[type(model).__name__]
    _ulysses(model)  # ring attention refused now where parallelism came first
    if family == "wan":
        layers, patch_size, processor_cls = [block.attn1 for block in model.blocks], tuple(model.config.patch_size), WanSparseAttnProcessor
    else:
        if context_parallel(model) is not None:
            raise NotImplementedError("sparse attention on HunyuanVideo does not run under context parallelism")
        layers = [block.attn for block in (*model.transformer_blocks, *model.single_transformer_blocks)]
        patch_size = (model.config.patch_size_t, model.config.patch_size, model.config.patch_size)
        processor_cls = HunyuanVideoSparseAttnProcessor
    if any(isinstance(layer.processor, _PROCESSORS) for layer in layers):
        raise RuntimeError(f"{type(model).__name__} already runs sparse attention; call the restore function first")
    sparse_pattern = _bind_family(_as_pattern(pattern), family)
    if family == "hunyuan_video":
        probe = sparse_pattern.inner if isinstance(sparse_pattern, HybridPattern) else sparse_pattern
        if type(probe).joint is SparsePattern.joint:
            probe.joint(None, 1)  # raises: the pattern has no joint form
    state = _GridState(sparse_pattern, patch_size)
    chosen = state.pattern.sparse_layers(len(layers))
    layers = [layer for layer, sparse in zip(layers, chosen) if sparse]
    originals = [layer.processor for layer in layers]
    hook = model.register_forward_pre_hook(state.record, with_kwargs=True)
    processor = processor_cls(state)
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
