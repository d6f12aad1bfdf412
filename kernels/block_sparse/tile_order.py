"""Tile order for video tokens: 3-D windows (and other tile-level patterns) as whole blocks, for the block-table path.

Video DiTs lay their latent tokens out in (frame, row, col) raster order. A 3-D local window in that order touches
nearly every key block only partly (a block of 128 tokens is ~2.5 rows of one frame), so it needs a token rule and
runs on the slow partial-block path (209-217 TFLOP/s on computed blocks, against ~600 for block tables on an H200).
Sliding Tile Attention's remedy: cut the grid into tiles of (tf, th, tw) tokens, lay the tokens out tile after tile
(tiles in raster order over the tile grid, the tokens of a tile in raster order inside it), and define the window in
tiles: a query of tile T sees the keys of the tiles within `window` tiles of T on every axis. Every query of a tile
then has the same key set, which in tile order is a union of contiguous runs of whole tiles: with a tile volume equal
to the block size it is a union of whole blocks, i.e. a plain block table (rule "none"), the Gluon kernel's path.

Grids that are not multiples of the tile: the edge tiles are smaller (no padding tokens: every token attends as
usual), so the blocks of the tiled sequence no longer coincide with tiles. The table is then built at block level:
block pair (I, J) is listed iff some tile of block I and some tile of block J are within the window, so each query
sees the union of its block's tiles' windows -- exactly the tile window inside the grid, a superset of it at the
ragged edges. The attention is exact for that token mask (`TiledMask.token_mask`): nothing is approximated inside the
kernel, and tests compare against the float64 masked reference of the same mask in the original token order.

Permutation convention: `perm[p]` is the raster index of the token at tiled position p (x_tiled = x[:, perm]), and
`inverse[i]` the tiled position of raster token i (x = x_tiled[:, inverse]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .mask import COORD_LIMIT, BlockSparseMask, check_block_size, is_int, num_blocks, table_mask


def _int_triple(x) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 3 and all(is_int(i) for i in x)


def check_grid(grid) -> tuple[int, int, int]:
    if not (_int_triple(grid) and 1 <= min(grid) and max(grid) <= COORD_LIMIT):
        raise ValueError(f"grid must be 3 ints (frames, height, width) in [1, {COORD_LIMIT}], got {grid!r}")
    return tuple(int(g) for g in grid)


def check_tile(tile) -> tuple[int, int, int]:
    if not (_int_triple(tile) and min(tile) >= 1):
        raise ValueError(f"tile must be 3 ints >= 1 (frames, height, width), got {tile!r}")
    return tuple(int(t) for t in tile)


def check_tile_window(window) -> tuple[int, int, int]:
    if not (_int_triple(window) and min(window) >= 0):
        raise ValueError(f"window must be 3 ints >= 0 (tiles along frames, height, width), got {window!r}")
    return tuple(int(w) for w in window)


def tile_grid(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> tuple[int, int, int]:
    """Tiles along each axis (the last ones ragged where the grid is not a multiple of the tile)."""
    return tuple(-(-g // t) for g, t in zip(grid, tile))


def tile_permutation(grid, tile, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse), int64 (N,): tiled position -> raster index, and raster index -> tiled position.

    Tiled order: tiles in raster order over the tile grid; inside a tile, its tokens in raster order. Sorting the
    raster tokens by (tile index, raster index) gives exactly that order, with ragged edge tiles included."""
    grid, tile = check_grid(grid), check_tile(tile)
    n = math.prod(grid)
    f, h, w = torch.meshgrid(*(torch.arange(g, device=device) for g in grid), indexing="ij")
    nt = tile_grid(grid, tile)
    tile_id = ((f // tile[0]) * nt[1] + h // tile[1]) * nt[2] + w // tile[2]
    # Stable sort by tile id keeps raster order inside each tile.
    perm = torch.sort(tile_id.flatten(), stable=True).indices
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=perm.device)
    return perm, inverse


def tile_coords_of_positions(grid, tile, perm: torch.Tensor) -> torch.Tensor:
    """(N, 3) int64: the tile coordinate (frame tile, row tile, col tile) of each tiled position."""
    hw = grid[1] * grid[2]
    r = perm
    coords = torch.stack([r // hw // tile[0], (r // grid[2]) % grid[1] // tile[1], r % grid[2] // tile[2]], 1)
    return coords


@dataclass(frozen=True)
class TiledMask:
    """A block-sparse mask over the tiled token order, with the permutation that takes raster order there.

    mask: the kernel's mask for the permuted sequence (q, k, v gathered by `perm`); perm / inverse: see the module
    docstring. Attention in raster order = kernel(q[:, perm], k[:, perm], v[:, perm], mask)[:, inverse]."""

    mask: BlockSparseMask
    perm: torch.Tensor
    inverse: torch.Tensor
    grid: tuple[int, int, int]
    tile: tuple[int, int, int]

    def to(self, device) -> "TiledMask":
        return TiledMask(self.mask.to(device), self.perm.to(device), self.inverse.to(device), self.grid, self.tile)

    def token_mask(self) -> torch.Tensor:
        """The token mask in raster order, bool (B', H', N, N): materialises N^2, small sizes only (tests)."""
        tiled = self.mask.to_dense()
        return tiled[:, :, self.inverse][:, :, :, self.inverse]

    def density(self) -> float:
        return self.mask.density()


def tiled_block_mask(grid, tile, tile_table: torch.Tensor, block_size: int = 128) -> TiledMask:
    """A tile-level pattern as a block table over the tiled order.

    tile_table: bool (T, T) or (H, T, T) over the T tiles (raster order over the tile grid): tile pair (a, b) allowed.
    Block pair (I, J) is listed iff some tile of block I and some tile of block J form an allowed pair (exact when
    tiles are whole blocks; at ragged edges each block sees the union of its tiles' sets)."""
    grid, tile = check_grid(grid), check_tile(tile)
    check_block_size(block_size)
    nt = tile_grid(grid, tile)
    n_tiles = math.prod(nt)
    if tile_table.dtype != torch.bool or tile_table.shape[-2:] != (n_tiles, n_tiles) or tile_table.ndim not in (2, 3):
        raise ValueError(f"tile_table must be bool (T, T) or (H, T, T) with T = {n_tiles} tiles, got "
                         f"{tile_table.dtype} {tuple(tile_table.shape)}")
    device = tile_table.device
    perm, inverse = tile_permutation(grid, tile, device)
    n = perm.numel()
    m = num_blocks(n, block_size)
    c = tile_coords_of_positions(grid, tile, perm)
    tile_of_pos = (c[:, 0] * nt[1] + c[:, 1]) * nt[2] + c[:, 2]
    # Incidence (M, T): block I holds a token of tile t. Tiles are contiguous, so each block meets few tiles.
    incidence = torch.zeros(m, n_tiles, dtype=torch.float32, device=device)
    incidence[torch.arange(n, device=device) // block_size, tile_of_pos] = 1.0
    table = tile_table.float() if tile_table.ndim == 3 else tile_table.float()[None]
    # Counts <= T^2 < 2^24 stay exact in float32.
    blocks = (incidence[None] @ table @ incidence.T[None]) > 0  # (H', M, M)
    mask = table_mask(blocks[None], n, n, block_size)
    return TiledMask(mask, perm, inverse, grid, tile)


def _tile_centres(nt: tuple[int, int, int], device) -> torch.Tensor:
    a, b, c = torch.meshgrid(*(torch.arange(t, device=device) for t in nt), indexing="ij")
    return torch.stack([a.flatten(), b.flatten(), c.flatten()], 1)  # (T, 3)


def tiled_window_mask(grid, tile=(2, 8, 8), window=(1, 1, 1), block_size: int = 128, device=None) -> TiledMask:
    """Sliding-tile 3-D windows: a query of tile (a, b, c) sees the keys of the tiles (a', b', c') with
    |a - a'| <= window[0], |b - b'| <= window[1], |c - c'| <= window[2] (window in tiles). Shared by batches and heads.

    With tile volume == block_size (e.g. (2, 8, 8) for 128) and a grid that is a multiple of the tile, every listed
    block pair is a whole tile pair; otherwise see `tiled_block_mask`."""
    grid, tile, window = check_grid(grid), check_tile(tile), check_tile_window(window)
    check_block_size(block_size)
    tc = _tile_centres(tile_grid(grid, tile), device)
    near = ((tc[:, None, :] - tc[None, :, :]).abs() <= torch.tensor(window, device=tc.device)).all(-1)
    return tiled_block_mask(grid, tile, near, block_size)


def criss_cross_mask(grid, tile=(1, 8, 16), frame_window: int = 1, width: int = 0, block_size: int = 128,
                     device=None) -> TiledMask:
    """CCNet's criss-cross attention over the (h, w) grid, in tiles: a query of tile (a, b, c) sees the tiles of its
    tile row (same b) and tile column (same c), `width` tiles either side of each, in the frames within
    `frame_window` tiles. In raster order a column is strided across every block of a frame (no sparsity at block
    level); in tile order it is a run of whole blocks."""
    grid, tile = check_grid(grid), check_tile(tile)
    if not is_int(frame_window) or frame_window < 0 or not is_int(width) or width < 0:
        raise ValueError(f"frame_window and width must be ints >= 0, got {frame_window!r}, {width!r}")
    check_block_size(block_size)
    tc = _tile_centres(tile_grid(grid, tile), device)
    d = (tc[:, None, :] - tc[None, :, :]).abs()
    allowed = (d[..., 0] <= frame_window) & ((d[..., 1] <= width) | (d[..., 2] <= width))
    return tiled_block_mask(grid, tile, allowed, block_size)


def permute_tokens(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x gathered along `dim` by `index` (contiguous result); the PyTorch op the attention processor uses."""
    return x.index_select(dim, index)
