"""Block-sparse attention: the Triton kernel (TRITON_INTERPRET=1, see conftest.py) against a float64 dense masked
reference, the mask builders against explicit token-level masks, and input validation.

Small blocks (16 / 32) and short sequences keep the interpreter fast; every case draws fresh random inputs and
poisons the output buffer with NaN first, so an element the kernel does not write fails the comparison.
"""

import dataclasses
import logging
import math
import types

import pytest
import torch

from accel.kernels.block_sparse import (
    GLUON_CONFIGS,
    BlockSparseMask,
    KernelConfig,
    block_causal_mask,
    block_diagonal_mask,
    block_sparse_attention,
    block_sparse_attention_reference,
    choose_config,
    default_config,
    from_block_tables,
    interval_mask,
    local_3d_mask,
    strided_shards_mask,
    table_mask,
)
from accel.kernels.block_sparse import attention as attention_module

HMAR_SCALES = [s * s for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]  # 680 tokens, segments not block-aligned
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}  # relative L2 error vs float64 (P is rounded to the input dtype)


@pytest.fixture(autouse=True)
def _interpreted():
    assert attention_module.INTERPRETED, "TRITON_INTERPRET=1 must be set before triton kernels are imported (conftest.py)"


def _qkv(b, h, n_q, n_k, d, dtype, gen):
    return [torch.randn(b, h, n, d, generator=gen).to(dtype) for n in (n_q, n_k, n_k)]


def _check(mask, b=1, h=2, d=64, dtype=torch.bfloat16, config=None):
    """Run the kernel on fresh random inputs into a NaN-poisoned buffer; compare with the float64 reference."""
    seed = int(torch.randint(0, 2**31, ()))
    q, k, v = _qkv(b, h, mask.q_len, mask.kv_len, d, dtype, torch.Generator().manual_seed(seed))
    out = torch.full_like(q, float("nan"))
    assert block_sparse_attention(q, k, v, mask, out=out, config=config) is out
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), mask)
    assert torch.isfinite(out).all(), f"unwritten (NaN) or non-finite outputs (seed {seed})"
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[dtype], f"relative error {err:.2e} (seed {seed})"
    return out, ref


def _random_table(b, h, mq, mk, keep, gen):
    return torch.rand(b, h, mq, mk, generator=gen) < keep


# ---------------------------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 112, 128])
def test_random_tables_ragged_lengths(dtype, d):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    n_q, n_k, bs = 77, 93, 16  # neither a multiple of the block; N_q != N_k
    table = _random_table(2, 2, math.ceil(n_q / bs), math.ceil(n_k / bs), 0.5, gen)
    table[0, 1, 2] = False  # an empty query-block row
    _check(table_mask(table, n_q, n_k, bs), b=2, h=2, d=d, dtype=dtype, config=KernelConfig(16, 16, 4, 2))


@pytest.mark.parametrize("longest_first", [False, True])
@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("tiles", [(16, 16), (32, 16), (16, 32), (32, 32)])
def test_kernel_tiles_smaller_than_mask_blocks(tiles, use_tma, longest_first):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    n, bs = 101, 32
    table = _random_table(2, 3, 4, 4, 0.6, gen) | torch.eye(4, dtype=torch.bool)
    config = KernelConfig(*tiles, 4, 2, use_tma=use_tma, longest_first=longest_first)
    _check(table_mask(table, n, block_size=bs), b=2, h=3, config=config)


def test_hopper_default_tiles_clipped_below_128_get_at_most_4_warps(monkeypatch):
    # On a GPU only (no interpreter branch): q stands in for a CUDA tensor; the device query is faked as an H100.
    monkeypatch.setattr(attention_module, "_cuda_arch", lambda device: (9, 132))
    q = types.SimpleNamespace(device=torch.device("cuda"), shape=(64, 16, 680, 64))  # HMAR's: many programs
    assert default_config(q, 128) == KernelConfig(128, 128, 8, 2, use_tma=True)
    assert default_config(q, 64) == KernelConfig(64, 64, 4, 2, use_tma=True)  # 8 warps took 1.9x as long
    few = types.SimpleNamespace(device=torch.device("cuda"), shape=(1, 24, 4608, 128))  # FLUX's: few programs
    assert default_config(few, 128) == KernelConfig(64, 64, 4, 2, use_tma=True)


