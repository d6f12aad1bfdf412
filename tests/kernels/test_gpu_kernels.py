"""The compiled kernels on a GPU against float64 references: block-sparse attention (the Triton kernel, the Gluon
kernel for sm_90 through its KernelConfig, the dense and default dispatch) and linear attention (plain, and
block-causal with a carried state), in bf16 and fp16.

Run this file on its own on a CUDA machine, without TRITON_INTERPRET:

    python -m pytest tests/kernels/test_gpu_kernels.py

(conftest.py then leaves the kernels compiled; in any other session they are interpreted and this file is skipped,
as it is on a machine without CUDA.) Every case draws fresh random inputs (the seed is in each failure message),
uses sequence lengths that are not multiples of any tile, and poisons the output (and the linear-attention
workspace) with NaN first, so an element a kernel does not write fails the comparison.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from accel.kernels.block_sparse import (
    GLUON_CONFIGS,
    KernelConfig,
    block_causal_mask,
    block_diagonal_mask,
    block_sparse_attention,
    block_sparse_attention_reference,
    default_config,
    local_3d_mask,
    table_mask,
)
from accel.kernels.block_sparse import attention as attention_module
from accel.kernels.linear_attention import RotaryTables, block_causal_linear_attention, linear_attention, naive
from accel.kernels.linear_attention import state as state_module

CUDA = torch.cuda.is_available()
SM90 = CUDA and torch.cuda.get_device_capability()[0] == 9 and attention_module.hopper is not None

pytestmark = [
    pytest.mark.skipif(not CUDA, reason="compiled Triton / Gluon kernels: needs a CUDA GPU"),
    pytest.mark.skipif(
        attention_module.INTERPRETED,
        reason="the kernels were imported under TRITON_INTERPRET=1: run `python -m pytest tests/kernels/test_gpu_kernels.py` alone",
    ),
]
needs_sm90 = pytest.mark.skipif(not SM90, reason="the Gluon kernel runs on sm_90 (H100 / H200) only")

DTYPES = [torch.bfloat16, torch.float16]
BS = 128
BSA_TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}  # relative L2 error; P is rounded to the input dtype
LA_TOL = {torch.float16: 3e-3, torch.bfloat16: 3e-2}  # max |error| / max |reference|, as the CPU tests
HMAR_SCALES = [s * s for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]  # 680 tokens, segments not block-aligned


@pytest.fixture
def gen():
    return torch.Generator(device="cuda").manual_seed(random.SystemRandom().randrange(2**31))


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, device="cuda").to(dtype)


# ------------------------------------------------------------------------------------------ block-sparse attention


def _random_table(gen, b, h, n_q, n_k, bs=BS, keep=0.5):
    table = torch.rand(b, h, math.ceil(n_q / bs), math.ceil(n_k / bs), generator=gen, device="cuda") < keep
    table[0, -1, 1] = False  # a query block that sees nothing: zeros
    return table_mask(table, n_q, n_k, bs)


def _check_bsa(gen, mask, b, h, d, dtype, config=None, strided=False):
    """Run into a NaN-poisoned buffer; compare with the float64 reference."""
    q, k, v = (_randn(gen, b, h, n, d, dtype=dtype) for n in (mask.q_len, mask.kv_len, mask.kv_len))
    if strided:  # (B, N, H, D) memory viewed as (B, H, N, D), as diffusers' processors pass them
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    out = torch.full_like(q, float("nan"))
    assert block_sparse_attention(q, k, v, mask, out=out, config=config) is out
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), mask)
    seed = gen.initial_seed()
    assert torch.isfinite(out).all(), f"unwritten (NaN) or non-finite outputs (seed {seed})"
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < BSA_TOL[dtype], f"relative error {err:.2e} (seed {seed})"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 112, 128])
def test_triton_kernel_random_tables(gen, dtype, d):
    mask = _random_table(gen, 2, 3, 700, 650)
    q = torch.empty(2, 3, 700, d, device="cuda", dtype=dtype)
    _check_bsa(gen, mask, 2, 3, d, dtype, config=default_config(q, BS))  # a config given: the Triton kernel


@pytest.mark.parametrize("config", [
    KernelConfig(128, 128, 8, 2, use_tma=True),
    KernelConfig(128, 64, 4, 3),
    KernelConfig(64, 64, 4, 2, longest_first=False),
    KernelConfig(64, 32, 4, 2, use_tma=True),
], ids=str)
def test_triton_kernel_tiles(gen, config):
    _check_bsa(gen, _random_table(gen, 2, 3, 515, 777), 2, 3, 128, torch.bfloat16, config=config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["local_3d", "block_causal", "block_diagonal"])
def test_triton_kernel_token_rules(gen, dtype, pattern):
    mask = {
        "local_3d": lambda: local_3d_mask((3, 9, 13), (1, 3, 4), BS, num_global=20, device="cuda"),  # 371 tokens
        "block_causal": lambda: block_causal_mask(HMAR_SCALES, BS, device="cuda"),
        "block_diagonal": lambda: block_diagonal_mask(HMAR_SCALES, BS, device="cuda"),
    }[pattern]()
    _check_bsa(gen, mask, 1, 2, 112, dtype, config=KernelConfig(64, 64, 4, 2, use_tma=True))


@needs_sm90
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("config", GLUON_CONFIGS, ids=lambda c: f"stages{c.num_stages}")
def test_gluon_kernel(gen, dtype, d, config):
    _check_bsa(gen, _random_table(gen, 2, 3, 300, 333), 2, 3, d, dtype, config=config)


@needs_sm90
def test_gluon_kernel_two_tiles_per_mask_block_and_strided_inputs(gen):
    mask = _random_table(gen, 1, 4, 600, 555, bs=256, keep=0.6)
    _check_bsa(gen, mask, 1, 4, 128, torch.bfloat16, config=GLUON_CONFIGS[-1], strided=True)


def _count_sdpa(monkeypatch) -> list:
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 112])
def test_dense_dispatch(gen, monkeypatch, dtype, d):
    """A mask allowing every pair: the Gluon kernel where it applies (sm_90, D 64 / 128), SDPA elsewhere."""
    n_q, n_k = 333, 300
    mask = table_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool, device="cuda"), n_q, n_k, BS)
    calls = _count_sdpa(monkeypatch)
    _check_bsa(gen, mask, 2, 3, d, dtype)
    assert len(calls) == (0 if SM90 and d == 64 else 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 112, 128])
def test_default_dispatch_on_strided_inputs(gen, dtype, d):
    """What a call without config runs (`choose_config`): Gluon on sm_90 for D 64 / 128, else the Triton kernel."""
    _check_bsa(gen, _random_table(gen, 2, 3, 400, 400), 2, 3, d, dtype, strided=True)


@pytest.mark.parametrize("pattern", ["table", "local_3d"])
def test_under_torch_compile_with_inductor(gen, pattern):
    """The custom op (compiled.py) inside an inductor graph with no graph break: the default dispatch (Gluon on
    sm_90 for a table, the Triton kernel for a token rule) on strided views, equal to the eager call."""
    mask = _random_table(gen, 1, 4, 700, 700) if pattern == "table" else local_3d_mask((3, 9, 26), (1, 3, 5), BS, device="cuda")
    q, k, v = (_randn(gen, 1, mask.q_len, 4, 128, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: block_sparse_attention(q * 2, k, v, mask) + 1, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), block_sparse_attention(q * 2, k, v, mask) + 1, rtol=0, atol=0)


def test_gradients(gen):
    """Dense masks with inputs that need gradients go to SDPA; sparse ones to the Triton backward (the float64
    reference's gradients: test_block_sparse_backward.py)."""
    q, k, v = (_randn(gen, 1, 2, 200, 64, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    dense = table_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool, device="cuda"), 200, block_size=BS)
    out = block_sparse_attention(q, k, v, dense)
    out.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    sparse = block_sparse_attention(q, k, v, _random_table(gen, 1, 2, 200, 200))
    grads = torch.autograd.grad(sparse.float().square().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------- linear attention


@pytest.fixture
def poisoned_workspace(monkeypatch):
    """Kernel 1's partial states start as NaN: an element it does not write poisons the state."""
    monkeypatch.setattr(state_module, "_alloc", lambda shape, device: torch.full(shape, float("nan"), device=device))


def _tables(gen, n, d) -> RotaryTables:
    angles = torch.rand(n, d // 2, generator=gen, device="cuda") * 6.3
    return RotaryTables(angles.cos().contiguous(), angles.sin().contiguous())


def _assert_close(actual, expected, tol, gen, what=""):
    seed = gen.initial_seed()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten poisoned element?), seed {seed}"
    err = ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}, seed {seed}"


@pytest.mark.parametrize("dtype, d, rope", [
    (torch.bfloat16, 64, False), (torch.bfloat16, 112, True), (torch.float16, 112, False), (torch.float16, 128, True),
], ids=str)
def test_linear_attention(gen, poisoned_workspace, dtype, d, rope):
    b, h, n = 2, 3, 1000
    q, k, v = (_randn(gen, b, h, n, d, dtype=dtype) for _ in range(3))
    rot = _tables(gen, n, d) if rope else None
    out = torch.full_like(q, float("nan"))
    assert linear_attention(q, k, v, rotary=rot, out=out) is out
    _assert_close(out, naive.linear_attention(q, k, v, rotary=rot, dtype=torch.float64), LA_TOL[dtype], gen, str(dtype))


def test_linear_attention_queries_and_keys_of_other_lengths(gen, poisoned_workspace):
    q = _randn(gen, 1, 3, 700, 64, dtype=torch.float16)
    k, v = (_randn(gen, 1, 3, 1001, 64, dtype=torch.float16) for _ in range(2))
    expected = naive.linear_attention(q, k, v, dtype=torch.float64)
    _assert_close(linear_attention(q, k, v, out=torch.full_like(q, float("nan"))), expected, LA_TOL[torch.float16], gen)


@pytest.mark.parametrize("dtype, d, rope", [(torch.bfloat16, 112, True), (torch.float16, 64, False)], ids=str)
def test_block_causal_linear_attention_with_state(gen, poisoned_workspace, dtype, d, rope):
    b, h, sizes = 1, 3, [300, 1, 257, 0, 442]
    n = sum(sizes)
    q, k, v = (_randn(gen, b, h, n, d, dtype=dtype) for _ in range(3))
    rot = _tables(gen, n, d) if rope else None
    state, outs, start = None, [], 0
    for size in sizes:
        part = slice(start, start + size)
        chunk_rot = None if rot is None else RotaryTables(rot.cos[part], rot.sin[part])  # absolute positions
        out = torch.full_like(q[:, :, part], float("nan"))
        out, state = block_causal_linear_attention(q[:, :, part], k[:, :, part], v[:, :, part], state,
                                                   rotary=chunk_rot, out=out)
        outs.append(out)
        start += size
    expected = naive.block_causal_quadratic(q, k, v, sizes, rotary=rot)
    _assert_close(torch.cat(outs, dim=2), expected, LA_TOL[dtype], gen, f"{dtype} chunked")
    _assert_close(state.k_sum, naive.summarise(k, v, dtype=torch.float64).k_sum, 1e-5, gen, "final k_sum")


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_linear_attention_propagates_nan_like_the_reference(gen, where):
    inputs = {name: _randn(gen, 1, 2, 300, 64, dtype=torch.bfloat16) for name in "qkv"}
    inputs[where][0, 1, 123, 7] = float("nan")
    out = linear_attention(inputs["q"], inputs["k"], inputs["v"])
    expected = naive.linear_attention(inputs["q"], inputs["k"], inputs["v"], dtype=torch.float64)
    assert expected.isnan().any() and torch.equal(out.isnan(), expected.isnan())
