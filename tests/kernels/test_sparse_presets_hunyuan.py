"""Sparse attention presets per model family (SPARSE_PRESETS, pattern "preset"), joint image-text sparse attention
on a tiny HunyuanVideoTransformer3DModel, and the errors for models it does not apply to (SANA-Video: linear).

Kernels run under the Triton interpreter (conftest.py). HunyuanVideo: at density 1.0 the patched model matches the
unpatched one (bf16: the kernel takes half precision only); with sparse patterns the joint attention matches the
float64 masked reference of the same token mask, both at the attention level and through the whole model."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
import tiny_models as tm
from diffusers import HunyuanVideoTransformer3DModel

import accel
from accel.attention.sparse import (
    SPARSE_PRESETS, HunyuanVideoSparseAttnProcessor, PresetPattern, SparsePreset, TiledPattern, _as_pattern,
    _GridState, apply_sparse_attention, dense, hybrid, joint_mask, local_3d, resolve_preset, strided_shards, tiled_3d,
)
from accel.attention.sparse import presets
from accel.kernels.block_sparse import attention as attention_module
from accel.kernels.block_sparse import local_3d_mask
from accel.kernels.block_sparse.tile_order import tiled_window_mask

BLOCK = 16


@pytest.fixture(autouse=True)
def _interpreted():
    assert attention_module.INTERPRETED, "the kernel must run interpreted, not the torch fallback"


# ------------------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("grid, want", [
    ((21, 30, 52), "tiled_3d(tile=(2, 8, 8), window=(1, 1, 1), block_size=128), density 0.119"),  # Wan 480p/81
    ((33, 45, 80), "tiled_3d(tile=(2, 8, 8)"),  # HunyuanVideo 720p/129
    ((1, 90, 160), "tiled_3d(tile=(1, 8, 16)"),  # one frame: (2, 8, 8) is larger than the grid
    ((17, 8, 8), "dense(block_size=128) (fallback: 1088 tokens < min_tokens=8192)"),  # the shipped shapes-video model
    ((2, 4, 4), "dense(block_size=128) (fallback: 32 tokens < min_tokens=8192)"),  # tiny test Wan
])
def test_preset_resolution_per_grid(grid, want):
    text, pattern, tiled = resolve_preset(SPARSE_PRESETS["wan"], grid)
    assert text.startswith(want)
    assert isinstance(pattern, TiledPattern) == text.startswith("tiled_3d")
    if tiled is not None:
        assert tiled.density() <= SPARSE_PRESETS["wan"].max_density
        assert tiled.mask.block_size == math.prod(tiled.tile)  # whole-block tiles: the block-table path
    assert set(SPARSE_PRESETS) == {"wan", "hunyuan_video"}


@pytest.mark.parametrize("grid, want", [
    ((17, 8, 8), "tiled_3d(tile=(2, 8, 8), window=(1, 1, 1), block_size=128), density 0.309"),
    ((1, 30, 52), "dense(block_size=128) (fallback: tile (2, 8, 8) is larger than the grid; tile (1, 8, 16) keeps 0.61"),
    ((5, 8, 8), "dense(block_size=128) (fallback: tile (2, 8, 8): the window covers the whole grid"),
])
def test_preset_tile_rules_without_the_token_floor(grid, want):
    preset = dataclasses.replace(SPARSE_PRESETS["wan"], min_tokens=0)
    assert resolve_preset(preset, grid)[0].startswith(want)


def test_preset_is_the_default_and_is_logged_per_grid(caplog, monkeypatch):
    monkeypatch.setattr(presets, "_LOGGED", set())
    assert accel.SparseAttentionConfig().pattern == "preset"
    model = tm.wan().to(torch.bfloat16)
    x = {k: v.to(torch.bfloat16) for k, v in tm.inputs(model).items()}
    # A tiny-block preset, so that the tiny model's grid (2, 4, 4) gets a tiled window: its result must be exactly
    # tiled_3d's with the same tile.
    monkeypatch.setitem(SPARSE_PRESETS, "wan", SparsePreset(tiles=((2, 8, 8), (1, 4, 4)), window=(0, 0, 0),
                                                            max_density=0.9, block_size=BLOCK, min_tokens=0))
    t = torch.full((1,), 500.0)
    with torch.no_grad():
        with caplog.at_level(logging.INFO, logger="accel"):
            handle = accel.patch(model, method="sparse_attention")
            got = model(**x, timestep=t, return_dict=False)[0]
            model(**x, timestep=t, return_dict=False)  # the same grid: resolved (and logged) once
        handle.remove()
        lines = [r for r in caplog.records if "preset 'wan' for latent grid (2, 4, 4)" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.INFO
        assert "tiled_3d(tile=(1, 4, 4), window=(0, 0, 0), block_size=16), density 0.500" in lines[0].getMessage()
        restore = apply_sparse_attention(model, tiled_3d((1, 4, 4), (0, 0, 0), BLOCK))
        want = model(**x, timestep=t, return_dict=False)[0]
        restore()
    assert torch.equal(got, want)


def test_preset_falls_back_to_dense_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(presets, "_LOGGED", set())  # as in a fresh process: another test may have seen this grid
    model = tm.wan().to(torch.bfloat16)
    x = {k: v.to(torch.bfloat16) for k, v in tm.inputs(model).items()}
    t = torch.full((1,), 500.0)
    with torch.no_grad():
        base = model(**x, timestep=t, return_dict=False)[0].float()
        with caplog.at_level(logging.INFO, logger="accel"):
            restore = apply_sparse_attention(model)  # the default: "preset"
            got = model(**x, timestep=t, return_dict=False)[0].float()
        restore()
    (line,) = [r for r in caplog.records if "sparse attention preset" in r.getMessage()]
    assert line.levelno == logging.WARNING and "dense(block_size=128) (fallback" in line.getMessage()
    assert "no speed-up" in line.getMessage()
    assert ((got - base).norm() / base.norm()).item() < 2e-2


def test_preset_errors():
    with pytest.raises(ValueError, match="no sparse attention preset for family 'sana'"):
        _as_pattern("preset(family='sana')")
    state = _GridState(PresetPattern(), (1, 1, 1))
    state.grid = (2, 4, 4)
    with pytest.raises(RuntimeError, match="resolves per model family"):
        state.built(32, 2, torch.device("cpu"))
    assert isinstance(_as_pattern("hybrid(pattern='preset')").inner, PresetPattern)


def test_sana_video_and_other_models_are_refused_clearly():
    for model in (tm.sana_video(), tm.sana()):
        with pytest.raises(NotImplementedError, match='linear.*no softmax.*method="linear_attention_kernels"'):
            accel.patch(model, method="sparse_attention")
    with pytest.raises(NotImplementedError, match="supports WanTransformer3DModel, HunyuanVideoTransformer3DModel, "
                                                  "not model=FluxTransformer2DModel"):
        apply_sparse_attention(tm.flux())


# -------------------------------------------------------------------------------------------------- HunyuanVideo


def _hunyuan() -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=False,
    ).eval().to(torch.bfloat16)


def _hunyuan_inputs(size=(3, 8, 12)) -> dict:
    """Two batch items with different valid text lengths (3 and 5 of 5): grid (3, 4, 6), 72 image tokens."""
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(2, 4, *size, generator=g), encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
             pooled_projections=torch.randn(2, 8, generator=g))
    x = {k: v.to(torch.bfloat16) for k, v in x.items()}
    x["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return x


def _run(model, x):
    with torch.no_grad():
        return model(**x, timestep=torch.full((2,), 500.0), return_dict=False)[0].float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _image_token_mask(pattern, grid, heads):
    built = _as_pattern(pattern).build(grid, heads, torch.device("cpu"))
    return (built.token_mask() if hasattr(built, "token_mask") else built.to_dense())[0]  # (H' , N, N)


class _Float64Reference(HunyuanVideoSparseAttnProcessor):
    """The sparse processor's projections with the joint attention in float64 on the explicit token mask."""

    def __init__(self, image_mask):
        self.image_mask = image_mask

    def attend(self, query, key, value, num_text, attention_mask, heads):
        return _reference_joint(query, key, value, num_text, attention_mask.reshape(query.shape[0], -1), self.image_mask)


