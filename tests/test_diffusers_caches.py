"""diffusers' own caches through accel.patch: they must really engage, and report what they skipped."""

import pytest
import torch

import accel
import tiny_models as tm
import tiny_pipelines as tp
from test_cg_taylor import FAMILIES, STEPS, denoise


@pytest.mark.parametrize("build", FAMILIES, ids=lambda b: b.__name__)
@pytest.mark.parametrize(
    "method, options",
    [
        ("first_block_cache", {"threshold": 1e9}),
        ("taylorseer", {"cache_interval": 3, "disable_cache_before_step": 2}),
        ("mag_cache", {"threshold": 1e9, "mag_ratios": [1.0] * STEPS}),
    ],
)
def test_engages_on_every_family_and_counts_steps(build, method, options):
    model = build()
    x = tm.inputs(model)
    base = denoise(model, x)
    with accel.patch(model, method=method, num_inference_steps=STEPS, **options) as handle:
        out = denoise(model, x)
        stats = handle.stats()
    assert stats["steps"] == STEPS and 0 < stats["computed"] < STEPS
    assert stats["predicted"] == STEPS - stats["computed"] == len(stats["predicted_steps"])
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert torch.equal(denoise(model, x), base)


@pytest.mark.parametrize("method", ["first_block_cache", "taylorseer"])
def test_second_call_with_other_resolution_and_steps_on_a_model_without_cache_context(method):
    model = tm.dit()  # DiTTransformer2DModel has no cache_context: accel supplies one and resets per generation
    small = tm.inputs(model)
    big = {**small, "hidden_states": torch.randn(1, 4, 12, 12)}
    with accel.patch(model, method=method) as handle:
        denoise(model, small, steps=6)
        denoise(model, big, steps=9)
        assert handle.stats()["steps"] == 9


def test_taylorseer_hooks_wan_attention_and_ffn():
    model = tm.wan()
    with accel.patch(model, method="taylorseer"):
        hooked = [n for n, m in model.named_modules() if hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks
                  and "taylorseer_cache" in m._diffusers_hook.hooks]
    assert hooked == [f"blocks.{i}.{p}" for i in range(3) for p in ("attn1", "attn2", "ffn")]


def test_taylorseer_patterns_that_match_nothing_are_an_error():
    with pytest.raises(ValueError, match="match no module"):
        accel.patch(tm.wan(), method="taylorseer", cache_identifiers=[r"^blocks.*attn"])


def test_guidance_as_two_calls_without_cache_context_is_one_step_of_two_branches():
    model = tm.wan()
    x, text = tm.inputs(model)["hidden_states"], tm.inputs(model)["encoder_hidden_states"]

    def guided(latents, steps=6):  # as WanVideoToVideoPipeline: cond, then uncond, on the same latents, no context
        for t in torch.linspace(999, 100, steps):
            timestep = t.expand(1)
            cond = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text).sample
            uncond = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=torch.zeros_like(text)).sample
            latents = latents - 0.1 * (uncond + 3 * (cond - uncond))
        return latents

    base = guided(x)
    with accel.patch(model, method="cg_taylor", threshold=0.0) as handle:
        assert torch.equal(guided(x), base)  # skips nothing: changes nothing
        guided(x)
        totals = handle.totals()
    assert (totals["generations"], totals["context"], totals["steps"]) == (2, "default", 12)
    assert totals["per_context"]["uncond"] == {"steps": 12, "computed": 12}


WIDE = (-1, 1001)  # timestep ranges holding every step of the test loops


@pytest.mark.parametrize("build", FAMILIES, ids=lambda b: b.__name__)
@pytest.mark.parametrize("method, idle, busy", [
    ("pyramid_attention_broadcast", {"spatial_attention_block_skip_range": 1, "spatial_attention_timestep_skip_range": WIDE},
     {"spatial_attention_block_skip_range": 3, "spatial_attention_timestep_skip_range": WIDE}),
    ("faster_cache", {"spatial_attention_block_skip_range": 1, "unconditional_batch_skip_range": 1,
                      "spatial_attention_timestep_skip_range": WIDE, "unconditional_batch_timestep_skip_range": WIDE},
     {"spatial_attention_block_skip_range": 3, "unconditional_batch_skip_range": 3,
      "spatial_attention_timestep_skip_range": WIDE, "unconditional_batch_timestep_skip_range": WIDE}),
])
def test_attention_caches_change_nothing_when_they_skip_nothing_and_engage_otherwise(build, method, idle, busy):
    model = build()
    fmt = {"WanTransformer3DModel": "BCFHW", "SanaVideoTransformer3DModel": "BCFHW"}.get(type(model).__name__, "BCHW")
    extra = {"tensor_format": fmt} if method == "faster_cache" else {}
    if method == "faster_cache" and type(model).__name__ in ("FluxTransformer2DModel", "DiTTransformer2DModel"):
        pytest.skip("FasterCache needs image-shaped outputs (FLUX returns packed tokens) and text conditioning (DiT "
                    "takes class labels, which it refuses: test_faster_cache_refuses_class_conditioned_models)")
    x = tm.inputs(model, batch=2)  # a batch of two, as a pipeline batching [uncond, cond] (what FasterCache expects)
    base = denoise(model, x)
    with accel.patch(model, method=method, num_inference_steps=STEPS, **idle, **extra) as handle:
        assert torch.equal(denoise(model, x), base)
        assert handle.stats()["computed"] == STEPS
    with accel.patch(model, method=method, num_inference_steps=STEPS, **busy, **extra) as handle:
        out = denoise(model, x)
        stats = handle.stats()
    assert 0 < stats["computed"] < STEPS and stats["predicted"] == len(stats["predicted_steps"])
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert torch.equal(denoise(model, x), base)


