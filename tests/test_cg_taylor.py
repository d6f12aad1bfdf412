"""CG-Taylor on tiny random-init diffusers transformers, called as pipelines call them."""

import pytest
import torch

import accel
import tiny_models as tm

FAMILIES = [tm.wan, tm.flux, tm.dit, tm.pixart, tm.sana, tm.sana_video]
STEPS = 10


def denoise(model, x, steps=STEPS, contexts=("cond",)):
    """A loop shaped like a pipeline's: one transformer call per step and branch, timesteps falling."""
    outs = []
    with torch.no_grad():
        for i in range(steps):
            t = tm.timestep(model, 999 - i * (900 / steps), x["hidden_states"].shape[0])
            for name in contexts:
                if hasattr(model, "cache_context"):
                    with model.cache_context(name, step_index=i, num_inference_steps=steps):
                        outs.append(model(**x, timestep=t, return_dict=False)[0])
                else:
                    outs.append(model(**x, timestep=t, return_dict=False)[0])
    return torch.stack(outs)


@pytest.mark.parametrize("build", FAMILIES, ids=lambda b: b.__name__)
def test_threshold_zero_changes_nothing_and_remove_restores(build):
    model = build()
    x = tm.inputs(model)
    base = denoise(model, x)
    with accel.patch(model, threshold=0.0, num_inference_steps=STEPS) as handle:
        same = denoise(model, x)
        stats = handle.stats()
    assert torch.equal(same, base)
    assert (stats["computed"], stats["predicted"]) == (STEPS, 0)
    with accel.patch(model, threshold=1e9, warmup_steps=2, num_inference_steps=STEPS) as handle:
        fast = denoise(model, x)
        assert handle.stats()["predicted"] > 0
    assert torch.isfinite(fast).all() and not torch.equal(fast, base)
    assert torch.equal(denoise(model, x), base)  # removed by the context manager


def test_skip_rules_warmup_first_last_and_cap():
    model = tm.wan()
    x = tm.inputs(model)
    with accel.patch(model, threshold=1e9, warmup_steps=3, max_consecutive_predicted=2) as handle:
        denoise(model, x, steps=12)
        stats = handle.stats()
    # warm-up 0..2 computed; then two predicted, one computed, ...; last step (11) always computed.
    assert stats["predicted_steps"] == [3, 4, 6, 7, 9, 10]
    assert stats["computed"] == 6 and stats["steps"] == 12
    # the gate is evaluated only where a prediction is allowed (not in warm-up, at the cap or the last step)
    assert [i for i, e in enumerate(stats["gate_errors"]) if e is not None] == [3, 4, 6, 7, 9, 10]


def test_a_model_joining_a_run_late_warms_up_on_its_own_first_steps():
    """Wan 2.2's low-noise expert sees steps 15..19 of 20: steps 15..17 are its warm-up."""
    model = tm.wan()
    x = tm.inputs(model)
    with accel.patch(model, threshold=1e9, warmup_steps=3) as handle, torch.no_grad():
        for i in range(15, 20):
            with model.cache_context("cond", step_index=i, num_inference_steps=20):
                model(**x, timestep=tm.timestep(model, 999 - i * 45, 1), return_dict=False)
        stats = handle.stats()
    assert stats["predicted_steps"] == [18]  # 19 is the run's last step: computed


def test_cfg_batched_and_sequential_give_the_same_decisions():
    model = tm.dit()
    cond = tm.inputs(model, batch=1, seed=1)
    uncond = {**cond, "class_labels": torch.tensor([1000])}
    batched = {"hidden_states": torch.cat([cond["hidden_states"]] * 2),
               "class_labels": torch.cat([cond["class_labels"], uncond["class_labels"]])}
    thr = 0.05
    with accel.patch(model, threshold=thr, warmup_steps=2, num_inference_steps=STEPS) as h:
        denoise(model, batched)
        b = h.stats()
    # sequential: the same model with the branches in cache contexts, as Wan/FLUX pipelines call it
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    seq_model = tm.dit()
    with accel.patch(seq_model, threshold=thr, warmup_steps=2, num_inference_steps=STEPS) as h:
        with torch.no_grad():
            for i in range(STEPS):
                t = tm.timestep(seq_model, 999 - i * 90)
                for name, inp in (("cond", cond), ("uncond", uncond)):
                    _set_cache_context(seq_model, CacheContext(name, step_index=i, num_inference_steps=STEPS))
                    seq_model(**inp, timestep=t)
                    _set_cache_context(seq_model, None)
        s = h.stats()
    assert b["predicted_steps"] == s["predicted_steps"] and 0 < len(b["predicted_steps"]) < STEPS - 2
    for eb, es in zip(b["gate_errors"], s["gate_errors"]):
        assert (eb is None) == (es is None)
        if eb is not None:
            assert eb == pytest.approx(es, rel=1e-4, abs=1e-7)
    assert s["per_context"]["uncond"]["computed"] == s["computed"]  # uncond followed cond's decisions


def test_state_resets_per_call_and_two_models_do_not_share():
    a, b = tm.wan(), tm.wan()
    ha = accel.patch(a, threshold=1e9, warmup_steps=2)
    hb = accel.patch(b, threshold=0.0)
    fresh = tm.wan()
    for steps, x in ((8, tm.inputs(a)), (5, tm.inputs(a, batch=2)), (6, tm.inputs(a))):
        with accel.patch(fresh, threshold=1e9, warmup_steps=2):
            expected = denoise(fresh, x, steps)
        torch.testing.assert_close(denoise(a, x, steps), expected)  # same as a freshly patched model
        assert ha.stats()["steps"] == steps
        denoise(b, x, steps)
        assert hb.stats()["predicted"] == 0
    ha.remove(), hb.remove()


def test_new_generation_detected_without_step_index_from_rising_timestep():
    model = tm.dit()
    x = tm.inputs(model)
    with accel.patch(model, threshold=1e9, warmup_steps=2) as handle:  # no step count known
        denoise(model, x, steps=4)
        denoise(model, x, steps=7)
        assert handle.stats()["steps"] == 7


def _cast(x: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in x.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("build", FAMILIES, ids=lambda b: b.__name__)
def test_float64_float16_and_bfloat16_models(build, dtype):
    model = build().to(dtype)
    x = _cast(tm.inputs(model), dtype)
    base = denoise(model, x)
    with accel.patch(model, threshold=0.0, num_inference_steps=STEPS):
        assert torch.equal(denoise(model, x), base)
    with accel.patch(model, threshold=1e9, warmup_steps=2, num_inference_steps=STEPS) as h:
        out = denoise(model, x)
        assert out.dtype == dtype and torch.isfinite(out.float()).all() and h.stats()["predicted"] > 0
        assert all(e is None or e >= 0 for e in h.stats()["gate_errors"])


def test_works_under_torch_compile_with_the_gate_as_the_only_graph_break():
    from torch._dynamo.utils import counters

    model = tm.wan()
    x = tm.inputs(model)
    with accel.patch(model, threshold=1e9, warmup_steps=2, num_inference_steps=STEPS):
        eager = denoise(model, x)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    with accel.patch(compiled, threshold=1e9, warmup_steps=2, num_inference_steps=STEPS) as h:
        out = denoise(compiled, x)
        assert h.stats()["predicted"] > 0
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    breaks = list(counters["graph_break"])
    assert breaks and all("CGTaylorHeadHook._decide" in reason for reason in breaks), breaks
