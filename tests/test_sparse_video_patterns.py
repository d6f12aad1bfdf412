"""The sparse video patterns of accel.attention.sparse (tiled_3d, dynamic, criss_cross, window_global_random,
hybrid) and their builders: each against the float64 masked reference at sizes not multiples of the block; through
the attention processor on a tiny WanTransformer3DModel in bf16 against diffusers' processor with the same token
mask; patched pipelines at density 1.0 equal to the unpatched one; string patterns through accel.patch.
Kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here when this file runs alone)."""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, when this file runs alone

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import tiny_models as tm  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

import accel  # noqa: E402
from accel.attention.sparse import (  # noqa: E402
    PATTERNS, WanSparseAttnProcessor, _rotate, apply_sparse_attention, criss_cross, dense, dynamic, hybrid, pbs,
    tiled_3d, window_global_random,
)
from accel.diffusers_internals import get_wan_qkv_projections  # noqa: E402
from accel.kernels.block_sparse import block_sparse_attention  # noqa: E402
from accel.kernels.block_sparse import attention as attention_module  # noqa: E402
from accel.kernels.block_sparse.dynamic_mask import dynamic_block_mask_reference  # noqa: E402
from accel.kernels.block_sparse.patterns import window_global_random_mask  # noqa: E402
from accel.kernels.block_sparse.pbs import pbs_block_sparse_attention, pbs_key_permutation, pbs_token_mask  # noqa: E402
from accel.kernels.block_sparse.tile_order import criss_cross_mask, tile_permutation, tiled_window_mask  # noqa: E402
from accel.pipelines.tiny import tiny_wan_pipeline  # noqa: E402

BLOCK = 16  # tiny Wan: latent grid (2, 4, 4) = 32 tokens, 2 heads of dim 12
GRID = (2, 4, 4)


@pytest.fixture(autouse=True)
def _interpreted():
    assert attention_module.INTERPRETED, "run with TRITON_INTERPRET=1: the kernel, not the torch fallback"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))


def _reference(q, k, v, token_mask):
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    w = torch.softmax(s.masked_fill(~token_mask, float("-inf")), -1).nan_to_num(0.0)
    return torch.matmul(w, v.double())


def _kernel_in_order(q, k, v, mask, perm, inverse):
    qt, kt, vt = (x.index_select(2, perm) for x in (q, k, v))
    out = torch.full_like(qt, float("nan"))
    block_sparse_attention(qt, kt, vt, mask, out=out)
    assert not torch.isnan(out).any()
    return out.index_select(2, inverse)


# ------------------------------------------------------------------------------------------------ builders


