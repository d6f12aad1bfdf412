"""The sparse attention patterns: `SparsePattern` and the classes the factories (factories.py) return.

A pattern turns the latent token grid (frames, height, width after patching) and the head count into what the kernel
needs, built once per grid (`SparsePattern.build`) and reused by every layer and step; `SparsePattern.attend` runs q,
k, v through `accel.kernels.block_sparse_attention`. A fixed mask per grid is a `MaskPattern`. Patterns beyond one
fixed mask (`SparsePattern`):
- tile order (`tiled_3d`, `criss_cross`, `window_global_random`): q, k, v are gathered into tile order after the
  rotary embedding, the kernel runs a pure block table, and the output is gathered back (tile_order.py);
- `dynamic`: a mask chosen per call from the current q and k on the GPU (dynamic_mask.py), no host sync;
- `pbs`: PBS-Attn, keys permuted within frames by importance before a dynamic mask (pbs.py);
- `hybrid`: LongGen's schedule, some layers left with their original dense processor;
- `preset` (the default): the model family's entry of SPARSE_PRESETS, a tiled_3d window whose tile is chosen per
  latent grid (dense where the grid is too small for a window to pay), the choice logged once per grid
  (presets.py).

Joint image-text attention (HunyuanVideo, hunyuan_video.py): `SparsePattern.joint` extends what a pattern built by
the text keys (`joint_mask`: text keys after the image keys, padded to a block boundary), which every image query
sees; patterns chosen from q and k (`dynamic`, `pbs`) have no joint form.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from accel.kernels.block_sparse import BlockSparseMask, block_sparse_attention
from accel.kernels.block_sparse import attention as _attention_module
from accel.kernels.block_sparse.dynamic_mask import (
    DeviceBlockSparseMask, check_selection, dynamic_block_mask, dynamic_block_mask_reference, partial_lists,
)
from accel.kernels.block_sparse.mask import COORD_BITS, COORD_LIMIT, from_block_tables, is_int, num_blocks
from accel.kernels.block_sparse.pbs import pbs_block_sparse_attention
from accel.kernels.block_sparse.tile_order import TiledMask, tile_permutation

Grid = tuple[int, int, int]
Pattern = Callable[[Grid, int, torch.device], BlockSparseMask]  # (grid, heads, device) -> mask


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
