"""Linear-attention kernels under the Triton interpreter against float64 references (tests/kernels/conftest.py sets
TRITON_INTERPRET=1). Inputs are fresh random numbers on every run; the seed is in every failure message."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from accel.kernels import block_causal_linear_attention, linear_attention
from accel.kernels.linear_attention import LinearAttentionState, RotaryTables, backend, naive, ops
from accel.kernels.linear_attention import state as state_module
from accel.kernels.linear_attention.state import chunk_state

# Max |error| over max |reference|. bf16 and fp16 round the rotated q and k and the output as diffusers does;
# the worst seen over 40 random draws was 1.4e-2 (bf16), 6.3e-4 (fp16), 4.7e-7 (fp32).
TOL = {torch.float32: 5e-6, torch.float16: 3e-3, torch.bfloat16: 3e-2}
DTYPES = list(TOL)


@pytest.fixture(scope="module", autouse=True)
def _interpreted():
    assert backend(torch.device("cpu")) == "interpreter", "the kernels must run interpreted, not the torch fallback"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(random.SystemRandom().randrange(2**31))  # reported as gen.initial_seed()


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def qkv(gen, b, h, n, d, dtype, nk=None):
    return randn(gen, b, h, n, d, dtype=dtype), *(randn(gen, b, h, nk or n, d, dtype=dtype) for _ in range(2))


def tables(gen, n, d) -> RotaryTables:
    angles = torch.rand(n, d // 2, generator=gen) * 6.3
    return RotaryTables(angles.cos().contiguous(), angles.sin().contiguous())


def assert_close(actual, expected, tol, gen, what=""):
    seed = gen.initial_seed()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten poisoned element?), seed {seed}"
    err = ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}, seed {seed}"


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))


@pytest.fixture
def poisoned_workspace(monkeypatch):
    """Kernel 1's partial states start as NaN: an element it does not write poisons the state."""
    monkeypatch.setattr(state_module, "_alloc", lambda shape, device: torch.full(shape, float("nan"), device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [32, 64, 112, 128])
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_non_causal_matches_float64(gen, poisoned_workspace, dtype, d, rope):
    n = 150  # two full 64-token tiles and a partial one
    q, k, v = qkv(gen, 2, 2, n, d, dtype)
    rot = tables(gen, n, d) if rope else None
    out = poisoned(q)
    assert linear_attention(q, k, v, rotary=rot, out=out) is out
    assert_close(out, naive.block_causal_quadratic(q, k, v, [n], rotary=rot), TOL[dtype], gen, f"{dtype} d={d}")


@pytest.mark.parametrize("n, nk", [(1, 1), (63, 200), (130, 7)])
def test_queries_and_keys_of_other_lengths(gen, poisoned_workspace, n, nk):
    q, k, v = qkv(gen, 1, 3, n, 48, torch.float16, nk=nk)
    expected = naive.linear_attention(q, k, v, dtype=torch.float64)
    assert_close(linear_attention(q, k, v, out=poisoned(q)), expected, TOL[torch.float16], gen)


def test_strided_views_as_the_processors_pass_them(gen):
    # (B, N, H, D) projections viewed as (B, H, N, D): no copy on the way in, the output keeps the layout.
    b, n, h, d = 2, 70, 3, 112
    q, k, v = (randn(gen, b, n, h * d).unflatten(2, (h, d)).transpose(1, 2) for _ in range(3))
    rot = RotaryTables.from_diffusers(*(t.repeat_interleave(2, -1) for t in tables(gen, n, d)), n, d)
    out = linear_attention(q, k, v, rotary=rot)
    assert out.stride() == q.stride()
    assert_close(out, naive.block_causal_quadratic(q, k, v, [n], rotary=rot), TOL[torch.float32], gen)


@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_state_kernel_matches_float64(gen, poisoned_workspace, rope):
    b, h, n, d = 2, 2, 300, 112  # several splits per head, each writing a partial state
    _, k, v = qkv(gen, b, h, n, d, torch.bfloat16)
    rot = tables(gen, n, d) if rope else None
    prior = LinearAttentionState(randn(gen, b, h, d, d), randn(gen, b, h, d).abs())
    got = chunk_state(k, v, rot, prior)
    # bf16 rounds the rotated keys before the product, as diffusers does; the reference does not.
    expected = naive.summarise(k, v, rot, prior, dtype=torch.float64)
    assert_close(got.kv, expected.kv, 1e-2 if rope else 1e-6, gen, "kv")
    assert_close(got.k_sum, expected.k_sum, 1e-6, gen, "k_sum")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
def test_chunked_equals_whole_block_causal(gen, poisoned_workspace, dtype, rope):
    b, h, d, sizes = 1, 2, 64, [37, 64, 1, 90, 0, 20]
    n = sum(sizes)
    q, k, v = qkv(gen, b, h, n, d, dtype)
    rot = tables(gen, n, d) if rope else None
    state, outs, start = None, [], 0
    for size in sizes:
        part = slice(start, start + size)
        chunk_rot = None if rot is None else RotaryTables(rot.cos[part], rot.sin[part])  # absolute positions
        out = poisoned(q[:, :, part])
        out, state = block_causal_linear_attention(
            q[:, :, part], k[:, :, part], v[:, :, part], state, rotary=chunk_rot, out=out
        )
        assert state.kv.shape == (b, h, d, d) and state.k_sum.shape == (b, h, d)  # whatever came before
        assert state.kv.dtype == state.k_sum.dtype == torch.float32
        outs.append(out)
        start += size
    expected = naive.block_causal_quadratic(q, k, v, sizes, rotary=rot)
    assert_close(torch.cat(outs, dim=2), expected, TOL[dtype], gen, f"{dtype} chunked")
    assert_close(state.k_sum, naive.summarise(k, v, dtype=torch.float64).k_sum, 1e-6, gen, "final k_sum")


def test_first_chunk_equals_non_causal(gen):
    q, k, v = qkv(gen, 1, 2, 100, 32, torch.float32)
    out, _ = block_causal_linear_attention(q, k, v)
    assert_close(out, linear_attention(q, k, v), 1e-6, gen)


def test_fp16_normaliser_does_not_overflow(gen):
    # phi(q) . sum_j phi(k_j) is ~1e7 here, far beyond fp16's 65504; the outputs themselves are ordinary.
    n, d = 400, 64
    q, k = (randn(gen, 1, 1, n, d).abs().add(20).half() for _ in range(2))
    v = randn(gen, 1, 1, n, d).half()
    expected = naive.block_causal_quadratic(q, k, v, [n])
    assert_close(linear_attention(q, k, v), expected, TOL[torch.float16], gen)


def test_rotary_tables_from_diffusers_layout(gen):
    n, d = 10, 8
    cos, sin = tables(gen, n, d)
    full = [t.repeat_interleave(2, -1).reshape(1, n, 1, d) for t in (cos, sin)]
    got = RotaryTables.from_diffusers(*full, n, d)
    assert torch.equal(got.cos, cos) and torch.equal(got.sin, sin)


def test_torch_fallback_is_logged_and_correct(gen, monkeypatch, caplog):
    monkeypatch.setattr(ops, "backend", lambda device: "torch")
    monkeypatch.setattr(ops, "_warned_fallback", False)
    q, k, v = qkv(gen, 1, 2, 30, 16, torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="accel"):
        out = linear_attention(q, k, v)
        chunk_out, state = block_causal_linear_attention(q, k, v)
    assert "PyTorch float32 reference" in caplog.text
    assert out.dtype == torch.bfloat16 and state.kv.dtype == torch.float32
    expected = naive.block_causal_quadratic(q, k, v, [30])
    assert_close(out, expected, TOL[torch.bfloat16], gen)
    assert_close(chunk_out, expected, TOL[torch.bfloat16], gen)


def test_gradients_flow_through_the_differentiable_reference(gen, monkeypatch, caplog):
    """The kernels are forward-only: inputs that need gradients (training) take the PyTorch reference, logged once,
    and the gradients, through a prior state too, are float64's."""
    monkeypatch.setattr(ops, "_warned_autograd", False)
    q, k, v, k0, v0 = inputs = tuple(randn(gen, 1, 2, 19, 16).requires_grad_() for _ in range(5))
    rot, rot0 = tables(gen, 19, 16), tables(gen, 19, 16)
    with caplog.at_level(logging.WARNING, logger="accel"):
        _, prior = block_causal_linear_attention(k0, k0, v0, rotary=rot0)
        out, _ = block_causal_linear_attention(q, k, v, prior, rotary=rot)
        grads = torch.autograd.grad(out.pow(2).sum(), inputs)
    assert "forward-only" in caplog.text
    prior64 = naive.summarise(k0, v0, rot0, dtype=torch.float64)
    out64, _ = naive.block_causal_linear_attention(q, k, v, prior64, rotary=rot, dtype=torch.float64)
    for name, g, e in zip("q k v k0 v0".split(), grads, torch.autograd.grad(out64.pow(2).sum(), inputs)):
        assert_close(g, e, 1e-5, gen, f"d loss / d {name}")
    with torch.no_grad():  # no gradients needed: the kernels again
        assert block_causal_linear_attention(q, k, v)[0].grad_fn is None