def test_the_gluon_kernel_is_chosen_only_on_hopper_and_refuses_elsewhere():
    # Gluon has no interpreter: its numerics are checked on the GPU (benchmarks/block_sparse_attention_gpu.py).
    q = torch.randn(1, 2, 200, 64, dtype=torch.bfloat16)
    mask = table_mask(torch.rand(1, 2, 2, 2) < 0.5, 200, block_size=128)
    assert choose_config(q, q, q, mask) == default_config(q, 128) and len(GLUON_CONFIGS) == 2
    for config in GLUON_CONFIGS:
        with pytest.raises(ValueError, match="Gluon kernel cannot take this call: it runs on sm_90 GPUs only"):
            block_sparse_attention(q, q, q, mask, config=config)
    with pytest.raises(ValueError, match=r"num_stages one of \(2, 3\) \(got \(128, 128, 12\), 4\)"):
        block_sparse_attention(q, q, q, mask, config=dataclasses.replace(GLUON_CONFIGS[0], num_stages=4))
    with pytest.raises(ValueError, match="must divide the mask's block size"):
        block_sparse_attention(q, q, q, table_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 200, block_size=64),
                               config=GLUON_CONFIGS[0])


def test_longest_first_order_is_a_stable_sort_of_list_lengths():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    n, bs, tile_rows, b, h = 101, 32, 16, 2, 3
    table = _random_table(1, h, 4, 4, 0.5, gen)
    mask = from_block_tables(table, _random_table(1, h, 4, 4, 0.3, gen), n, n, bs)
    order = mask.longest_first_order(b, h, tile_rows)
    tiles = math.ceil(n / tile_rows)
    assert order.dtype == torch.int32 and sorted(order.tolist()) == list(range(b * h * tiles))
    heads_of = [int(i) // tiles for i in order]
    assert heads_of == sorted(heads_of)  # heads in launch order: a head's tiles run together
    lists = lambda i: (int(mask.full_counts[0, (i // tiles) % h, (i % tiles) * tile_rows // bs]),  # noqa: E731
                       int(mask.partial_counts[0, (i // tiles) % h, (i % tiles) * tile_rows // bs]))
    launched = order.tolist()
    for n_x, x in enumerate(launched):  # within a head, no tile waits behind one with shorter lists
        for y in launched[n_x + 1:]:
            (fx, px), (fy, py) = lists(x), lists(y)
            assert x // tiles != y // tiles or not (fy >= fx and py >= px and (fy, py) != (fx, px))
    assert mask.longest_first_order(b, h, tile_rows) is order  # built once
    # A partial block costs more than a full one (it also masks): one partial block launches before one full block.
    one_each = from_block_tables(torch.tensor([[[[True], [False]]]]), torch.tensor([[[[False], [True]]]]), 64, 32, 32)
    assert one_each.longest_first_order(1, 1, 32).tolist() == [1, 0]


def test_all_true_table_is_dense_attention():
    n = 70
    q, k, v = _qkv(1, 2, n, n, 64, torch.float16, torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    out = torch.full_like(q, float("nan"))
    block_sparse_attention(q, k, v, torch.ones(1, 1, 5, 5, dtype=torch.bool), block_size=16, out=out)
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert ((out.double() - dense).norm() / dense.norm()).item() < TOL[torch.float16]


def test_masks_know_when_they_allow_every_pair():
    ragged = table_mask(torch.ones(1, 1, 5, 6, dtype=torch.bool), 70, 90, 16)  # last key block partial
    assert ragged.allows_all_pairs and ragged.to("cpu").allows_all_pairs
    holed = torch.ones(1, 2, 5, 6, dtype=torch.bool)
    holed[0, 1, 3, 2] = False
    assert not table_mask(holed, 70, 90, 16).allows_all_pairs
    # A token rule is never taken as dense, even where it allows everything (telling would cost N^2).
    assert not interval_mask(torch.zeros(40, dtype=torch.long), torch.full((40,), 40), 40, 16).allows_all_pairs


def _on_cuda(dim=64, stride=1, requires_grad=False):
    """Stands in for a CUDA tensor in `runs_dense_sdpa` (it reads device, shape, strides and requires_grad only)."""
    return type("T", (), {"device": torch.device("cuda"), "shape": (1, 1, 64, dim), "stride": lambda self, i: stride,
                          "requires_grad": requires_grad})()


def test_dense_masks_go_to_sdpa_on_cuda_unless_a_config_is_given():
    dense, sparse = (table_mask(t, 64, block_size=16) for t in (torch.ones(1, 1, 4, 4, dtype=torch.bool),
                                                                torch.eye(4, dtype=torch.bool)[None, None]))
    on_cuda = _on_cuda
    q = on_cuda()
    assert attention_module.runs_dense_sdpa(q, q, q, dense, None)
    assert not attention_module.runs_dense_sdpa(q, q, q, dense, KernelConfig(16, 16, 4, 2))
    assert not attention_module.runs_dense_sdpa(q, q, q, sparse, None)
    # Inputs SDPA would send to its N x N math backend stay in the kernel.
    assert not attention_module.runs_dense_sdpa(on_cuda(dim=60), on_cuda(dim=60), on_cuda(dim=60), dense, None)
    assert not attention_module.runs_dense_sdpa(q, on_cuda(stride=2), q, dense, None)
    cpu = torch.zeros(1, 1, 64, 64)
    assert not attention_module.runs_dense_sdpa(cpu, cpu, cpu, dense, None)  # the CPU runs the kernel (CI tests it)


def test_dense_masks_go_to_the_gluon_kernel_where_it_applies_unless_gradients_are_needed(monkeypatch):
    dense = table_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), 64, block_size=128)
    q, grad_q = _on_cuda(), _on_cuda(requires_grad=True)
    monkeypatch.setattr(attention_module, "_gluon_unsupported_reason", lambda *args: None)  # as on an H200
    assert not attention_module.runs_dense_sdpa(q, q, q, dense, None)
    assert attention_module.runs_dense_sdpa(q, grad_q, q, dense, None)
    with torch.no_grad():
        assert not attention_module.runs_dense_sdpa(q, grad_q, q, dense, None)


def test_all_false_table_gives_zeros():
    n = 70
    q, k, v = _qkv(1, 2, n, n, 64, torch.bfloat16, torch.Generator().manual_seed(1))
    out = torch.full_like(q, float("nan"))
    block_sparse_attention(q, k, v, torch.zeros(1, 1, 5, 5, dtype=torch.bool), block_size=16, out=out)
    assert torch.equal(out, torch.zeros_like(out)), "queries that see nothing must get zeros"


def test_batch_and_head_broadcast_and_strided_inputs():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    b, h, n, d, bs = 2, 3, 50, 64, 16
    for shape in [(1, h), (b, 1), (1, 1), (b, h)]:
        mask = table_mask(_random_table(*shape, 4, 4, 0.5, gen), n, block_size=bs)
        # (B, N, H, D) memory viewed as (B, H, N, D), as diffusers processors produce them
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in _qkv(b, h, n, n, d, torch.bfloat16, gen))
        got = block_sparse_attention(q, k, v, mask, config=KernelConfig(16, 16, 4, 2))
        assert got.stride() == q.stride()
        ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), mask)
        assert ((got.double() - ref).norm() / ref.norm()).item() < TOL[torch.bfloat16]


def test_scale_and_large_logits():
    mask = table_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), 40, block_size=16)
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(1, 1, 40, 40, 32, torch.float16, gen)
    q = q * 8  # large logits: the online softmax must stay finite and exact
    got = block_sparse_attention(q, k, v, mask, scale=0.5)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), mask, scale=0.5)
    assert torch.isfinite(got).all() and ((got.double() - ref).norm() / ref.norm()).item() < 1e-2