def _reference_joint(q, k, v, num_text, keep, image_mask):
    """(B, N + T, H, D) in float64: image-image pairs by image_mask (H' or 1, N, N), every valid key otherwise."""
    b, total, h, d = q.shape
    n = total - num_text
    allowed = keep[:, None, None, :].expand(b, h, total, total).clone()
    allowed[:, :, :n, :n] &= image_mask.expand(h, n, n)
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    s = (qd @ kd.transpose(-1, -2)) / math.sqrt(d)
    w = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return (w @ vd).transpose(1, 2).to(q.dtype)


def test_hunyuan_dense_matches_the_unpatched_model_and_restore_is_exact():
    model, x = _hunyuan(), _hunyuan_inputs()
    base = _run(model, x)
    layers = [blk.attn for blk in (*model.transformer_blocks, *model.single_transformer_blocks)]
    before = [layer.processor for layer in layers]
    handle = accel.patch(model, method="sparse_attention", pattern=dense(BLOCK))
    assert all(isinstance(layer.processor, HunyuanVideoSparseAttnProcessor) for layer in layers)
    got = _run(model, x)
    handle.remove()
    assert all(layer.processor is p for layer, p in zip(layers, before))
    assert torch.equal(_run(model, x), base)
    assert _rel(got, base) < 1e-2  # bf16 (the kernel's precision; float32 is refused)


