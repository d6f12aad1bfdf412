"""`BlockSparseMask.computed_pairs` and `density`, on which the benchmarks' TFLOP/s figures rest, against counts made
independently: a token-level boolean mask written out here from each pattern's definition, cut into blocks (a block
pair is computed iff it holds an allowed pair: the builders classify exactly), expanded back to tokens and counted.
Ragged sizes throughout, so the short last blocks must be counted at their true sizes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from accel.kernels.block_sparse import (
    block_causal_mask,
    block_diagonal_mask,
    interval_mask,
    local_3d_mask,
    strided_shards_mask,
    table_mask,
)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def _blocks_touched(dense: torch.Tensor, bs: int) -> torch.Tensor:
    """(..., Nq, Nk) token mask -> (..., Mq, Mk): block pairs holding at least one allowed pair."""
    n_q, n_k = dense.shape[-2:]
    padded = F.pad(dense, (0, -n_k % bs, 0, -n_q % bs))  # False padding: touches nothing
    tiles = padded.unflatten(-1, (-1, bs)).unflatten(-3, (-1, bs))  # (..., Mq, bs, Mk, bs)
    return tiles.any(-1).any(-2)


def _expected(blocks: torch.Tensor, n_q: int, n_k: int, bs: int) -> tuple[int, float]:
    """(token pairs inside the listed block pairs, fraction of block pairs listed), summed over leading dims."""
    tokens = blocks.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :n_q, :n_k]
    return int(tokens.sum()), blocks.sum().item() / blocks.numel()


def _check_counts(mask, blocks: torch.Tensor):
    pairs, density = _expected(blocks, mask.q_len, mask.kv_len, mask.block_size)
    assert mask.computed_pairs() == pairs
    assert mask.density() == pytest.approx(density, rel=1e-12)
    assert mask.computed_pairs() >= int(mask.to_dense().sum())  # computed blocks cover every allowed pair


def _segments(lengths, causal):
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return seg[None, :] <= seg[:, None] if causal else seg[:, None] == seg[None, :]


@pytest.mark.parametrize("n_q, n_k, bs, keep", [(77, 93, 16, 0.5), (33, 200, 32, 0.3), (130, 17, 64, 0.8), (16, 16, 16, 1.0)])
def test_tables(gen, n_q, n_k, bs, keep):
    table = torch.rand(2, 3, math.ceil(n_q / bs), math.ceil(n_k / bs), generator=gen) < keep
    _check_counts(table_mask(table, n_q, n_k, bs), table)


def test_a_full_table_counts_every_pair_once():
    mask = table_mask(torch.ones(2, 1, 5, 6, dtype=torch.bool), 70, 90, 16)
    assert mask.computed_pairs() == 2 * 70 * 90 and mask.density() == 1.0


def test_shared_tables_count_once_per_shared_dim():
    # A (1, 1) table serves every batch row and head, but is counted once: callers scale by B and H themselves.
    table = torch.tensor([[[[True, False], [True, True]]]])
    mask = table_mask(table, 20, 30, 16)  # blocks of 16 / 4 queries, 16 / 14 keys
    assert mask.computed_pairs() == 16 * 16 + 4 * 16 + 4 * 14
    assert mask.density() == 0.75


@pytest.mark.parametrize("n_q, n_k, bs", [(60, 75, 16), (100, 41, 32)])
def test_intervals(gen, n_q, n_k, bs):
    lo = torch.randint(0, n_k, (n_q,), generator=gen)
    hi = lo + torch.randint(0, 30, (n_q,), generator=gen)
    hi[::5] = lo[::5]  # rows that see nothing
    j = torch.arange(n_k)
    dense = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])
    _check_counts(interval_mask(lo, hi, n_k, bs), _blocks_touched(dense, bs)[None, None])


@pytest.mark.parametrize("causal", [False, True], ids=["block-diagonal", "block-causal"])
@pytest.mark.parametrize("lengths, bs", [([1, 4, 9, 16, 25, 36], 16), ([7, 30, 3, 50], 32), ([100], 64)])
def test_segments(causal, lengths, bs):
    build = block_causal_mask if causal else block_diagonal_mask
    dense = _segments(lengths, causal)
    _check_counts(build(lengths, bs), _blocks_touched(dense, bs)[None, None])


def _window(grid, radius, num_global, global_first):
    f, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    coords = torch.stack([f.flatten(), h.flatten(), w.flatten()], 1)
    near = ((coords[:, None] - coords[None, :]).abs() <= torch.tensor(radius)).all(-1)
    n_grid = coords.shape[0]
    dense = torch.ones(n_grid + num_global, n_grid + num_global, dtype=torch.bool)
    o = num_global if global_first else 0
    dense[o : o + n_grid, o : o + n_grid] = near
    return dense


@pytest.mark.parametrize("grid, radius, num_global, global_first, bs", [
    ((3, 5, 7), (1, 1, 2), 0, True, 16),
    ((2, 6, 9), (0, 2, 3), 5, True, 16),
    ((4, 3, 5), (1, 0, 1), 7, False, 32),
    ((5, 4, 4), (0, 0, 0), 0, True, 16),
])
def test_local_3d(grid, radius, num_global, global_first, bs):
    mask = local_3d_mask(grid, radius, bs, num_global=num_global, global_first=global_first)
    dense = _window(grid, radius, num_global, global_first)
    _check_counts(mask, _blocks_touched(dense, bs)[None, None])


def test_strided_shards():
    heads, n, shards, bs = 4, 100, 3, 16
    m = math.ceil(n / bs)
    i, j = torch.arange(m)[:, None], torch.arange(m)[None, :]
    blocks = torch.stack([(j % shards == h % shards) | ((i - j).abs() < 1) for h in range(heads)])[None]
    _check_counts(strided_shards_mask(heads, n, shards, local_blocks=1, block_size=bs), blocks)
