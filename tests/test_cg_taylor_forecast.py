"""CG-Taylor's numbers, checked against exact values: the forecast of the last block, the gate's error, which half
of a batched CFG call decides, and the step count of img2img schedules."""

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

import accel
import poly_model as pm
from accel.cg_taylor import gate_error

STEPS = 10


def run(model, x, steps=STEPS, batch=1):
    outs = []
    with torch.no_grad():
        for i in range(steps):
            with model.cache_context("cond", step_index=i, num_inference_steps=steps):
                outs.append(model(x, pm.timestep(i, batch))[0])
    return outs


@pytest.mark.parametrize("order", [2, 3])
def test_predicted_steps_equal_the_exact_polynomial_value(order):
    pm.register()
    model = pm.PolyModel(blocks=4)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    config = accel.CGTaylorConfig(threshold=1e-6, warmup_steps=3, first_block_order=order, last_block_order=order,
                                  max_consecutive_predicted=3)
    with accel.patch(model, config) as handle:
        outs = run(model, x)
        stats = handle.stats()
    assert stats["predicted_steps"] == [3, 4, 5, 7, 8]  # warm-up 0-2, the cap of 3, the last step computed
    for i, out in enumerate(outs):  # predicted or not, every output is the exact value
        torch.testing.assert_close(out, model.exact(x, i), rtol=1e-10, atol=1e-10)
    assert [blk.calls for blk in model.blocks] == [STEPS, STEPS - 5, STEPS - 5, STEPS - 5]  # block 0 always runs


def test_a_forecast_below_the_features_degree_is_off_by_the_known_amount():
    # Order 1 on a degree-2 feature f(i) = ... + C i^2: the line through the last two full steps misses f(i) by
    # 2C from steps i-1, i-2 (step 2) and by 3C from steps i-1, i-3 (steps 4, 6, 8: step i-2 was predicted).
    # A forecast from the wrong steps, spacing or series would miss by something else.
    pm.register()
    model = pm.PolyModel(blocks=3)
    x = torch.zeros(1, 6, 8, dtype=torch.float64)
    config = accel.CGTaylorConfig(threshold=1e9, warmup_steps=2, first_block_order=1, last_block_order=1,
                                  max_consecutive_predicted=1)
    with accel.patch(model, config) as handle:
        outs = run(model, x)
        assert handle.stats()["predicted_steps"] == [2, 4, 6, 8]
    c = model.blocks_coefficients()[2]
    for i, miss in {2: 2, 4: 3, 6: 3, 8: 3}.items():
        torch.testing.assert_close(outs[i], model.exact(x, i) - miss * c, rtol=1e-10, atol=1e-10)


def test_gate_error_is_the_relative_l1_error_of_the_deciding_half():
    g = torch.Generator().manual_seed(0)
    forecast, actual = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    expected = lambda f, a: ((f.double() - a.double()).abs().mean() / a.double().abs().mean()).item()  # noqa: E731
    assert gate_error(forecast, actual) == pytest.approx(expected(forecast, actual), rel=1e-6)
    assert gate_error(forecast, actual, "first") == pytest.approx(expected(forecast[:1], actual[:1]), rel=1e-6)
    assert gate_error(forecast, actual, "last") == pytest.approx(expected(forecast[1:], actual[1:]), rel=1e-6)


@pytest.mark.parametrize("forecast_dtype, actual_dtype", [
    (torch.float64, torch.float32), (torch.float32, torch.float64), (torch.float16, torch.float32),
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
], ids=str)
def test_gate_error_takes_any_pair_of_float_dtypes(forecast_dtype, actual_dtype):
    g = torch.Generator().manual_seed(0)
    forecast, actual = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    exact = gate_error(forecast.double(), actual.double())
    rel = 1e-2 if torch.finfo(forecast_dtype).bits == 16 or torch.finfo(actual_dtype).bits == 16 else 1e-6
    assert gate_error(forecast.to(forecast_dtype), actual.to(actual_dtype)) == pytest.approx(exact, rel=rel)


