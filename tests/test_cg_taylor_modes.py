"""CG-Taylor's modes: the paper's series form, fixed schedules without a gate, and the unconditional branch skipping
block 0 on predicted steps; each checked against exact values on the polynomial model, and each changing nothing
when it skips nothing."""

import pytest
import torch

import accel
import poly_model as pm
import tiny_models as tm
import tiny_pipelines as tp
from accel.cg_taylor import fraction_steps
from test_cg_taylor import FAMILIES, STEPS, denoise


def run(model, x, steps=STEPS, contexts=("cond",)):
    outs = []
    with torch.no_grad():
        for i in range(steps):
            for name in contexts:
                with model.cache_context(name, step_index=i, num_inference_steps=steps):
                    outs.append(model(x, pm.timestep(i))[0])
    return outs


def test_paper_series_misses_a_quadratic_by_the_known_amount_where_divided_differences_are_exact():
    # Full steps 0, 1, 2 of f(i) = x + A + B i + C i^2; the paper's order-2 factors are F1 = f(2) - f(1) = B + 3C and
    # F2 = 2C, so at step 2 + k it predicts f(2) + (B + 3C) k + C k^2 = f(2 + k) - C k. Divided differences: exact.
    pm.register()
    model = pm.PolyModel(blocks=3)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    c = model.blocks_coefficients()[2]
    for series, miss in (("paper", lambda k: -c * k), ("divided_differences", lambda k: 0 * c)):
        config = accel.CGTaylorConfig(series=series, schedule=[0, 1, 2], last_block_order=2)
        with accel.patch(model, config) as handle:
            outs = run(model, x, steps=6)
            assert handle.stats()["predicted_steps"] == [3, 4, 5]
        for i in range(6):
            torch.testing.assert_close(outs[i], model.exact(x, i) + miss(max(i - 2, 0)), rtol=1e-10, atol=1e-10)


def test_a_fixed_interval_computes_warmup_every_nth_and_the_last_step_and_never_runs_block_0_otherwise():
    pm.register()
    model = pm.PolyModel(blocks=4)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    config = accel.CGTaylorConfig(schedule=3, warmup_steps=3, last_block_order=2)
    with accel.patch(model, config) as handle:
        outs = run(model, x, steps=12)
        stats = handle.stats()
    computed = [0, 1, 2, 5, 8, 11]  # warm-up 0-2, then two predicted and one computed; the last step computed
    assert stats["predicted_steps"] == sorted(set(range(12)) - set(computed))
    assert [blk.calls for blk in model.blocks] == [len(computed)] * 4  # block 0 skipped with the others
    for i, out in enumerate(outs):  # a degree-2 feature, order 2: every forecast exact
        torch.testing.assert_close(out, model.exact(x, i), rtol=1e-10, atol=1e-10)


def test_a_list_of_steps_is_taken_literally_and_the_last_step_may_be_predicted():
    model = tm.wan()
    x = tm.inputs(model)
    with accel.patch(model, schedule=[0, 1, 4, 6], num_inference_steps=8) as handle:
        denoise(model, x, steps=8)
        assert handle.stats()["predicted_steps"] == [2, 3, 5, 7]


def test_a_late_model_computes_its_first_step_whatever_the_list_says():
    model = tm.wan()
    x = tm.inputs(model)
    with accel.patch(model, schedule=[0, 5]) as handle, torch.no_grad():
        for i in range(3, 8):  # joins at step 3 (Wan 2.2's second expert): nothing to forecast from before
            with model.cache_context("cond", step_index=i, num_inference_steps=8):
                model(**x, timestep=tm.timestep(model, 999 - i * 100), return_dict=False)
        assert handle.stats()["predicted_steps"] == [4, 6, 7]