def test_hunyuan_text_groups_are_read_once_per_call_and_follow_a_new_mask(monkeypatch):
    from accel.attention.sparse import hunyuan_video

    model, x = _hunyuan(), _hunyuan_inputs()
    other = {**x, "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])}
    reads = []
    read = hunyuan_video._text_groups
    monkeypatch.setattr(hunyuan_video, "_text_groups", lambda keep, n: reads.append(n) or read(keep, n))
    with accel.patch(model, method="sparse_attention", pattern=local_3d((0, 1, 1), BLOCK)):
        _run(model, x)
        assert len(reads) == 1  # two attention layers, one host read of the mask
        second = _run(model, other)
    with accel.patch(model, method="sparse_attention", pattern=local_3d((0, 1, 1), BLOCK)):
        fresh = _run(model, other)
    assert len(reads) == 3 and torch.equal(second, fresh)  # the second call grouped its own mask


@pytest.mark.parametrize("pattern", [
    pytest.param(tiled_3d((1, 2, 4), (0, 1, 0), BLOCK), id="tiled"),   # rule none, 72 tokens: padded before the text
    pytest.param(local_3d((0, 1, 1), BLOCK), id="local_3d"),            # rule box3d
    pytest.param(strided_shards(2, 0, BLOCK), id="strided-per-head"),   # per-head table
])
def test_hunyuan_sparse_matches_the_float64_masked_reference(pattern):
    model, x = _hunyuan(), _hunyuan_inputs()
    grid, heads = (3, 4, 6), 2
    image_mask = _image_token_mask(pattern, grid, heads)
    assert not image_mask.all()
    restore = apply_sparse_attention(model, pattern)
    sparse = _run(model, x)
    restore()
    layers = [blk.attn for blk in (*model.transformer_blocks, *model.single_transformer_blocks)]
    originals = [layer.processor for layer in layers]
    for layer in layers:
        layer.set_processor(_Float64Reference(image_mask))
    reference = _run(model, x)
    for layer, p in zip(layers, originals):
        layer.set_processor(p)
    assert _rel(sparse, reference) < 1e-2
    assert _rel(sparse, _run(model, x)) > 2e-3  # the pattern does change the result


@pytest.mark.parametrize("grid", [(2, 4, 4), (3, 4, 6)])  # 32 image tokens (no padding), 72 (padded to 80)
@pytest.mark.parametrize("name", ["tiled", "local", "dense", "hybrid"])
def test_joint_attention_equals_the_float64_reference(grid, name):
    g = torch.Generator().manual_seed(1)
    n, t, b, h, d = math.prod(grid), 7, 3, 2, 16
    pattern = {"tiled": tiled_3d((1, 2, 4), (0, 1, 0), BLOCK), "local": local_3d((1, 1, 1), BLOCK),
               "dense": dense(BLOCK), "hybrid": hybrid(tiled_3d((1, 4, 4), (0, 0, 0), BLOCK))}[name]
    q, k, v = (torch.randn(b, n + t, h, d, generator=g).to(torch.bfloat16) for _ in range(3))
    keep = torch.ones(b, n + t, dtype=torch.bool)
    keep[0, n + 4:] = False   # 4 valid text tokens
    keep[1, n + 1] = False    # a hole: valid tokens need not be a prefix
    keep[2, n:] = False       # no text at all
    state = _GridState(_as_pattern(pattern), (1, 1, 1))
    state.grid = grid
    got = HunyuanVideoSparseAttnProcessor(state).attend(q, k, v, t, keep[:, None, None, :], h)
    inner = pattern.inner if name == "hybrid" else pattern
    want = _reference_joint(q, k, v, t, keep, _image_token_mask(inner, grid, h))
    torch.testing.assert_close(got.double(), want.double(), atol=2e-2, rtol=0)


def test_joint_mask_layout():
    n, t = 72, 20
    mask = joint_mask(local_3d_mask((3, 4, 6), (0, 1, 1), BLOCK), t)
    assert (mask.q_len, mask.kv_len, mask.rule) == (n, 80 + t, "box3d")
    dense_rows = mask.to_dense()[0, 0]
    assert not dense_rows[:, n:80].any()          # padding keys: never seen
    assert dense_rows[:, 80:].all()               # text keys: seen by every image query
    torch.testing.assert_close(dense_rows[:, :n], local_3d_mask((3, 4, 6), (0, 1, 1), BLOCK).to_dense()[0, 0])
    tiled = tiled_window_mask((2, 4, 4), (1, 4, 4), (0, 0, 0), BLOCK)
    joined = joint_mask(tiled.mask, 5)
    assert joined.rule == "none" and joined.kv_len == 37  # a block multiple: no padding, no token rule


def test_hunyuan_refusals():
    model = _hunyuan()
    for pattern in ("dynamic", "pbs", "hybrid(pattern='dynamic')"):
        with pytest.raises(NotImplementedError, match="joint image-text attention"):
            apply_sparse_attention(model, pattern)
    restore = apply_sparse_attention(model, dense(BLOCK))
    with pytest.raises(RuntimeError, match="already runs sparse attention"):
        apply_sparse_attention(model)
    restore()
    fp32 = _hunyuan().float()
    restore = apply_sparse_attention(fp32, dense(BLOCK))
    x = {k: (v.float() if v.is_floating_point() else v) for k, v in _hunyuan_inputs().items()}
    with pytest.raises(TypeError, match="bfloat16"):
        _run(fp32, x)
    restore()
