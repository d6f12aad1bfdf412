"""accel.calibrate_mag_ratios: one run measures MagCache's ratios for any model, and leaves nothing behind."""

import math

import pytest
import torch
from diffusers import ModelMixin, WanPipeline
from diffusers.models.attention import BasicTransformerBlock

import accel
import tiny_models as tm
import tiny_pipelines as tp
from test_cg_taylor import STEPS, denoise


def _hooks_left(model: torch.nn.Module) -> list:
    """diffusers hooks, torch forward hooks and cache markers still on the model."""
    left = [(name, hook) for name, m in model.named_modules() if hasattr(m, "_diffusers_hook")
            for hook in m._diffusers_hook._hook_order]
    left += [(name, "forward hook") for name, m in model.named_modules() if m._forward_hooks]
    left += [(attr, "marker") for attr in ("_cache_config", "_accel_handle") if getattr(model, attr, None) is not None]
    return left


def _pipeline(build):
    """The pipeline, its call's arguments (8 steps) and the seeded call (a tensor: DiT gives NumPy)."""
    pipe, kwargs = build()
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**kwargs, "num_inference_steps": 8}
    return pipe, kwargs, lambda: torch.as_tensor(pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0])


# Wan: guidance as two calls a step, in cache contexts, and a CacheMixin transformer the pipeline resets at the end;
# DiT: guidance batched, no cache context.
@pytest.mark.parametrize("build", [tp.wan, tp.dit], ids=lambda b: b.__name__)
def test_calibrated_ratios_reproduce_the_run_when_nothing_is_skipped_and_skip_when_loose(build):
    pipe, kwargs, run = _pipeline(build)
    base = run()
    ratios = accel.calibrate_mag_ratios(pipe, **kwargs, generator=torch.Generator().manual_seed(0))
    assert len(ratios) == 8 and ratios[0] == 1.0 and all(math.isfinite(r) and r > 0 for r in ratios)
    assert _hooks_left(pipe.transformer) == [] and torch.equal(run(), base)

    with accel.patch(pipe, accel.MagCacheConfig(mag_ratios=ratios, threshold=0.0), num_inference_steps=8) as handle:
        assert torch.equal(run(), base) and handle.stats()["predicted"] == 0
    with accel.patch(pipe, accel.MagCacheConfig(mag_ratios=ratios, threshold=1e9), num_inference_steps=8) as handle:
        fast = run()
        assert handle.stats()["predicted"] > 0 and not torch.equal(fast, base)


@pytest.mark.parametrize("contexts", [("cond",), ("cond", "uncond")])
def test_a_bare_transformer_is_calibrated_through_its_loop_one_ratio_per_step(contexts):
    model = tm.wan()
    x = tm.inputs(model)
    ratios = accel.calibrate_mag_ratios(model, denoise, model, x, contexts=contexts)
    assert len(ratios) == STEPS and all(math.isfinite(r) and r > 0 for r in ratios)  # per branch, not per call
    assert _hooks_left(model) == []


def test_a_model_without_cache_context_is_calibrated_too():
    model = tm.dit()
    assert len(accel.calibrate_mag_ratios(model, denoise, model, tm.inputs(model))) == STEPS


def test_a_failing_generation_leaves_no_hook():
    model = tm.wan()

    def fails():
        denoise(model, tm.inputs(model), steps=2)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        accel.calibrate_mag_ratios(model, fails)
    assert _hooks_left(model) == []


class _Staged(ModelMixin):
    def __init__(self):
        super().__init__()
        self.stages = torch.nn.ModuleList([BasicTransformerBlock(8, 1, 8) for _ in range(2)])


def _staged() -> _Staged:
    """A model known to accel whose blocks are under a name diffusers' MagCache does not search."""
    accel.register_model(_Staged, block_lists=("stages",))
    return _Staged()


def _two_transformers():
    pipe, _ = tp.wan()
    return WanPipeline(**{**pipe.components, "transformer_2": tm.wan()})


@pytest.mark.parametrize("target, args, kwargs, error, match", [
    (lambda: torch.nn.Linear(2, 2), (), {}, TypeError, "expects a diffusers DiffusionPipeline"),
    (lambda: "pipe", (), {}, TypeError, "expects a diffusers DiffusionPipeline"),
    (tm.wan, (), {}, TypeError, "callable that runs one generation"),
    (tm.wan, ({"hidden_states": None},), {}, TypeError, "callable that runs one generation"),
    (lambda: tp.wan()[0], (), {"num_inference_steps": 0}, ValueError, "num_inference_steps must be an integer >= 1"),
    (_two_transformers, (), {}, ValueError, "two transformers"),
    (tm.wan, (lambda: None,), {}, ValueError, "never called WanTransformer3DModel"),
    (_staged, (lambda: None,), {}, ValueError, "diffusers finds transformer blocks only in"),
], ids=["module", "string", "no-loop", "not-callable", "zero-steps", "transformer_2", "no-call", "blocks-elsewhere"])
def test_bad_input_is_a_clear_error_and_leaves_no_hook(target, args, kwargs, error, match):
    target = target()
    with pytest.raises(error, match=match):
        accel.calibrate_mag_ratios(target, *args, **kwargs)
    model = getattr(target, "transformer", target)
    if isinstance(model, torch.nn.Module):
        assert _hooks_left(model) == []