@pytest.mark.parametrize("build", FAMILIES, ids=lambda b: b.__name__)
@pytest.mark.parametrize("options", [
    {"schedule": 1}, {"schedule": list(range(STEPS))}, {"threshold": 0.0, "series": "paper"},
    {"schedule": 1, "series": "paper", "last_block_order": 3},
    {"schedule": 1, "forecast": "residual", "damping": 0.5},
    {"schedule": 1, "last_block_order": 2, "order_reach": 1.0},
], ids=repr)
def test_modes_that_skip_nothing_change_nothing(build, options):
    model = build()
    x = tm.inputs(model)
    base = denoise(model, x, contexts=("cond", "uncond"))
    with accel.patch(model, num_inference_steps=STEPS, **options) as handle:
        assert torch.equal(denoise(model, x, contexts=("cond", "uncond")), base)
        assert handle.stats()["predicted"] == 0
    assert torch.equal(denoise(model, x, contexts=("cond", "uncond")), base)


@pytest.mark.parametrize("options", [{"threshold": 1e9, "warmup_steps": 2}, {"schedule": 3, "warmup_steps": 2}], ids=repr)
def test_the_unconditional_call_skips_block_0_on_predicted_steps(options):
    pipe, kwargs = tp.wan()  # WanPipeline: cond and uncond as two transformer calls a step
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.blocks[0].attn1.register_forward_pre_hook(lambda *_: calls.append(1))  # inside the block
    with accel.patch(pipe, **options) as handle:
        pipe(**kwargs, num_inference_steps=8, generator=torch.Generator().manual_seed(0))
        stats = handle.stats()
    per = stats["per_context"]
    assert per["uncond"] == per["cond"] and stats["predicted"] > 0
    cond_calls = 8 if "threshold" in options else per["cond"]["computed"]  # the gate runs block 0 every step
    assert len(calls) == cond_calls + per["uncond"]["computed"]


