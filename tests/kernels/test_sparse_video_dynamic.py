"""Dynamic block masks (block_pool.py, dynamic_mask.py, device_mask.py): the pooling kernel against a float64
reference, the selection kernel identical to its PyTorch reference on random scores (ties included) and end to end
on random q / k, the block-sparse kernel on device-built lists against the float64 masked reference, and
`device_table_mask` against `table_mask`. Ragged sizes, poisoned outputs, fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from accel.kernels.block_sparse import block_sparse_attention, block_sparse_attention_reference, table_mask
from accel.kernels.block_sparse import attention as attention_module
from accel.kernels.block_sparse.block_pool import block_pool, block_pool_reference
from accel.kernels.block_sparse.device_mask import DeviceBlockSparseMask, device_table_mask
from accel.kernels.block_sparse.dynamic_mask import (
    block_scores, block_scores_reference, dynamic_block_mask, dynamic_block_mask_reference, select_blocks,
    select_blocks_reference,
)


@pytest.fixture(autouse=True)
def _interpreted():
    assert attention_module.INTERPRETED, "the kernels must run interpreted, not the torch fallback"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


@pytest.mark.parametrize("n_q,n_k,d,bs", [(70, 45, 24, 16), (64, 100, 32, 32), (17, 17, 8, 16)])
def test_block_pool_matches_float64_reference(n_q, n_k, d, bs, gen):
    q = torch.randn(2, 3, n_q, d, generator=gen).to(torch.bfloat16)
    k = torch.randn(2, 3, d, n_k, generator=gen).to(torch.bfloat16).transpose(-1, -2)  # non-contiguous
    mq, mk = -(-n_q // bs), -(-n_k // bs)
    out = (torch.full((2, 3, mq, d), float("nan")), torch.full((2, 3, mk, d), float("nan")))
    qp, kp = block_pool(q, k, bs, out=out)
    assert qp is out[0] and kp is out[1]
    assert (qp.double() - block_pool_reference(q.double(), bs)).abs().max() < 1e-5
    assert (kp.double() - block_pool_reference(k.double(), bs)).abs().max() < 1e-5


CASES = [
    dict(budget=3),
    dict(budget=2, sink_blocks=1),
    dict(budget=4, sink_blocks=2, diagonal=True),
    dict(mass=0.5),
    dict(mass=0.9, sink_blocks=1, diagonal=True),
    dict(mass=0.99, width=4),
    dict(mass=1.0),
]


def _width(case, mk):
    return case.get("width", case.get("budget", mk))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kv_len,bs", [(100, 16), (112, 16), (590, 16)])  # 7 key blocks (ragged, even), 37
def test_selection_kernel_is_identical_to_reference(case, kv_len, bs, gen):
    mk = -(-kv_len // bs)
    kw = {k: v for k, v in case.items() if k != "width"}
    for scores in (torch.randn(2, 1, mk, mk, generator=gen),
                   torch.randint(-2, 3, (2, 1, mk, mk), generator=gen).float()):  # many ties (and zeros)
        width = _width(case, mk)
        out = tuple(torch.full(s, -7, dtype=torch.int32) for s in ((2, 1, mk), (2, 1, mk, width), (2, 1, mk)))
        got = select_blocks(scores, kv_len, bs, width, **kw, out=out)
        want = select_blocks_reference(scores, kv_len, bs, width, **kw)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        full, idx, part = got
        assert bool((full + part >= 1).all()) and bool((full + part <= width).all())
        if kv_len % bs == 0:
            assert not bool(part.any())


def test_selection_rules_by_hand():
    # One row, 5 key blocks of 16 (80 keys, even): scores chosen so that the rules can be read off.
    s = torch.tensor([0.0, 3.0, 1.0, 3.0, -1.0])[None, None, None].repeat(1, 1, 5, 1)
    full, idx, _ = select_blocks(s, 80, 16, 2, budget=2)
    assert idx[0, 0, 0].tolist() == [1, 3] and full[0, 0, 0] == 2  # the tie at 3.0 takes both, ascending
    full, idx, _ = select_blocks(s, 80, 16, 3, budget=3, sink_blocks=1, diagonal=True)
    assert idx[0, 0, 4].tolist() == [0, 1, 4]  # forced: block 0 and the diagonal 4, then the best, 1 (tie: lower)
    # mass: p = softmax(s); the top two hold 0.45 each: 0.5 needs two blocks, 0.95 three.
    assert select_blocks(s, 80, 16, 5, mass=0.5)[0][0, 0, 0] == 2
    assert select_blocks(s, 80, 16, 5, mass=0.95)[0][0, 0, 0] == 3


@pytest.mark.parametrize("case", [dict(budget=2, sink_blocks=1, diagonal=True), dict(mass=0.8)])
def test_dynamic_mask_is_identical_to_reference_end_to_end(case, gen):
    q = torch.randn(1, 4, 90, 32, generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 4, 90, 32, generator=gen).to(torch.bfloat16)
    k[:, :, 40:60] += 0.7 * q[:, :, :1]  # a few keys that every query likes: the scores are not all alike
    assert (block_scores(q, k, 16) - block_scores_reference(q, k, 16)).abs().max() < 1e-5
    mask = dynamic_block_mask(q, k, **case, block_size=16)
    assert isinstance(mask, DeviceBlockSparseMask) and mask.shape == (1, 4)
    got = (mask.full_counts, mask.full_indices, mask.partial_counts)
    for g, w in zip(got, dynamic_block_mask_reference(q, k, **case, block_size=16)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("n,bs,d,dtype", [(90, 16, 32, torch.bfloat16), (75, 32, 24, torch.float16)])
def test_attention_with_dynamic_mask_matches_float64_reference(n, bs, d, dtype, gen):
    q, k, v = (torch.randn(2, 2, n, d, generator=gen).to(dtype) for _ in range(3))
    mask = dynamic_block_mask(q, k, budget=2, sink_blocks=1, block_size=bs)
    out = torch.full_like(q, float("nan"))
    block_sparse_attention(q, k, v, mask, out=out)
    assert not torch.isnan(out).any()
    want = block_sparse_attention_reference(q.double(), k.double(), v.double(), mask)
    assert (out.double() - want).abs().max() < 2e-2
    # The listed blocks are what the dense form says: each query block sees exactly its chosen key blocks.
    table = mask.block_tables()
    listed = (table[0] | table[1])
    assert torch.equal(listed.sum(-1), mask.full_counts + mask.partial_counts)


@pytest.mark.parametrize("n_q,n_k,bs", [(70, 45, 16), (64, 64, 32)])
def test_device_table_mask_equals_table_mask(n_q, n_k, bs, gen):
    mq, mk = -(-n_q // bs), -(-n_k // bs)
    table = torch.rand(2, 3, mq, mk, generator=gen) < 0.5
    table[0, 0, 0] = False  # an empty row: its queries get zeros
    mask = device_table_mask(table, n_q, n_k, bs)
    assert torch.equal(mask.to_dense(), table_mask(table, n_q, n_k, bs).to_dense())
    q = torch.randn(2, 3, n_q, 16, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(2, 3, n_k, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
    out = torch.full_like(q, float("nan"))
    block_sparse_attention(q, k, v, mask, out=out)
    assert (out.double() - block_sparse_attention_reference(q.double(), k.double(), v.double(), mask)).abs().max() < 2e-2


def test_dense_budget_lists_every_block(gen):
    q, k = (torch.randn(1, 2, 50, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
    mask = dynamic_block_mask(q, k, budget=4, block_size=16)
    assert torch.equal(mask.to_dense(), torch.ones(1, 1, 50, 50, dtype=torch.bool).expand(1, 2, 50, 50))


def test_errors(gen):
    q = torch.randn(1, 2, 50, 16, generator=gen).to(torch.bfloat16)
    with pytest.raises(ValueError, match="exactly one of budget"):
        dynamic_block_mask(q, q, block_size=16)
    with pytest.raises(ValueError, match="exactly one of budget"):
        dynamic_block_mask(q, q, budget=2, mass=0.5, block_size=16)
    with pytest.raises(ValueError, match="budget must be an int"):
        dynamic_block_mask(q, q, budget=0, block_size=16)
    with pytest.raises(ValueError, match="exceeds the list width"):
        dynamic_block_mask(q, q, budget=3, width=2, block_size=16)
    with pytest.raises(ValueError, match="mass must be a float"):
        dynamic_block_mask(q, q, mass=1.5, block_size=16)
    with pytest.raises(ValueError, match="always-on blocks"):
        dynamic_block_mask(q, q, budget=2, sink_blocks=2, diagonal=True, block_size=16)
    with pytest.raises(ValueError, match="diagonal needs"):
        dynamic_block_mask(q, q[:, :, :20], budget=1, diagonal=True, block_size=16)
    with pytest.raises(ValueError, match="key blocks"):
        select_blocks(torch.zeros(1, 1, 4, 4), 100, 16, 2, budget=2)
    with pytest.raises(ValueError, match="width must be"):
        device_table_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 64, 64, 16, width=5)


def test_constant_lists_are_not_cached_while_a_cuda_graph_is_captured(monkeypatch):
    # A tensor made during capture is filled only when the graph replays: it must not be kept for later calls.
    from accel.kernels.block_sparse import device_mask

    monkeypatch.setattr(device_mask, "_LAST_BLOCK_LISTS", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    counts, indices = device_mask.partial_lists((1, 2, 3), None, 5, "cpu")
    assert indices.shape == (1, 2, 3, 1) and bool((indices == 4).all()) and not device_mask._LAST_BLOCK_LISTS
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    device_mask.partial_lists((1, 2, 3), None, 5, "cpu")
    assert list(device_mask._LAST_BLOCK_LISTS) == [(torch.device("cpu"), 5)]