@pytest.mark.parametrize("method", ["pyramid_attention_broadcast", "faster_cache"])
def test_attention_caches_refuse_guidance_as_two_calls_a_step(method):
    model = tm.wan()
    x = tm.inputs(model, batch=2)
    with accel.patch(model, method=method, num_inference_steps=STEPS), pytest.raises(RuntimeError, match="two calls"):
        denoise(model, x, contexts=("cond", "uncond"))


def test_faster_cache_refuses_a_batch_that_is_not_a_cfg_pair():
    model = tm.wan()
    with accel.patch(model, method="faster_cache", num_inference_steps=STEPS), pytest.raises(RuntimeError, match="is_guidance_distilled"):
        denoise(model, tm.inputs(model, batch=1))


def test_faster_cache_refuses_class_conditioned_models():
    with pytest.raises(ValueError, match="class_labels"):
        accel.patch(tm.dit(), method="faster_cache")


def test_sea_cache_on_wan_pipeline_changes_nothing_when_it_skips_nothing_and_engages_otherwise():
    pipe, kwargs = tp.wan()  # WanPipeline hands SeaCache the step index, sigma and step count in its cache contexts
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(**kwargs, num_inference_steps=8, generator=torch.Generator().manual_seed(0))[0]  # noqa: E731
    base = run()
    with accel.patch(pipe, method="sea_cache", threshold=0.0) as handle:
        assert torch.equal(run(), base) and handle.stats()["predicted"] == 0
    with accel.patch(pipe, method="sea_cache", threshold=1e9, max_consecutive_cached=0) as handle:
        fast = run()
        assert handle.stats()["predicted"] > 0 and not torch.equal(fast, base)
    assert torch.equal(run(), base)


def test_text_kv_cache_names_the_only_model_diffusers_implements_it_for():
    with pytest.raises(ValueError, match="NucleusMoE"):
        accel.patch(tm.wan(), method="text_kv_cache")


@pytest.mark.parametrize("options, error, word", [
    ({"method": "pyramid_attention_broadcast", "spatial_attention_block_skip_range": None}, ValueError, "at least one"),
    ({"method": "pyramid_attention_broadcast", "cross_attention_block_skip_range": 0}, ValueError, "cross_attention"),
    ({"method": "pyramid_attention_broadcast", "spatial_attention_timestep_skip_range": (800, 100)}, ValueError, "low < high"),
    ({"method": "pyramid_attention_broadcast", "current_timestep_callback": 3}, TypeError, "current_timestep_callback"),
    ({"method": "pyramid_attention_broadcast", "spatial_attention_block_identifiers": ["nothing_here"]}, ValueError, "no attention layer"),
    ({"method": "faster_cache", "tensor_format": "NCHW"}, ValueError, "tensor_format"),
    ({"method": "faster_cache", "unconditional_batch_skip_range": 0}, ValueError, "unconditional_batch_skip_range"),
    ({"method": "faster_cache", "alpha_low_frequency": "1.1"}, TypeError, "alpha_low_frequency"),
    ({"method": "sea_cache", "threshold": -1}, ValueError, "threshold"),
    ({"method": "sea_cache", "residual_order": 2}, ValueError, "residual_order"),
    ({"method": "sea_cache", "power_exp": 0.0}, ValueError, "power_exp"),
    ({"method": "text_kv_cache", "threshold": 1}, TypeError, "threshold"),
], ids=repr)
def test_bad_options_of_the_added_caches_name_the_argument(options, error, word):
    with pytest.raises(error, match=word):
        accel.patch(tm.wan(), **options)
