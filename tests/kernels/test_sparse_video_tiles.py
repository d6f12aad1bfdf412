"""Tile order (kernels/block_sparse/tile_order.py): the permutation and its inverse, the tile-window and criss-cross
tables against token-level definitions written out here, and the kernel on the tiled order against the float64
masked reference of the same token mask in the original (raster) order. Grids not multiples of the tile, sequences
not multiples of the block; fresh random inputs; poisoned outputs."""

from __future__ import annotations

import math

import pytest
import torch

from accel.kernels.block_sparse import block_sparse_attention, block_sparse_attention_reference
from accel.kernels.block_sparse import attention as attention_module
from accel.kernels.block_sparse.tile_order import (
    TiledMask, criss_cross_mask, tile_grid, tile_permutation, tiled_block_mask, tiled_window_mask,
)


@pytest.fixture(autouse=True)
def _interpreted():
    assert attention_module.INTERPRETED, "the kernel must run interpreted, not the torch fallback"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def _raster_tiles(grid, tile) -> torch.Tensor:
    """(N, 3) tile coordinates of the raster tokens, from the definition."""
    f, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    return torch.stack([f.flatten() // tile[0], h.flatten() // tile[1], w.flatten() // tile[2]], 1)


@pytest.mark.parametrize("grid,tile", [((3, 5, 7), (2, 2, 4)), ((2, 4, 4), (1, 2, 2)), ((5, 3, 6), (1, 3, 3)),
                                       ((1, 1, 9), (1, 1, 4)), ((4, 6, 10), (2, 8, 8))])
def test_permutation_and_inverse_are_exact(grid, tile):
    perm, inverse = tile_permutation(grid, tile)
    n = math.prod(grid)
    assert torch.equal(torch.sort(perm).values, torch.arange(n))  # a permutation
    assert torch.equal(perm[inverse], torch.arange(n)) and torch.equal(inverse[perm], torch.arange(n))
    x = torch.randn(2, n, 3)
    assert torch.equal(x.index_select(1, perm).index_select(1, inverse), x)  # exact round trip
    # Tiles are contiguous runs in tile raster order, their tokens in raster order inside.
    tiles = _raster_tiles(grid, tile)[perm]
    nt = tile_grid(grid, tile)
    tid = (tiles[:, 0] * nt[1] + tiles[:, 1]) * nt[2] + tiles[:, 2]
    assert bool((tid[1:] >= tid[:-1]).all())
    same = tid[1:] == tid[:-1]
    assert bool((perm[1:][same] > perm[:-1][same]).all())


def _block_union_mask(grid, tile, tile_allowed, block_size) -> torch.Tensor:
    """Raster-order token mask of a tile pattern cut into blocks of the tiled order, from the definition: query i sees
    key j iff some tile of i's block and some tile of j's block form an allowed pair."""
    perm, inverse = tile_permutation(grid, tile)
    n = math.prod(grid)
    nt = tile_grid(grid, tile)
    tc = _raster_tiles(grid, tile)
    tid = (tc[:, 0] * nt[1] + tc[:, 1]) * nt[2] + tc[:, 2]
    block_of = inverse // block_size  # block of each raster token in the tiled order
    m = -(-n // block_size)
    tiles_in = torch.zeros(m, math.prod(nt), dtype=torch.bool)
    tiles_in[block_of, tid] = True
    blocks = torch.zeros(m, m, dtype=torch.bool)
    for a in range(m):
        for b in range(m):
            blocks[a, b] = bool(tile_allowed[tiles_in[a]][:, tiles_in[b]].any())
    return blocks[block_of][:, block_of]


def _tile_window(grid, tile, window) -> torch.Tensor:
    tc = _raster_tiles(grid, tile)
    nt = tile_grid(grid, tile)
    centres = torch.stack(torch.meshgrid(*(torch.arange(t) for t in nt), indexing="ij"), -1).reshape(-1, 3)
    return ((centres[:, None] - centres[None]).abs() <= torch.tensor(window)).all(-1), tc


def test_window_is_the_exact_tile_window_when_tiles_are_blocks():
    grid, tile, window, bs = (4, 4, 8), (2, 2, 4), (1, 0, 1), 16  # tile volume 16 = block, grid a tile multiple
    tiled = tiled_window_mask(grid, tile, window, bs)
    tc = _raster_tiles(grid, tile)
    want = ((tc[:, None] - tc[None]).abs() <= torch.tensor(window)).all(-1)
    assert torch.equal(tiled.token_mask()[0, 0], want)
    full, partial = tiled.mask.block_tables()
    assert not bool(partial.any()) and tiled.mask.rule == "none"  # whole blocks only: the block-table path


@pytest.mark.parametrize("grid,tile,window,bs", [((3, 5, 7), (2, 2, 4), (1, 1, 0), 16), ((2, 6, 5), (1, 4, 4), (0, 1, 1), 16),
                                                 ((5, 3, 6), (2, 2, 2), (1, 1, 1), 32)])
def test_ragged_window_is_the_union_of_block_tiles(grid, tile, window, bs):
    tiled = tiled_window_mask(grid, tile, window, bs)
    allowed, tc = _tile_window(grid, tile, window)
    got = tiled.token_mask()[0, 0]
    assert torch.equal(got, _block_union_mask(grid, tile, allowed, bs))
    exact = ((tc[:, None] - tc[None]).abs() <= torch.tensor(window)).all(-1)
    assert bool((got | ~exact).all())  # a superset of the token-level tile window
    assert tiled.mask.rule == "none"


def test_criss_cross_is_the_tile_row_and_column():
    grid, tile, bs = (3, 4, 8), (1, 2, 8), 16  # tile volume 16, grid a tile multiple
    tiled = criss_cross_mask(grid, tile, frame_window=1, width=0, block_size=bs)
    tc = _raster_tiles(grid, tile)
    d = (tc[:, None] - tc[None]).abs()
    want = (d[..., 0] <= 1) & ((d[..., 1] == 0) | (d[..., 2] == 0))
    assert torch.equal(tiled.token_mask()[0, 0], want)
    assert 0.0 < tiled.density() < 1.0


def _attend_tiled(q, k, v, tiled: TiledMask) -> torch.Tensor:
    """The processor's path on (B, H, N, D): gather into tile order, kernel into a poisoned buffer, gather back."""
    p = tiled.perm
    qt, kt, vt = (x.index_select(2, p) for x in (q, k, v))
    out = torch.full_like(qt, float("nan"))
    block_sparse_attention(qt, kt, vt, tiled.mask, out=out)
    assert not torch.isnan(out).any()  # every element written
    return out.index_select(2, tiled.inverse)


def _reference(q, k, v, token_mask: torch.Tensor) -> torch.Tensor:
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~token_mask, float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.matmul(w, v.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid,tile,window,bs,d", [((3, 5, 7), (2, 2, 4), (1, 1, 0), 16, 32),
                                                  ((2, 6, 5), (1, 4, 4), (0, 1, 1), 32, 24)])
def test_tiled_attention_matches_float64_reference_in_raster_order(grid, tile, window, bs, d, dtype, gen):
    n = math.prod(grid)
    assert n % bs and any(g % t for g, t in zip(grid, tile))  # ragged on both counts
    tiled = tiled_window_mask(grid, tile, window, bs)
    q, k, v = (torch.randn(2, 3, n, d, generator=gen).to(dtype) for _ in range(3))
    got = _attend_tiled(q, k, v, tiled)
    token_mask = tiled.token_mask()[0, 0]
    want = _reference(q, k, v, token_mask)
    assert (got.double() - want).abs().max() < 2e-2
    # The same through the library's reference of the tiled-order mask, mapped back: the kernel is exact for it.
    ref_tiled = block_sparse_attention_reference(*(x.index_select(2, tiled.perm).double() for x in (q, k, v)), tiled.mask)
    assert (ref_tiled.index_select(2, tiled.inverse) - want).abs().max() < 1e-12


def test_per_head_tile_tables_and_errors(gen):
    grid, tile, bs = (2, 4, 6), (1, 2, 3), 16
    t = math.prod(tile_grid(grid, tile))
    tables = torch.rand(2, t, t, generator=gen) < 0.3
    tables |= torch.eye(t, dtype=torch.bool)
    tiled = tiled_block_mask(grid, tile, tables, bs)
    assert tiled.mask.shape == (1, 2)
    n = math.prod(grid)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen).to(torch.bfloat16) for _ in range(3))
    got = _attend_tiled(q, k, v, tiled)
    assert (got.double() - _reference(q, k, v, tiled.token_mask()[0])).abs().max() < 2e-2
    with pytest.raises(ValueError, match="tile must be"):
        tiled_window_mask(grid, (0, 1, 1))
    with pytest.raises(ValueError, match="window must be"):
        tiled_window_mask(grid, tile, (1, -1, 0))
    with pytest.raises(ValueError, match="grid must be"):
        tile_permutation((2, 3), tile)
    with pytest.raises(ValueError, match="tile_table must be"):
        tiled_block_mask(grid, tile, torch.ones(t + 1, t + 1, dtype=torch.bool), bs)
