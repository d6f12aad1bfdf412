"""Mask builders for the patterns this toolkit needs; each classifies block pairs exactly (full / partial / empty).

- `interval_mask`: query i sees keys [lo[i], hi[i]) -- the general form of the two below;
- `block_diagonal_mask` / `block_causal_mask`: variable-length segments (HMAR / VAR scales 1, 4, 9, ... 256
  tokens), not aligned to the block size: token-level edges inside boundary blocks are exact;
- `local_3d_mask`: 3-D local windows over a (frames, height, width) token grid, with optional global tokens;
- `strided_shards_mask`: per-head strided key shards (S2-Attention): the union over heads is everything;
- `window_global_random_mask`: Orion-MSP's windowed + global + seeded random blocks.
Tile-order patterns (3-D windows as whole blocks, criss-cross) are in tile_order.py.
Block tables are O(N^2 / block^2); nothing here materialises an N x N mask.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .mask import (
    COORD_BITS, COORD_LIMIT, BlockSparseMask, check_block_size, check_length, from_block_tables, is_int, num_blocks,
    pad_to_blocks,
)

_CHUNK_ELEMENTS = 1 << 22  # bounds the temporaries of the exact classifications below


def interval_mask(
    lo: torch.Tensor, hi: torch.Tensor, kv_len: int, block_size: int = 128
) -> BlockSparseMask:
    """Query i sees the keys j with lo[i] <= j < hi[i] (clamped to [0, kv_len]); shared by batches and heads."""
    check_block_size(block_size)
    check_length("kv_len", kv_len)
    lo, hi = torch.as_tensor(lo), torch.as_tensor(hi)
    if lo.is_floating_point() or hi.is_floating_point() or torch.bool in (lo.dtype, hi.dtype):
        raise TypeError(f"lo and hi must be integer tensors, got {lo.dtype}, {hi.dtype}")
    if lo.ndim != 1 or lo.shape != hi.shape or len(lo) == 0:
        raise ValueError(f"lo and hi must be non-empty 1-D tensors of equal length, got {tuple(lo.shape)}, {tuple(hi.shape)}")
    lo = lo.long().clamp(0, kv_len)
    hi = torch.maximum(hi.long().clamp(0, kv_len), lo)
    q_len, device = lo.shape[0], lo.device
    starts = torch.arange(num_blocks(kv_len, block_size), device=device) * block_size
    ends = (starts + block_size).clamp(max=kv_len)
    lo_p, hi_p = pad_to_blocks(lo, block_size), pad_to_blocks(hi, block_size)
    step = max(block_size, _CHUNK_ELEMENTS // len(starts) // block_size * block_size)
    full, listed = [], []
    for r in range(0, lo_p.shape[0], step):
        # Tokens of [lo, hi) in each key block, per query row; then all / any over the rows of a query block.
        overlap = (torch.minimum(hi_p[r : r + step, None], ends) - torch.maximum(lo_p[r : r + step, None], starts)).clamp(min=0)
        overlap = overlap.view(-1, block_size, len(starts))
        full.append((overlap == (ends - starts)).all(1))
        listed.append((overlap > 0).any(1))
    full_t, listed_t = torch.cat(full)[None, None], torch.cat(listed)[None, None]
    return from_block_tables(full_t, listed_t & ~full_t, q_len, kv_len, block_size, "interval", torch.stack([lo, hi], 1))


def _segment_bounds(lengths: Sequence[int] | torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
    if lengths.ndim != 1 or lengths.numel() == 0 or bool((lengths <= 0).any()):
        raise ValueError(f"segment lengths must be a non-empty 1-D sequence of positive integers, got {lengths.tolist()}")
    ends = lengths.cumsum(0)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    return (ends - lengths)[segment], ends[segment]


def block_diagonal_mask(lengths: Sequence[int] | torch.Tensor, block_size: int = 128, device=None) -> BlockSparseMask:
    """Each token sees exactly the tokens of its own segment (HMAR's Markovian scales)."""
    start, end = _segment_bounds(lengths, device)
    return interval_mask(start, end, int(end[-1]), block_size)


def block_causal_mask(lengths: Sequence[int] | torch.Tensor, block_size: int = 128, device=None) -> BlockSparseMask:
    """Each token sees its own segment and all earlier ones (VAR's next-scale mask)."""
    start, end = _segment_bounds(lengths, device)
    return interval_mask(torch.zeros_like(start), end, int(end[-1]), block_size)


def _box_sum(x: torch.Tensor, dim: int, radius: int) -> torch.Tensor:
    """Sum over a window [t - radius, t + radius] along `dim`, clipped at the edges (exact, integer)."""
    length = x.shape[dim]
    csum = torch.nn.functional.pad(x.cumsum(dim).movedim(dim, -1), (1, 0)).movedim(-1, dim)
    t = torch.arange(length, device=x.device)
    return csum.index_select(dim, (t + radius + 1).clamp(max=length)) - csum.index_select(dim, (t - radius).clamp(min=0))


def _grid_pair_counts(grid: tuple[int, int, int], radius: tuple[int, int, int], offset: int, seq_len: int, block_size: int,
                      device) -> torch.Tensor:
    """count[I, J]: (query, key) pairs of grid tokens in block pair (I, J) that lie within the window.

    The window is a separable box, so for one key block J the number of its keys near each query token is a
    3-D box sum of J's indicator (three cumulative sums): O(Mk * N) work in all, no N x N intermediate.
    """
    n_grid = grid[0] * grid[1] * grid[2]
    m = num_blocks(seq_len, block_size)
    block_of = (torch.arange(n_grid, device=device) + offset) // block_size
    counts = torch.zeros(m, m, dtype=torch.long, device=device)
    step = max(1, _CHUNK_ELEMENTS // n_grid)
    for j0 in range(0, m, step):
        blocks = torch.arange(j0, min(j0 + step, m), device=device)
        near = (block_of[None, :] == blocks[:, None]).to(torch.int32).view(-1, *grid)
        for axis, r in enumerate(radius):
            near = _box_sum(near, axis + 1, r)
        per_query_block = torch.zeros(len(blocks), m, dtype=torch.long, device=device)
        per_query_block.index_add_(1, block_of, near.view(len(blocks), n_grid).long())
        counts[:, j0 : j0 + len(blocks)] = per_query_block.T
    return counts


def _int_triple(x) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 3 and all(is_int(i) for i in x)


def check_window(grid, radius) -> None:
    """A (frames, height, width) token grid and window radii; the grid may be None (checking a radius alone)."""
    if grid is not None and not (_int_triple(grid) and 1 <= min(grid) and max(grid) <= COORD_LIMIT):
        raise ValueError(f"grid must be 3 ints (frames, height, width) in [1, {COORD_LIMIT}], got {grid!r}")
    if not (_int_triple(radius) and min(radius) >= 0):
        raise ValueError(f"radius must be 3 ints >= 0 (frames, height, width), got {radius!r}")


def local_3d_mask(
    grid: tuple[int, int, int],
    radius: tuple[int, int, int],
    block_size: int = 128,
    num_global: int = 0,
    global_first: bool = True,
    device=None,
) -> BlockSparseMask:
    """3-D local windows for video DiTs: tokens in (frame, row, col) raster order over `grid`; token (f, h, w)
    sees the keys with |df| <= radius[0], |dh| <= radius[1], |dw| <= radius[2].

    num_global tokens (text, registers), placed before the grid (global_first) or after it, see every key and
    are seen by every query. Shared by batches and heads.
    """
    check_block_size(block_size)
    check_window(grid, radius)
    if not is_int(num_global) or num_global < 0:
        raise ValueError(f"num_global must be an int >= 0, got {num_global!r}")
    grid, radius = tuple(grid), tuple(radius)
    n_grid = grid[0] * grid[1] * grid[2]
    seq_len, offset = n_grid + num_global, (num_global if global_first else 0)

    f, h, w = torch.meshgrid(*(torch.arange(g, device=device) for g in grid), indexing="ij")
    packed = ((f << 2 * COORD_BITS) | (h << COORD_BITS) | w).flatten()
    coords = torch.full((seq_len,), -1, dtype=torch.long, device=device)
    coords[offset : offset + n_grid] = packed

    bs, m = block_size, num_blocks(seq_len, block_size)
    pos = torch.arange(seq_len, device=device)
    tokens = torch.bincount(pos // bs, minlength=m)
    glob = torch.bincount(pos // bs, weights=(coords < 0).double(), minlength=m).long()
    grid_pairs = _grid_pair_counts(grid, radius, offset, seq_len, bs, device)
    # A pair is allowed if either token is global, or both are grid tokens within the window.
    allowed = grid_pairs + tokens[:, None] * tokens[None, :] - (tokens - glob)[:, None] * (tokens - glob)[None, :]
    full = allowed == tokens[:, None] * tokens[None, :]
    partial = (allowed > 0) & ~full
    return from_block_tables(full[None, None], partial[None, None], seq_len, seq_len, bs, "box3d", coords, coords, radius)


def check_shards(num_shards: int, local_blocks: int) -> None:
    """The head-independent arguments of `strided_shards_mask`."""
    if not is_int(num_shards) or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
    if not is_int(local_blocks) or local_blocks < 0:
        raise ValueError(f"local_blocks must be an int >= 0, got {local_blocks!r}")


def strided_shards_mask(
    num_heads: int, seq_len: int, num_shards: int, local_blocks: int = 1, block_size: int = 128, device=None
) -> BlockSparseMask:
    """S2-Attention-style heterogeneous heads: head h sees the key blocks j with j % num_shards == h % num_shards,
    plus the local blocks |i - j| < local_blocks around the diagonal. With num_shards <= num_heads the union over
    heads covers every key block.
    """
    check_block_size(block_size)
    check_length("seq_len", seq_len)
    check_shards(num_shards, local_blocks)
    if not is_int(num_heads) or num_shards > num_heads:
        raise ValueError(
            f"num_shards must be in [1, num_heads={num_heads!r}] so the heads' union covers all keys, got {num_shards}"
        )
    m = num_blocks(seq_len, block_size)
    i = torch.arange(m, device=device)
    heads = torch.arange(num_heads, device=device)
    shard = (i[None, None, :] % num_shards) == (heads[:, None, None] % num_shards)
    local = (i[:, None] - i[None, :]).abs() < local_blocks
    table = (shard | local[None]).expand(num_heads, m, m)[None]
    return from_block_tables(table, torch.zeros_like(table), seq_len, seq_len, block_size)


def window_global_random_mask(
    num_heads: int, seq_len: int, window_blocks: int = 2, global_blocks: int = 1, random_blocks: int = 2,
    seed: int = 0, block_size: int = 128, device=None,
) -> BlockSparseMask:
    """Orion-MSP's block-sparse pattern (BigBird's shape): query block i sees key blocks j with |i - j| <=
    window_blocks, the first `global_blocks` key blocks (which also see every key block), and `random_blocks`
    further key blocks drawn per (head, query block) from a generator seeded with `seed` (the same mask for the same
    arguments, on any device). A pure block table; heads differ only by their random blocks."""
    check_block_size(block_size)
    check_length("seq_len", seq_len)
    for name, value in (("num_heads", num_heads), ("window_blocks", window_blocks), ("global_blocks", global_blocks),
                        ("random_blocks", random_blocks), ("seed", seed)):
        if not is_int(value) or value < (1 if name == "num_heads" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'num_heads' else 0}, got {value!r}")
    m = num_blocks(seq_len, block_size)
    i = torch.arange(m)
    table = ((i[:, None] - i[None, :]).abs() <= window_blocks) | (i[None, :] < global_blocks) | (i[:, None] < global_blocks)
    table = table.expand(num_heads, m, m).clone()
    if random_blocks:
        # Random scores per (head, query block, key block), drawn on the CPU so that the mask does not depend on the
        # device; the random_blocks highest of each row are added (they may repeat blocks already listed).
        g = torch.Generator().manual_seed(seed)
        picks = torch.rand(num_heads, m, m, generator=g).topk(min(random_blocks, m), dim=-1).indices
        table.scatter_(-1, picks, True)
    table = table.to(device)[None]
    return from_block_tables(table, torch.zeros_like(table), seq_len, seq_len, block_size)
