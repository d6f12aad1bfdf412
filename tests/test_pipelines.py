"""accel.patch on real diffusers pipelines (FluxPipeline, DiTPipeline, WanPipeline, SanaPipeline,
SanaVideoPipeline, PixArtAlphaPipeline), built offline around tiny random-init transformers."""

import numpy as np
import pytest
import torch

import accel
import tiny_pipelines as tp


def _output(pipe, kwargs, steps):
    out = pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    frames = out[0]
    return frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.asarray(frames))


@pytest.mark.parametrize("build", tp.PIPELINES, ids=lambda b: b.__name__)
def test_pipeline_patch_threshold_zero_exact_predicts_when_allowed_and_removes_cleanly(build):
    pipe, kwargs = build()
    pipe.set_progress_bar_config(disable=True)
    base = _output(pipe, kwargs, 8)

    with accel.patch(pipe, threshold=0.0) as handle:
        assert torch.equal(_output(pipe, kwargs, 8), base)
        assert (handle.stats()["computed"], handle.stats()["predicted"]) == (8, 0)

    with accel.patch(pipe, threshold=1e9, warmup_steps=2) as handle:
        fast = _output(pipe, kwargs, 8)
        s = handle.stats()
        assert s["steps"] == 8 and s["predicted"] > 0 and 7 not in s["predicted_steps"]  # last step computed
        assert torch.isfinite(fast.float()).all()
        _output(pipe, kwargs, 5)  # another step count: fresh state, last step of *this* call computed
        s = handle.stats()
        assert s["steps"] == 5 and 4 not in s["predicted_steps"] and s["predicted"] > 0

    assert torch.equal(_output(pipe, kwargs, 8), base)


def test_wan_pipeline_sequential_cfg_uncond_follows_cond():
    pipe, kwargs = tp.wan()
    pipe.set_progress_bar_config(disable=True)
    with accel.patch(pipe, threshold=1e9, warmup_steps=2) as handle:
        _output(pipe, kwargs, 8)
        per = handle.stats()["per_context"]
    assert set(per) == {"cond", "uncond"} and per["cond"] == per["uncond"]


def test_wan_2_2_experts_report_one_run_and_each_warms_up_on_its_own_steps():
    from diffusers import WanPipeline

    from accel.pipelines.tiny import tiny_wan_transformer

    pipe, kwargs = tp.wan()
    pipe = WanPipeline(**{**pipe.components, "transformer_2": tiny_wan_transformer()}, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    with accel.patch(pipe, threshold=1e9, warmup_steps=2) as handle:
        _output(pipe, kwargs, 12)
        stats, totals = handle.stats(), handle.totals()
    first_of_expert_2 = len(calls) // 2  # expert 1's steps, two calls (cond, uncond) each
    assert 0 < first_of_expert_2 < 12
    assert stats["steps"] == totals["steps"] == 12  # the experts' steps add up to the run's
    assert stats["predicted"] == len(stats["predicted_steps"]) > 0
    assert not {0, 1, first_of_expert_2, first_of_expert_2 + 1} & set(stats["predicted_steps"])


def test_first_block_cache_through_accel_equals_diffusers_enable_cache():
    from diffusers.hooks import FirstBlockCacheConfig

    pipe, kwargs = tp.wan()
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    theirs = _output(pipe, kwargs, 8)
    pipe.transformer.disable_cache()
    with accel.patch(pipe, method="first_block_cache", threshold=0.2) as handle:
        ours = _output(pipe, kwargs, 8)
        assert handle.stats()["predicted"] > 0
    assert torch.equal(ours, theirs)
