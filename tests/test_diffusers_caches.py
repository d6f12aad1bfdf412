"""diffusers' own caches through accel.patch: they must really engage, and report what they skipped."""

import pytest
import torch

import accel
import tiny_models as tm
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