# ------------------------------------------------------------------------------------------ builders: token level


def _explicit_segments(lengths, causal):
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return seg[None, :] <= seg[:, None] if causal else seg[:, None] == seg[None, :]


def _explicit_window(grid, radius, num_global, global_first):
    f, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    coords = torch.stack([f.flatten(), h.flatten(), w.flatten()], 1)
    near = ((coords[:, None] - coords[None, :]).abs() <= torch.tensor(radius)).all(-1)
    n = coords.shape[0] + num_global
    dense = torch.ones(n, n, dtype=torch.bool)
    o = num_global if global_first else 0
    dense[o : o + coords.shape[0], o : o + coords.shape[0]] = near
    return dense


def _check_classes(mask: BlockSparseMask, dense: torch.Tensor):
    """The mask reproduces `dense` exactly and its full / partial / empty block classes are right."""
    dense = dense.expand(*mask.shape, mask.q_len, mask.kv_len)
    assert torch.equal(mask.to_dense(), dense)
    full, partial = mask.block_tables()
    bs = mask.block_size
    for i in range(mask.num_q_blocks):
        for j in range(mask.num_kv_blocks):
            tile = dense[..., i * bs : (i + 1) * bs, j * bs : (j + 1) * bs].flatten(-2)
            ragged = (j + 1) * bs > mask.kv_len  # only partial blocks mask the sequence end
            assert torch.equal(full[..., i, j], tile.all(-1) & (not ragged)), (i, j)
            assert torch.equal(full[..., i, j] | partial[..., i, j], tile.any(-1)), (i, j)
    assert bool((full & partial).logical_not().all())
    counts = mask.full_counts + mask.partial_counts
    assert int(counts.sum()) == int((full | partial).sum())