def test_both_branches_forecast_exactly_when_the_unconditional_one_skips_block_0():
    pm.register()
    model = pm.PolyModel(blocks=3)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    config = accel.CGTaylorConfig(threshold=1e-6, warmup_steps=3, first_block_order=2, last_block_order=2)
    with accel.patch(model, config) as handle:
        outs = run(model, x, contexts=("cond", "uncond"))
        assert handle.stats()["predicted"] > 0
    for i in range(STEPS):
        for out in outs[2 * i: 2 * i + 2]:
            torch.testing.assert_close(out, model.exact(x, i), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("options, error, word", [
    ({"series": "taylor"}, ValueError, "series"),
    ({"schedule": 0}, ValueError, "schedule"),
    ({"schedule": "sometimes"}, TypeError, "schedule"),
    ({"schedule": True}, TypeError, "schedule"),
    ({"schedule": []}, TypeError, "schedule"),
    ({"schedule": [1, 2]}, ValueError, "including 0"),
    ({"schedule": [0, 2, 2]}, ValueError, "distinct"),
    ({"schedule": [0, -1]}, ValueError, "schedule"),
    ({"schedule": [0, 1.5]}, TypeError, "schedule"),
    ({"schedule": 3, "threshold": 0.1}, ValueError, "threshold"),
    ({"schedule": 3, "max_consecutive_predicted": 2}, ValueError, "max_consecutive_predicted"),
    ({"schedule": [0, 3], "warmup_steps": 2}, ValueError, "warmup_steps"),
    ({"schedule": 1.0}, ValueError, "fraction"),
    ({"schedule": 0.0}, ValueError, "fraction"),
    ({"damping": 1.0}, ValueError, "damping"),
    ({"damping": -0.1}, ValueError, "damping"),
    ({"damping": "some"}, TypeError, "damping"),
    ({"order_reach": 0.0}, ValueError, "order_reach"),
    ({"order_reach": -1.0}, ValueError, "order_reach"),
    ({"order_reach": "far"}, TypeError, "order_reach"),
    ({"schedule": 0.4, "spacing": "wide"}, TypeError, "spacing"),
    ({"forecast": "input"}, ValueError, "forecast"),
], ids=repr)
def test_bad_mode_options_name_the_argument(options, error, word):
    with pytest.raises(error, match=word):
        accel.make_config("cg_taylor", **options)


def test_a_threshold_without_a_schedule_asks_for_the_gate_and_a_schedule_drops_the_gate_settings():
    gated = accel.CGTaylorConfig(threshold=0.1).resolved("wan")
    assert gated.schedule == "gate" and gated.threshold == 0.1
    fixed = accel.CGTaylorConfig(schedule=[0, 2]).resolved("wan")
    assert (fixed.threshold, fixed.max_consecutive_predicted, fixed.warmup_steps) == (None, None, None)
    assert accel.make_config("cg_taylor", schedule=[2, 0]).schedule == (0, 2)


def test_a_residual_forecast_adds_the_current_input_where_an_output_forecast_goes_stale():
    # The stack's residual is a polynomial of the step whatever the input, so an order-2 forecast of it is exact on
    # inputs that change from step to step; a forecast of the output is not.
    pm.register()
    model = pm.PolyModel(blocks=3)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    inputs = [x * (1 + 0.1 * i**3) for i in range(6)]  # cubic: beyond an order-2 forecast of the output
    for forecast, exact in (("residual", True), ("output", False)):
        config = accel.CGTaylorConfig(schedule=[0, 1, 2], last_block_order=2, forecast=forecast)
        outs = []
        with accel.patch(model, config) as handle, torch.no_grad():
            for i, xi in enumerate(inputs):
                with model.cache_context("cond", step_index=i, num_inference_steps=6):
                    outs.append(model(xi, pm.timestep(i))[0])
            assert handle.stats()["predicted_steps"] == [3, 4, 5]
        close = all(torch.allclose(out, model.exact(xi, i), rtol=1e-10, atol=1e-10)
                    for i, (out, xi) in enumerate(zip(outs, inputs)))
        assert close == exact, forecast


def test_order_reach_keeps_a_quadratic_forecast_only_as_far_as_its_full_steps_extend():
    pm.register()
    model = pm.PolyModel(blocks=3)  # degree 2 in the step: an order-2 forecast is exact, an order-1 one is not
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    config = accel.CGTaylorConfig(schedule=[0, 2, 4], last_block_order=2, order_reach=1.0)
    with accel.patch(model, config):
        outs = run(model, x, steps=10)
    for i in range(5, 10):  # the full steps extend 4 steps back from step 4: exact up to step 8, linear beyond
        assert torch.allclose(outs[i], model.exact(x, i), rtol=1e-10, atol=1e-10) == (i <= 8), i


def test_damping_pulls_the_forecast_back_toward_the_last_full_value_by_its_share():
    pm.register()
    model = pm.PolyModel(blocks=3, degree=1)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    config = accel.CGTaylorConfig(schedule=[0, 1], last_block_order=1, damping=0.3)
    with accel.patch(model, config):
        outs = run(model, x, steps=5)
    last_full = model.exact(x, 1)
    for i in range(2, 5):  # the linear forecast is exact: 70% of the way from step 1's value to it
        torch.testing.assert_close(outs[i], last_full + 0.7 * (model.exact(x, i) - last_full), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fraction, steps, warmup", [(0.45, 20, 4), (0.25, 20, 4), (0.4, 50, 4), (0.3, 10, 1)])
def test_a_fraction_computes_that_share_the_warmup_first_and_ends_on_the_second_to_last_step(fraction, steps, warmup):
    computed = sorted(fraction_steps(fraction, steps, warmup))
    assert len(computed) == round(fraction * steps)
    assert computed[:warmup] == list(range(warmup)) and computed[-1] == steps - 2
    gaps = [b - a for a, b in zip(computed[warmup - 1:], computed[warmup:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spread
    assert sorted(fraction_steps(0.45, 20, 4)) == [0, 1, 2, 3, 6, 9, 12, 15, 18]


@pytest.mark.parametrize("spacing", [0.5, 1.25, 2.0, 4.0])
@pytest.mark.parametrize("fraction, steps, warmup", [(0.4, 20, 4), (0.3, 20, 4), (0.6, 50, 2), (0.5, 12, 1)])
def test_spacing_packs_the_computed_steps_towards_the_start_or_the_end(fraction, steps, warmup, spacing):
    computed = sorted(fraction_steps(fraction, steps, warmup, spacing))
    assert len(computed) == round(fraction * steps)  # rounding never merges two steps
    assert computed[:warmup] == list(range(warmup)) and computed[-1] == steps - 2
    gaps = [b - a for a, b in zip(computed[warmup - 1:], computed[warmup:])]
    assert (gaps[0] <= gaps[-1]) if spacing > 1 else (gaps[0] >= gaps[-1])
    assert sorted(fraction_steps(0.4, 20, 4, 1.25)) == [0, 1, 2, 3, 6, 9, 13, 18]


def test_spacing_through_the_patch_and_where_it_has_no_effect():
    model = tm.wan()
    x = tm.inputs(model)
    with accel.patch(model, schedule=0.5, warmup_steps=2, spacing=2.0, num_inference_steps=STEPS) as handle:
        denoise(model, x)
        computed = sorted(set(range(STEPS)) - set(handle.stats()["predicted_steps"]))
    assert computed == sorted(fraction_steps(0.5, STEPS, 2, 2.0)) != sorted(fraction_steps(0.5, STEPS, 2))
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="spacing must be"):
            accel.CGTaylorConfig(spacing=bad)
    for schedule in (3, [0, 2], "gate"):
        with pytest.raises(ValueError, match="spacing would have no effect"):
            accel.CGTaylorConfig(schedule=schedule, spacing=1.5)
    # A family default's spacing is dropped, not an error, when the user picks another kind of schedule.
    assert accel.CGTaylorConfig(schedule=3).resolved("dit").spacing is None
    assert accel.CGTaylorConfig(schedule=0.5, spacing=2.0).resolved("dit").spacing == 2.0


def test_a_fraction_schedule_through_the_patch_and_without_a_step_count():
    model = tm.wan()
    x = tm.inputs(model)
    with accel.patch(model, schedule=0.5, warmup_steps=2, num_inference_steps=STEPS) as handle:
        denoise(model, x)
        computed = sorted(set(range(STEPS)) - set(handle.stats()["predicted_steps"]))
    assert computed == sorted(fraction_steps(0.5, STEPS, 2, 1.25))  # Wan's default spacing
    pm.register()
    poly = pm.PolyModel(blocks=3)
    with accel.patch(poly, schedule=0.5), torch.no_grad(), pytest.raises(ValueError, match="num_inference_steps"):
        for i in range(3):
            with poly.cache_context("cond", step_index=i):
                poly(torch.zeros(1, 6, 8, dtype=torch.float64), pm.timestep(i))


def test_a_residual_forecast_on_a_stack_that_changes_the_hidden_shape_is_a_clear_error():
    pm.register()
    model = pm.PolyModel(blocks=3)
    last = model.blocks[-1]
    last.forward = lambda hidden_states, timestep: hidden_states[:, :3]  # a stack that drops tokens at the end
    config = accel.CGTaylorConfig(schedule=[0, 1], forecast="residual")
    with accel.patch(model, config), pytest.raises(ValueError, match='forecast="output"'):
        run(model, torch.zeros(1, 6, 8, dtype=torch.float64), steps=2)


def test_the_default_on_a_bare_transformer_warns_then_asks_for_the_step_count(caplog):
    model = tm.wan()
    x = tm.inputs(model)
    with accel.patch(model), torch.no_grad(), pytest.raises(ValueError, match="num_inference_steps"):
        for i in range(3):  # a loop that gives the step index but not the count
            with model.cache_context("cond", step_index=i):
                model(**x, timestep=tm.timestep(model, 999 - i * 100), return_dict=False)
    assert "schedule=0.4 (a share of the steps) cannot run without it" in caplog.text
    pipe, kwargs = tp.wan()  # diffusers' pipelines pass the count in their cache_context: the transformer alone works
    pipe.set_progress_bar_config(disable=True)
    with accel.patch(pipe.transformer) as handle:
        pipe(**kwargs, num_inference_steps=10, generator=torch.Generator().manual_seed(0))
        assert handle.stats()["predicted_steps"] == [4, 5, 6, 7, 8, 9]  # 40% of 10: the 4 warm-up steps
