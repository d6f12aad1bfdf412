"""Block-sparse attention's backward: the Triton gradient kernels (TRITON_INTERPRET=1, see conftest.py) against
autograd through the float64 PyTorch reference, for every mask kind and token rule.

Every case draws fresh random inputs and output gradients (the seed is in each failure message) at sizes that are
not multiples of the block, runs the kernels into gradient buffers poisoned with NaN (so an element no program
writes fails the comparison) and through autograd, and compares both with the float64 reference's autograd
gradients by relative L2 error. Small blocks (16 / 32) and short sequences keep the interpreter fast; float16 and
bfloat16 (the kernels upcast their dot operands to float32 under the interpreter, whose bf16 dot is broken).
"""

from __future__ import annotations

import math

import pytest
import torch

from accel.kernels.block_sparse import (
    GLUON_CONFIGS,
    BackwardConfig,
    KernelConfig,
    block_causal_mask,
    block_diagonal_mask,
    block_sparse_attention,
    block_sparse_attention_backward,
    block_sparse_attention_backward_reference,
    block_sparse_attention_reference,
    default_backward_config,
    from_block_tables,
    interval_mask,
    local_3d_mask,
    strided_shards_mask,
    table_mask,
)
from accel.kernels.block_sparse import attention as attention_module

TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}  # relative L2 error vs float64 (P and dS rounded to the input dtype)
FWD = KernelConfig(16, 16, 4, 2)
BWD = BackwardConfig(16, 16, 16, 16)
SEGMENTS = [1, 4, 9, 16, 25, 36]  # 91 tokens: HMAR-like scale segments, not aligned to any block


@pytest.fixture(autouse=True)
def _interpreted():
    assert attention_module.INTERPRETED, "TRITON_INTERPRET=1 must be set before triton kernels are imported (conftest.py)"


def _seed() -> int:
    return int(torch.randint(0, 2**31, ()))


def _inputs(mask, b, h, d, dtype, gen, strided=False):
    shapes = [(b, h, n, d) for n in (mask.q_len, mask.kv_len, mask.kv_len, mask.q_len)]
    q, k, v, do = (torch.randn(*s, generator=gen).to(dtype) for s in shapes)
    if strided:  # (B, N, H, D) memory viewed as (B, H, N, D), as diffusers' processors pass them
        q, k, v, do = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, do))
    return q, k, v, do