@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_segment_masks_are_exact(bs, causal):
    build = block_causal_mask if causal else block_diagonal_mask
    mask = build(HMAR_SCALES, bs)
    _check_classes(mask, _explicit_segments(HMAR_SCALES, causal))


@pytest.mark.parametrize("causal", [False, True])
def test_segment_masks_kernel(causal):
    build = block_causal_mask if causal else block_diagonal_mask
    _check(build(HMAR_SCALES, 32), h=1, d=64, dtype=torch.bfloat16, config=KernelConfig(32, 32, 4, 2))


def test_interval_mask_with_empty_rows_inside_listed_blocks():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    n_q, n_k = 60, 75
    lo = torch.randint(0, n_k, (n_q,), generator=gen)
    hi = lo + torch.randint(0, 20, (n_q,), generator=gen)
    hi[::7] = lo[::7]  # rows that see no key, inside blocks other rows make partial
    mask = interval_mask(lo, hi, n_k, 16)
    j = torch.arange(n_k)
    _check_classes(mask, (j[None, :] >= lo[:, None]) & (j[None, :] < hi.clamp(max=n_k)[:, None]))
    out, _ = _check(mask, dtype=torch.float16, config=KernelConfig(16, 16, 4, 2))
    assert torch.equal(out[:, :, ::7], torch.zeros_like(out[:, :, ::7]))


@pytest.mark.parametrize(
    "grid,radius,num_global,global_first,bs",
    [((3, 5, 7), (1, 1, 2), 0, True, 16), ((2, 6, 9), (0, 2, 3), 5, True, 16), ((4, 3, 5), (1, 0, 1), 7, False, 32)],
)
def test_local_3d_mask_is_exact(grid, radius, num_global, global_first, bs):
    mask = local_3d_mask(grid, radius, bs, num_global=num_global, global_first=global_first)
    _check_classes(mask, _explicit_window(grid, radius, num_global, global_first))


@pytest.mark.parametrize("d", [64, 112])
def test_local_3d_mask_kernel(d):
    mask = local_3d_mask((3, 6, 8), (1, 2, 2), 16, num_global=6)
    _check(mask, h=2, d=d, dtype=torch.bfloat16, config=KernelConfig(16, 16, 4, 2, use_tma=True))