@pytest.mark.parametrize("grid,tile,fw,width,bs", [((3, 5, 6), (1, 2, 4), 1, 0, 16), ((2, 7, 5), (1, 3, 2), 0, 1, 16)])
def test_criss_cross_matches_float64_reference(grid, tile, fw, width, bs, gen):
    tiled = criss_cross_mask(grid, tile, fw, width, bs)
    n = math.prod(grid)
    assert n % bs and 0 < tiled.density() < 1
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen).to(torch.bfloat16) for _ in range(3))
    got = _kernel_in_order(q, k, v, tiled.mask, tiled.perm, tiled.inverse)
    token_mask = tiled.token_mask()[0, 0]
    # Every pair the definition allows (same frame window, tile row or column) is in the mask.
    f, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    tc = torch.stack([f.flatten() // tile[0], h.flatten() // tile[1], w.flatten() // tile[2]], 1)
    d = (tc[:, None] - tc[None]).abs()
    assert bool((token_mask | ~((d[..., 0] <= fw) & ((d[..., 1] <= width) | (d[..., 2] <= width)))).all())
    assert (got.double() - _reference(q, k, v, token_mask)).abs().max() < 2e-2


@pytest.mark.parametrize("n,bs,window,glob,rand", [(150, 16, 1, 1, 2), (90, 32, 0, 0, 1)])
def test_window_global_random_matches_definition_and_reference(n, bs, window, glob, rand, gen):
    heads = 3
    mask = window_global_random_mask(heads, n, window, glob, rand, seed=5, block_size=bs)
    m = -(-n // bs)
    full, partial = mask.block_tables()
    table = (full | partial)[0]
    assert table.shape == (heads, m, m)
    i = torch.arange(m)
    base = ((i[:, None] - i[None]).abs() <= window) | (i[None] < glob) | (i[:, None] < glob)
    assert bool((table | ~base).all())  # window and global always listed
    extra = (table & ~base).sum(-1)
    assert bool((extra <= rand).all()) and int(extra.sum()) > 0  # plus at most `rand` random blocks a row
    assert not torch.equal(table[0], table[1])  # heads draw their own random blocks
    again = window_global_random_mask(heads, n, window, glob, rand, seed=5, block_size=bs)
    assert torch.equal(again.to_dense(), mask.to_dense())  # seeded
    assert not torch.equal(window_global_random_mask(heads, n, window, glob, rand, seed=6, block_size=bs).to_dense(),
                           mask.to_dense())
    q, k, v = (torch.randn(2, heads, n, 24, generator=gen).to(torch.bfloat16) for _ in range(3))
    ident = torch.arange(n)
    got = _kernel_in_order(q, k, v, mask, ident, ident)
    assert (got.double() - _reference(q, k, v, mask.to_dense()[0])).abs().max() < 2e-2


def test_pbs_permutation_stays_in_segments_and_sorts_by_importance(gen):
    q, k = (torch.randn(2, 3, 70, 16, generator=gen) for _ in range(2))
    seg = 30  # segments 0-29, 30-59, 60-69 (ragged)
    perm = pbs_key_permutation(q, k, seg)
    n = 70
    assert torch.equal(torch.sort(perm, -1).values, torch.arange(n).expand(2, 3, n))  # a permutation per (b, h)
    assert torch.equal(perm // seg, (torch.arange(n) // seg).expand(2, 3, n))  # keys stay in their segment
    score = torch.matmul(k, q.mean(2, keepdim=True).transpose(-1, -2))[..., 0].gather(-1, perm)
    same_seg = (torch.arange(1, n) // seg) == (torch.arange(n - 1) // seg)
    assert bool((score[..., 1:] <= score[..., :-1])[..., same_seg].all())  # by descending importance inside


@pytest.mark.parametrize("n,bs,seg,budget", [(90, 16, 30, 2), (75, 32, 40, 1)])
def test_pbs_attention_matches_float64_reference_in_key_order(n, bs, seg, budget, gen):
    q, k, v = (torch.randn(1, 2, n, 24, generator=gen).to(torch.bfloat16) for _ in range(3))
    out, perm, mask = pbs_block_sparse_attention(q, k, v, budget, seg, sink_blocks=0, block_size=bs, return_mask=True)
    token_mask = pbs_token_mask(mask, perm)
    assert (out.double() - _reference(q, k, v, token_mask)).abs().max() < 2e-2
    m = -(-n // bs)
    full = pbs_block_sparse_attention(q, k, v, m, seg, block_size=bs)  # every block: dense, in any key order
    assert (full.double() - _reference(q, k, v, torch.ones(n, n, dtype=torch.bool))).abs().max() < 2e-2


def test_pbs_raises_the_mass_inside_the_chosen_blocks(gen):
    """Important keys (~90% of the attention mass) scattered over every block (every 8th key): without the
    permutation the top 2 of 8 blocks hold a quarter of them; with it (one segment), they fill the first block."""
    n, d, bs = 128, 16, 16
    u = torch.randn(d, generator=gen)
    u = u / u.norm()
    q = torch.randn(1, 1, n, d, generator=gen) * 0.3 + 4.0 * u
    k = torch.randn(1, 1, n, d, generator=gen) * 0.3
    k[:, :, ::8] += 4.0 * u  # 16 hot keys, one in each half block
    q, k = q.to(torch.bfloat16), k.to(torch.bfloat16)
    probs = torch.softmax(torch.matmul(q.double(), k.double().transpose(-1, -2)) / math.sqrt(d), -1)
    from accel.kernels.block_sparse.dynamic_mask import dynamic_block_mask

    plain = dynamic_block_mask(q, k, budget=2, block_size=bs).to_dense()
    _, perm, mask = pbs_block_sparse_attention(q, k, k, 2, n, block_size=bs, return_mask=True)
    permuted = pbs_token_mask(mask, perm)
    captured_plain = float((probs * plain).sum(-1).mean())
    captured_pbs = float((probs * permuted).sum(-1).mean())
    assert captured_pbs > 0.85 and captured_pbs > captured_plain + 0.4, (captured_plain, captured_pbs)


# ------------------------------------------------------------------------------------------------ processor


def _model_and_inputs(layers=3):
    model = tm.wan(layers).to(torch.bfloat16)
    x = {k: v.to(torch.bfloat16) for k, v in tm.inputs(model).items()}
    return model, x


def _forward(model, x, t=500.0):
    with torch.no_grad():
        return model(**x, timestep=torch.full((1,), t), return_dict=False)[0].float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


class _MaskedSDPA:
    """diffusers' Wan processor with an explicit boolean attention mask (raster order)."""

    def __init__(self, mask: torch.Tensor):
        self.mask, self.inner = mask, WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, None, self.mask, rotary_emb)


def _with_processors(model, x, processors):
    originals = [b.attn1.processor for b in model.blocks]
    for b, p in zip(model.blocks, processors):
        b.attn1.set_processor(p)
    try:
        return _forward(model, x)
    finally:
        for b, p in zip(model.blocks, originals):
            b.attn1.set_processor(p)


def test_tiled_3d_through_the_processor_matches_the_token_mask():
    model, x = _model_and_inputs()
    tile, window = (1, 2, 2), (0, 0, 0)
    tiled = tiled_window_mask(GRID, tile, window, BLOCK)
    assert 0 < tiled.density() < 1
    base = _forward(model, x)
    restore = apply_sparse_attention(model, pattern=tiled_3d(tile, window, BLOCK))
    sparse = _forward(model, x)
    restore()
    reference = _with_processors(model, x, [_MaskedSDPA(tiled.token_mask())] * 3)
    assert _rel(sparse, reference) < 2e-2
    assert _rel(sparse, base) > 2e-2  # the window changes the result
    assert torch.equal(_forward(model, x), base)  # restore is exact


class _DynamicReference:
    """The dynamic pattern written out: q, k after norms and rotary (diffusers' arithmetic), the reference selection
    of dynamic_mask.py in the tile order, expanded to a raster-order token mask, then float32 masked SDPA."""

    def __init__(self, budget_blocks: int, tile):
        self.budget, self.tile = budget_blocks, tile

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = get_wan_qkv_projections(attn, hidden_states, None)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
        q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
        perm, inverse = tile_permutation(GRID, self.tile)
        full, idx, part = dynamic_block_mask_reference(q.index_select(2, perm), k.index_select(2, perm),
                                                       budget=self.budget, sink_blocks=0, diagonal=False, block_size=BLOCK)
        n, m = q.shape[2], -(-q.shape[2] // BLOCK)
        table = torch.zeros(*full.shape, m, dtype=torch.bool)
        table.scatter_(-1, idx.long(), (torch.arange(idx.shape[-1]) < full[..., None]))
        blocks = (torch.arange(n) // BLOCK)[inverse]  # each raster token's block in the tile order
        token_mask = table[:, :, blocks][..., blocks]
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=token_mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


def test_dynamic_through_the_processor_matches_its_reference():
    model, x = _model_and_inputs()
    tile = (1, 2, 2)
    restore = apply_sparse_attention(model, pattern=dynamic(budget=0.5, sink_blocks=0, diagonal=False, tile=tile,
                                                                  block_size=BLOCK))
    sparse = _forward(model, x)
    restore()
    reference = _with_processors(model, x, [_DynamicReference(1, tile)] * 3)
    assert _rel(sparse, reference) < 2e-2
    assert _rel(sparse, _forward(model, x)) > 2e-2


def test_dynamic_at_full_budget_is_the_dense_pattern_bitwise():
    model, x = _model_and_inputs()
    restore = apply_sparse_attention(model, pattern=dense(BLOCK))
    want = _forward(model, x)
    restore()
    restore = apply_sparse_attention(model, pattern=dynamic(budget=1.0, tile=None, block_size=BLOCK))
    got = _forward(model, x)
    restore()
    assert torch.equal(got, want)


def test_hybrid_keeps_every_third_layer_dense():
    model, x = _model_and_inputs(layers=4)
    tile, window = (1, 2, 2), (0, 0, 0)
    originals = [b.attn1.processor for b in model.blocks]
    restore = apply_sparse_attention(model, pattern=hybrid(tiled_3d(tile, window, BLOCK)))
    kinds = [isinstance(b.attn1.processor, WanSparseAttnProcessor) for b in model.blocks]
    assert kinds == [False, True, True, False]  # layers 0 and 3 dense: 1/3 of layers, rounded up
    assert model.blocks[0].attn1.processor is originals[0] and model.blocks[3].attn1.processor is originals[3]
    got = _forward(model, x)
    with pytest.raises(RuntimeError, match="already runs sparse attention"):
        apply_sparse_attention(model, pattern="dense")
    restore()
    assert all(b.attn1.processor is p for b, p in zip(model.blocks, originals))
    token_mask = tiled_window_mask(GRID, tile, window, BLOCK).token_mask()
    masked = _MaskedSDPA(token_mask)
    reference = _with_processors(model, x, [originals[0], masked, masked, originals[3]])
    assert _rel(got, reference) < 2e-2
    restore = apply_sparse_attention(model, pattern=hybrid(tiled_3d(tile, window, BLOCK), dense_layers=[1, -1]))
    assert [isinstance(b.attn1.processor, WanSparseAttnProcessor) for b in model.blocks] == [True, False, True, False]
    restore()


def test_string_patterns_and_errors():
    model, x = _model_and_inputs()
    assert {"tiled_3d", "dynamic", "criss_cross", "window_global_random", "pbs", "hybrid"} <= set(PATTERNS)
    with accel.patch(model, method="sparse_attention", pattern="dynamic(budget=1.0, tile=None, block_size=16)"):
        got = _forward(model, x)
    restore = apply_sparse_attention(model, pattern=dense(BLOCK))
    assert torch.equal(got, _forward(model, x))
    restore()
    for text, match in (("dynamic(budget=2.0)", "budget must be"), ("dynamic(0.5)", "keyword arguments"),
                        ("nope(x=1)", "unknown sparse attention pattern"), ("tiled_3d(tile=(0, 1, 1))", "tile must"),
                        ("tiled_3d(window=(1, 1))", "window must"), ("dynamic(mass=2.0)", "mass must"),
                        ("hybrid(dense_every=0)", "dense_every"), ("criss_cross(width=-1)", "width must"),
                        ("window_global_random(seed=-1)", "seed must"), ("tiled_3d(block_size=100)", "block_size"),
                        ("pbs(segment=0)", "segment must"), ("pbs(budget=0)", "budget must")):
        with pytest.raises(ValueError, match=match):
            accel.patch(model, method="sparse_attention", pattern=text)
    with pytest.raises(ValueError, match="out of range"):
        apply_sparse_attention(model, pattern=hybrid("dense", dense_layers=[7]))
    with pytest.raises(TypeError, match="unexpected keyword"):
        accel.patch(model, method="sparse_attention", pattern="dynamic(budgett=0.5)")


# ------------------------------------------------------------------------------------------------ pipelines

RESOLUTIONS = {(2, 4, 4): dict(height=64, width=64, num_frames=5), (3, 3, 5): dict(height=48, width=80, num_frames=9)}


def _generate(pipe, kwargs, resolution):
    call = {**kwargs, **resolution, "num_inference_steps": 2, "output_type": "latent"}
    return pipe(**call, generator=torch.Generator().manual_seed(0)).frames.float()


def test_patched_pipelines_at_density_one_equal_the_unpatched_one():
    pipe, kwargs = tiny_wan_pipeline()
    pipe.transformer.to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    base = {grid: _generate(pipe, kwargs, res) for grid, res in RESOLUTIONS.items()}
    everything = {  # each pattern at density 1.0 (the 45-token grid is ragged: 3 blocks of 16, the last short)
        "tiled_3d": tiled_3d((1, 2, 2), (9, 9, 9), BLOCK),
        "dynamic": dynamic(budget=1.0, block_size=BLOCK, tile=(1, 2, 2)),
        "criss_cross": criss_cross((1, 2, 2), frame_window=9, width=9, block_size=BLOCK),
        "window_global_random": window_global_random(window_blocks=9, block_size=BLOCK),
        "pbs": pbs(budget=1.0, block_size=BLOCK),
        "hybrid": hybrid(tiled_3d((1, 2, 2), (9, 9, 9), BLOCK)),
    }
    for name, pattern in everything.items():
        with accel.patch(pipe, method="sparse_attention", pattern=pattern):
            for grid, res in RESOLUTIONS.items():
                got = _generate(pipe, kwargs, res)
                assert got.shape == base[grid].shape
                assert _rel(got, base[grid]) < 2.5e-2, (name, grid)  # bf16 kernel vs SDPA: 1.2-1.3e-2 seen for dense
        for grid, res in RESOLUTIONS.items():  # removal restores the pipeline exactly
            assert torch.equal(_generate(pipe, kwargs, res), base[grid]), name