def _reference_grads(q, k, v, do, mask, scale=None):
    """Output and (dq, dk, dv) by autograd through the float64 reference."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = block_sparse_attention_reference(*leaves, mask, scale=scale)
    out.backward(do.double())
    return out.detach(), [x.grad for x in leaves]


def _rel(got, ref):
    return ((got.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(mask, b=1, h=2, d=64, dtype=torch.float16, config=FWD, backward_config=BWD, strided=False, scale=None):
    """Gradients through autograd, and from the kernels into NaN-poisoned buffers, against the float64 reference."""
    seed = _seed()
    q, k, v, do = _inputs(mask, b, h, d, dtype, torch.Generator().manual_seed(seed), strided)
    out_ref, grads_ref = _reference_grads(q, k, v, do, mask, scale)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = block_sparse_attention(*leaves, mask, scale=scale, config=config, backward_config=backward_config)
    assert out.grad_fn is not None, "the output must be attached to the graph"
    out.backward(do)
    assert _rel(out.detach(), out_ref) < TOL[dtype], f"forward (seed {seed})"
    for name, leaf, ref in zip("qkv", leaves, grads_ref):
        assert leaf.grad.dtype == dtype and leaf.grad.shape == leaf.shape
        assert torch.isfinite(leaf.grad).all(), f"d{name}: non-finite (seed {seed})"
        err = _rel(leaf.grad, ref)
        assert err < TOL[dtype], f"d{name} relative error {err:.2e} (seed {seed})"

    # The kernels alone, into poisoned buffers: every element must be written.
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    with torch.no_grad():
        o = torch.empty_like(q)
        attention_module._launch(q, k, v, o, mask, 1 / math.sqrt(d) if scale is None else scale, config, lse=lse)
    buffers = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    got = block_sparse_attention_backward(do, q, k, v, o, lse, mask, 1 / math.sqrt(d) if scale is None else scale,
                                          backward_config, dq=buffers[0], dk=buffers[1], dv=buffers[2])
    for name, g, buf, ref in zip("qkv", got, buffers, grads_ref):
        assert g is buf
        assert torch.isfinite(g).all(), f"d{name}: unwritten (NaN) elements (seed {seed})"
        assert _rel(g, ref) < TOL[dtype], f"d{name} into a buffer (seed {seed})"
    return leaves, grads_ref


def _random_table(b, h, mq, mk, keep, gen):
    return torch.rand(b, h, mq, mk, generator=gen) < keep


# ------------------------------------------------------------------------------------ every mask kind and token rule


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [64, 112])
def test_random_tables_ragged_lengths(dtype, d):
    gen = torch.Generator().manual_seed(_seed())
    n_q, n_k, bs = 45, 61, 16  # neither a multiple of the block; N_q != N_k
    table = _random_table(2, 2, math.ceil(n_q / bs), math.ceil(n_k / bs), 0.5, gen)
    table[0, 1, 1] = False  # a query block that sees nothing
    table[1, 0, :, 2] = False  # a key block that no query sees: its dK, dV are 0
    _check(table_mask(table, n_q, n_k, bs), b=2, h=2, d=d, dtype=dtype)


def test_full_and_partial_blocks_of_rule_none():
    """Hand-built lists with partial blocks under rule "none" (only the sequence ends mask there)."""
    gen = torch.Generator().manual_seed(_seed())
    full, partial = _random_table(1, 2, 3, 3, 0.4, gen), _random_table(1, 2, 3, 3, 0.4, gen)
    _check(from_block_tables(full, partial, 40, 37, 16), h=2, d=32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_segment_masks(dtype, causal):
    build = block_causal_mask if causal else block_diagonal_mask
    _check(build(SEGMENTS, 16), h=2, d=64, dtype=dtype)


def test_interval_mask_with_empty_rows_inside_listed_blocks():
    gen = torch.Generator().manual_seed(_seed())
    n_q, n_k = 50, 59
    lo = torch.randint(0, n_k, (n_q,), generator=gen)
    hi = lo + torch.randint(0, 20, (n_q,), generator=gen)
    hi[::7] = lo[::7]  # rows that see no key, inside blocks other rows make partial
    mask = interval_mask(lo, hi, n_k, 16)
    (q, k, v), _ = _check(mask, d=32)
    assert torch.equal(q.grad[:, :, ::7], torch.zeros_like(q.grad[:, :, ::7])), "rows that see nothing: dq = 0"


@pytest.mark.parametrize("num_global,global_first,dtype", [
    (0, True, torch.float16), (5, True, torch.bfloat16), (4, False, torch.float16)], ids=str)
def test_local_3d_mask(num_global, global_first, dtype):
    mask = local_3d_mask((2, 5, 6), (1, 1, 2), 16, num_global=num_global, global_first=global_first)
    _check(mask, h=2, d=64, dtype=dtype)


def test_strided_shards_per_head_masks():
    _check(strided_shards_mask(3, 70, 2, local_blocks=1, block_size=16), h=3, d=32)


# ------------------------------------------------------------------------------------------------ tiles and layouts


@pytest.mark.parametrize("tiles", [(16, 32, 32, 16), (32, 16, 16, 32), (32, 32, 32, 32), (16, 16, 16, 16)])
def test_kernel_tiles_smaller_than_mask_blocks(tiles):
    gen = torch.Generator().manual_seed(_seed())
    table = _random_table(1, 2, 3, 3, 0.6, gen) | torch.eye(3, dtype=torch.bool)
    _check(table_mask(table, 83, block_size=32), h=2, d=32, backward_config=BackwardConfig(*tiles))
    _check(block_causal_mask(SEGMENTS, 32), h=1, d=32, backward_config=BackwardConfig(*tiles))


@pytest.mark.parametrize("shape", [(1, 3), (2, 1), (1, 1), (2, 3)])
def test_batch_and_head_broadcast_masks_and_strided_inputs(shape):
    gen = torch.Generator().manual_seed(_seed())
    mask = table_mask(_random_table(*shape, 3, 3, 0.5, gen), 40, block_size=16)
    leaves, _ = _check(mask, b=2, h=3, d=32, strided=True)
    assert all(x.grad.stride() == x.stride() for x in leaves), "gradients keep their input's layout"


def test_all_true_table_runs_the_kernel_on_the_cpu():
    _check(table_mask(torch.ones(1, 1, 3, 4, dtype=torch.bool), 40, 55, 16), h=2, d=32)


def test_scale_and_large_logits():
    gen = torch.Generator().manual_seed(_seed())
    mask = block_diagonal_mask([7, 30, 3], 16)
    q, k, v, do = _inputs(mask, 1, 1, 32, torch.float16, gen)
    q = (q * 8).requires_grad_()  # large logits: the saved log-sum-exp must keep exp2 finite
    k, v = k.requires_grad_(), v.requires_grad_()
    block_sparse_attention(q, k, v, mask, scale=0.5, config=FWD, backward_config=BWD).backward(do)
    _, refs = _reference_grads(q, k, v, do, mask, scale=0.5)
    for x, ref in zip((q, k, v), refs):
        assert torch.isfinite(x.grad).all() and _rel(x.grad, ref) < 1e-2


# ---------------------------------------------------------------------------------------- rows and keys with nothing


def test_all_false_table_gives_zero_gradients():
    q, k, v = (torch.randn(1, 2, 40, 32, dtype=torch.float16).requires_grad_() for _ in range(3))
    out = block_sparse_attention(q, k, v, torch.zeros(1, 1, 3, 3, dtype=torch.bool), block_size=16, config=FWD,
                                 backward_config=BWD)
    out.backward(torch.randn_like(out))
    for x in (q, k, v):
        assert torch.equal(x.grad, torch.zeros_like(x)), "nothing attended: every gradient is 0"


def test_only_some_inputs_need_gradients():
    mask = block_causal_mask(SEGMENTS, 16)
    q, k, v, do = _inputs(mask, 1, 2, 32, torch.float16, torch.Generator().manual_seed(_seed()))
    _, (dq_ref, dk_ref, dv_ref) = _reference_grads(q, k, v, do, mask)
    v.requires_grad_()
    block_sparse_attention(q, k, v, mask, config=FWD, backward_config=BWD).backward(do)
    assert q.grad is None and k.grad is None and _rel(v.grad, dv_ref) < TOL[torch.float16]
    q.requires_grad_()
    v.grad = None
    block_sparse_attention(q, k, v, mask, config=FWD, backward_config=BWD).backward(do)
    assert _rel(q.grad, dq_ref) < TOL[torch.float16] and _rel(v.grad, dv_ref) < TOL[torch.float16]


def test_out_buffer_with_gradients():
    mask = block_diagonal_mask(SEGMENTS, 16)
    q, k, v, do = _inputs(mask, 1, 2, 32, torch.float16, torch.Generator().manual_seed(_seed()))
    _, refs = _reference_grads(q, k, v, do, mask)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    big = torch.full((1, 2, mask.q_len, 64), float("nan"), dtype=torch.float16)
    out = big[..., :32]  # a view, any strides
    got = block_sparse_attention(q, k, v, mask, out=out, config=FWD, backward_config=BWD)
    assert got is out and got.grad_fn is not None and torch.isfinite(out).all()
    (got.float() * do.float()).sum().backward()
    for x, ref in zip((q, k, v), refs):
        assert _rel(x.grad, ref) < TOL[torch.float16]


def test_reference_backward_matches_autograd():
    """The plain PyTorch formulas of the backward (reference.py) against autograd, in float64."""
    gen = torch.Generator().manual_seed(_seed())
    lo = torch.randint(0, 30, (37,), generator=gen)
    mask = interval_mask(lo, lo + torch.randint(0, 12, (37,), generator=gen), 41, 16)  # empty rows included
    q, k, v, do = (x.double() for x in _inputs(mask, 2, 2, 24, torch.float32, gen))
    _, refs = _reference_grads(q, k, v, do, mask, scale=0.3)
    got = block_sparse_attention_backward_reference(q, k, v, do, mask, scale=0.3, rows_per_chunk=16)
    for g, ref in zip(got, refs):
        assert _rel(g, ref) < 1e-12


def test_transposed_lists_are_the_forward_lists_transposed():
    gen = torch.Generator().manual_seed(_seed())
    full, partial = _random_table(2, 1, 4, 3, 0.4, gen), _random_table(2, 1, 4, 3, 0.4, gen)
    mask = from_block_tables(full, partial, 57, 48, 16)  # ragged query end, even key end
    fc, fi, pc, pi = mask.query_lists
    assert mask.query_lists[0] is fc, "built once per mask"
    f, p = mask.block_tables()
    expand = lambda c, i: torch.zeros(*c.shape, 5, dtype=torch.bool).scatter_(  # noqa: E731
        -1, torch.where(torch.arange(i.shape[-1]) < c[..., None], i.long(), 4), True)[..., :4]
    ft, pt = f.transpose(-1, -2).clone(), p.transpose(-1, -2).clone()
    pt[..., -1] |= ft[..., -1]  # the ragged last query block is partial in the transposed lists
    ft[..., -1] = False
    assert torch.equal(expand(fc, fi), ft) and torch.equal(expand(pc, pi), pt)


def test_default_backward_config_fits_the_mask():
    q = torch.zeros(1, 1, 8, 64, dtype=torch.float16)
    for bs in (16, 32, 128):
        assert all(bs % t == 0 for t in default_backward_config(q, bs).tiles())


# --------------------------------------------------------------------------------------------- clear errors, never silence


def _leaves(n=40, h=2, d=32):
    return [torch.randn(1, h, n, d, dtype=torch.float16).requires_grad_() for _ in range(3)]


def test_double_backward_is_refused():
    q, k, v = _leaves()
    out = block_sparse_attention(q, k, v, block_causal_mask([10, 30], 16), config=FWD, backward_config=BWD)
    (gq,) = torch.autograd.grad(out.float().square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        gq.float().sum().backward()


def test_the_gluon_kernel_with_gradients_is_refused():
    q, k, v = _leaves(n=200, d=64)
    mask = table_mask(torch.rand(1, 2, 2, 2) < 0.5, 200)
    with pytest.raises(ValueError, match="Gluon kernel"):
        block_sparse_attention(q, k, v, mask, config=GLUON_CONFIGS[0])


@pytest.mark.parametrize("bad, error, match", [
    (BackwardConfig(32, 16, 16, 16), ValueError, r"tiles \(32, 16, 16, 16\) must divide the mask's block_size=16"),
    (KernelConfig(16, 16, 4, 2), TypeError, "backward_config must be a BackwardConfig or None, got KernelConfig"),
])
def test_bad_backward_configs(bad, error, match):
    q, k, v = _leaves()
    with pytest.raises(error, match=match):
        block_sparse_attention(q, k, v, block_causal_mask([10, 30], 16), config=FWD, backward_config=bad)


@pytest.mark.parametrize("field, value", [("dq_block_n", 8), ("dkdv_block_m", 48), ("num_warps", 0)])
def test_backward_config_is_validated(field, value):
    with pytest.raises(ValueError, match=f"BackwardConfig.{field}"):
        BackwardConfig(**{field: value})


def test_grouped_query_heads_are_refused_with_gradients():
    """The forward takes as many key / value heads as query heads; fewer (GQA) is a clear error, gradients or not."""
    q = torch.randn(1, 4, 40, 32, dtype=torch.float16).requires_grad_()
    k, v = (torch.randn(1, 2, 40, 32, dtype=torch.float16).requires_grad_() for _ in range(2))
    with pytest.raises(ValueError, match=r"shape mismatch: q \(1, 4, 40, 32\), k \(1, 2, 40, 32\)"):
        block_sparse_attention(q, k, v, block_causal_mask([10, 30], 16))


def test_cpu_fallback_without_the_interpreter_is_differentiable(monkeypatch):
    monkeypatch.setattr(attention_module, "INTERPRETED", False)
    mask = block_causal_mask([3, 9, 20], 16)
    q, k, v, do = _inputs(mask, 1, 2, 32, torch.bfloat16, torch.Generator().manual_seed(_seed()))
    _, refs = _reference_grads(q, k, v, do, mask)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    block_sparse_attention(q, k, v, mask).backward(do)
    for x, ref in zip((q, k, v), refs):
        assert _rel(x.grad, ref) < TOL[torch.bfloat16]


def test_no_graph_without_grad_mode():
    q, k, v = _leaves()
    with torch.no_grad():
        assert block_sparse_attention(q, k, v, block_causal_mask([10, 30], 16), config=FWD).grad_fn is None