def test_gate_errors_reported_per_step_follow_the_formula():
    # Threshold 0: every step computed, so block 0's order-1 forecast at step i comes from steps i-1 and i-2 and
    # misses by 2C0 (block 0's C): the error is mean|2 C0| / mean|x + A0 + B0 i + C0 i^2|.
    pm.register()
    model = pm.PolyModel(blocks=3)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    config = accel.CGTaylorConfig(threshold=0.0, warmup_steps=2, first_block_order=1, last_block_order=1)
    with accel.patch(model, config) as handle:
        run(model, x)
        errors = handle.stats()["gate_errors"]
    c0 = model.blocks[0].coefficients[2]
    for i in range(2, STEPS - 1):
        expected = (2 * c0).abs().mean() / model.exact(x, i, upto=0).abs().mean()
        assert errors[i] == pytest.approx(expected.item(), rel=1e-5)
    assert errors[:2] == [None, None] and errors[-1] is None  # warm-up and the last step are not gated


@pytest.mark.parametrize("smooth_half, deciding_half, predicts", [
    ("last", "last", True), ("first", "last", False), ("first", "first", True), ("last", "first", False),
])
def test_batched_cfg_gates_on_the_conditional_half_only(smooth_half, deciding_half, predicts):
    # One half of the batch is a polynomial of the step (its forecast is exact), the other jumps at random each step:
    # the decision must follow the half the model's spec names as conditional.
    pm.register(cond_half=lambda args, kwargs, model: deciding_half)
    model = pm.PolyModel(blocks=3)
    g = torch.Generator().manual_seed(1)
    rough = 0 if smooth_half == "last" else 1
    config = accel.CGTaylorConfig(threshold=1e-3, warmup_steps=3, first_block_order=2, last_block_order=2)
    with accel.patch(model, config) as handle, torch.no_grad():
        for i in range(STEPS):
            x = torch.zeros(2, 6, 8, dtype=torch.float64)
            x[rough] = torch.randn(6, 8, generator=g, dtype=torch.float64)
            with model.cache_context("cond", step_index=i, num_inference_steps=STEPS):
                model(x, pm.timestep(i, 2))
        assert (handle.stats()["predicted"] > 0) == predicts


def test_sana_pipelines_gate_on_the_last_half():
    import tiny_pipelines as tp
    from accel.patch import _cond_half_reader

    pipe, _ = tp.sana()
    pipe._guidance_scale = 4.5  # SanaPipeline batches [uncond, cond] while guidance is on
    assert _cond_half_reader(pipe.transformer, pipe)((), {}) == "last"
    pipe._guidance_scale = 1.0
    assert _cond_half_reader(pipe.transformer, pipe)((), {}) is None


class _Img2Img(DiffusionPipeline):
    """The part of an img2img pipeline that matters here: the scheduler starts at `begin_index` (strength < 1)."""

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    def __call__(self, x, steps: int, begin: int):
        self.scheduler.set_timesteps(steps)
        self.scheduler.set_begin_index(begin)
        with torch.no_grad():
            for i in range(steps - begin):  # no cache context: the step count comes from the schedule
                x = self.transformer(x, pm.timestep(begin + i))[0]
        return x


def test_img2img_schedules_count_steps_from_their_begin_index():
    pm.register()
    pipe = _Img2Img(pm.PolyModel(blocks=3), FlowMatchEulerDiscreteScheduler())
    with accel.patch(pipe, threshold=1e9, warmup_steps=1, max_consecutive_predicted=9) as handle:
        pipe(torch.zeros(1, 6, 8, dtype=torch.float64), steps=10, begin=4)
        stats = handle.stats()
    assert stats["steps"] == 6 and stats["predicted_steps"] == [1, 2, 3, 4]  # step 5 of 6 is the last: computed