def test_strided_shards_union_covers_everything():
    heads, n, shards, bs = 4, 100, 3, 16
    mask = strided_shards_mask(heads, n, shards, local_blocks=1, block_size=bs)
    m = math.ceil(n / bs)
    i, j = torch.arange(m)[:, None], torch.arange(m)[None, :]
    blocks = torch.stack([(j % shards == h % shards) | ((i - j).abs() < 1) for h in range(heads)])
    dense = blocks.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :n, :n][None]
    _check_classes(mask, dense)
    assert bool(mask.to_dense().any(1).all()), "the heads' union must cover every (query, key) pair"
    _check(mask, h=heads, d=128, dtype=torch.float16, config=KernelConfig(16, 16, 4, 2))


# ------------------------------------------------------------------- errors (the catalogue: test_bad_inputs.py)


def test_hand_built_masks_are_validated():
    good = table_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), 40, block_size=16)  # last key block ragged
    fields = {f.name: getattr(good, f.name) for f in dataclasses.fields(good)}
    with pytest.raises(ValueError, match="ragged last key block"):
        last = torch.full((1, 1, 3, 1), 2, dtype=torch.int32)  # the ragged block 2 listed as full
        BlockSparseMask(**{**fields, "full_indices": last, "full_counts": torch.ones(1, 1, 3, dtype=torch.int32)})
    with pytest.raises(ValueError, match="key block indices"):
        BlockSparseMask(**{**fields, "partial_indices": good.partial_indices + 5})
    with pytest.raises(ValueError, match="counts must be in"):
        BlockSparseMask(**{**fields, "partial_counts": good.partial_counts + 3})
    with pytest.raises(ValueError, match="width >= 1"):
        empty = torch.zeros(1, 1, 3, 0, dtype=torch.int32)
        BlockSparseMask(**{**fields, "partial_indices": empty, "partial_counts": torch.zeros(1, 1, 3, dtype=torch.int32)})
    with pytest.raises(ValueError, match="interval bounds"):
        BlockSparseMask(**{**fields, "rule": "interval", "q_aux": torch.tensor([[0, 41]] * 40, dtype=torch.int32)})


def test_cpu_without_interpreter_falls_back_to_reference_and_logs(monkeypatch, caplog):
    monkeypatch.setattr(attention_module, "INTERPRETED", False)
    monkeypatch.setattr(attention_module, "_LOGGED", set())
    mask = block_causal_mask([3, 9, 20], 16)
    q, k, v = _qkv(1, 2, 32, 32, 64, torch.bfloat16, torch.Generator().manual_seed(5))
    with caplog.at_level(logging.WARNING, logger="accel"):
        got = block_sparse_attention(q, k, v, mask)
    assert "PyTorch reference" in caplog.text
    assert torch.equal(got, block_sparse_attention_reference(q, k, v, mask))


# ------------------------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("rule", ["none", "box3d"])
def test_under_torch_compile_the_kernel_is_one_graph_node(rule):
    """fullgraph=True: no graph break around the launch; the compiled call (the custom op of compiled.py, traced with
    its fake implementation) gives the eager output, and both match the float64 reference."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    if rule == "box3d":
        mask = local_3d_mask((2, 3, 7), (1, 1, 2), block_size=16)  # 42 tokens: not a multiple of the block
    else:
        mask = table_mask(_random_table(1, 2, 3, 3, 0.6, gen) | torch.eye(3, dtype=torch.bool), 42, block_size=16)
    q, k, v = _qkv(1, 2, 42, 42, 64, torch.bfloat16, gen)
    graphs = []

    def backend(graph, inputs):
        graphs.append(graph)
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=lambda g, _: g)(graph, inputs)

    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: block_sparse_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k,
                                                                    v, mask) * 2, fullgraph=True, backend=backend)
    with torch.no_grad():
        out = compiled(q, k, v)
    assert len(graphs) == 1 and "accel.block_sparse_attention" in str(graphs[0].graph)
    torch.testing.assert_close(out, 2 * block_sparse_attention(q, k, v, mask), rtol=0, atol=0)
    ref = 2 * block_sparse_attention_reference(q.double(), k.double(), v.double(), mask)
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[torch.bfloat16]
