"""accel.patch: targets, methods, bad input, handles."""

import pytest
import torch

import accel
import tiny_models as tm
from diffusers.hooks import HookRegistry


def _hooks(model):
    return sorted(
        (name, hook) for name, m in model.named_modules() if hasattr(m, "_diffusers_hook")
        for hook in m._diffusers_hook._hook_order
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "warp_speed"}, ValueError, "unknown method"),
        ({"threshold": -0.1}, ValueError, "threshold"),
        ({"first_block_order": -1}, ValueError, "first_block_order"),
        ({"last_block_order": -2}, ValueError, "last_block_order"),
        ({"warmup_steps": 1.5}, TypeError, "warmup_steps"),
        ({"treshold": 0.1}, TypeError, "unknown cg_taylor option"),
        ({"method": "first_block_cache", "thresh": 1}, TypeError, "valid"),
        ({"method": "mag_cache", "num_inference_steps": 10}, ValueError, "mag_ratios"),
        ({"method": "mag_cache", "mag_ratios": [1.0] * 4}, ValueError, "num_inference_steps"),
    ],
)
def test_bad_options_raise_and_leave_the_model_untouched(kwargs, error, match):
    model = tm.wan()
    before = _hooks(model)
    with pytest.raises(error, match=match):
        accel.patch(model, **kwargs)
    assert _hooks(model) == before and not hasattr(model, "_accel_handle")


def test_not_a_diffusers_target():
    with pytest.raises(TypeError, match="DiffusionPipeline or a diffusers model"):
        accel.patch(torch.nn.Linear(2, 2))


def test_unknown_model_names_its_class_and_how_to_describe_it():
    from diffusers import UNet2DModel

    with pytest.raises(NotImplementedError, match="UNet2DModel.*register_model"):
        accel.patch(UNet2DModel(block_out_channels=(4, 8), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4, sample_size=8))


def test_register_model_teaches_a_new_class():
    from diffusers import WanTransformer3DModel

    class MyWan(WanTransformer3DModel):  # subclasses of known models are known already
        pass

    assert accel.models.spec_for(MyWan.__new__(MyWan)).family == "wan"

    class Renamed(torch.nn.Module):
        pass

    with pytest.raises(NotImplementedError):
        accel.models.spec_for(Renamed())
    accel.register_model(Renamed, block_lists=("blocks",), family="wan")
    assert accel.models.spec_for(Renamed()).block_lists == ("blocks",)


def test_diffusers_block_caches_refuse_blocks_they_cannot_find():
    from diffusers import ModelMixin
    from diffusers.models.attention import BasicTransformerBlock

    class Staged(ModelMixin):
        def __init__(self):
            super().__init__()
            self.stages = torch.nn.ModuleList([BasicTransformerBlock(8, 1, 8) for _ in range(3)])

    accel.register_model(Staged, block_lists=("stages",))
    model = Staged()
    for method, options in (("first_block_cache", {}), ("mag_cache", {"mag_ratios": [1.0] * 4})):
        with pytest.raises(ValueError, match=f"{method}: diffusers finds transformer blocks only in"):
            accel.patch(model, method=method, num_inference_steps=4, **options)
        assert _hooks(model) == []
    accel.patch(model, method="cg_taylor").remove()  # which follows the registered lists


def test_patching_twice_raises_and_remove_is_idempotent():
    model = tm.wan()
    handle = accel.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        accel.patch(model, method="first_block_cache")
    handle.remove()
    handle.remove()
    assert _hooks(model) == []
    accel.patch(model, method="first_block_cache").remove()


def test_a_diffusers_cache_through_accel_is_known_to_diffusers():
    from diffusers.hooks import FirstBlockCacheConfig

    model = tm.wan()
    with accel.patch(model, method="first_block_cache"):
        with pytest.raises(ValueError, match="already been enabled"):
            model.enable_cache(FirstBlockCacheConfig())
    assert model._cache_config is None


def test_diffusers_cache_already_enabled_is_refused():
    from diffusers.hooks import FirstBlockCacheConfig

    model = tm.wan()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(RuntimeError, match="disable_cache"):
        accel.patch(model)


def test_defaults_follow_the_model_family():
    from accel.cg_taylor import default_config

    for build, family in ((tm.wan, "wan"), (tm.flux, "flux"), (tm.dit, "dit"), (tm.sana, "generic")):
        with accel.patch(build()) as handle:  # nothing given: the family's fixed schedule
            assert handle.stats()["config"][0] == default_config(family).__dict__
        with accel.patch(build(), schedule="gate") as handle:
            assert handle.stats()["config"][0] == accel.PRESETS[family].__dict__
    with accel.patch(tm.wan(), threshold=0.2) as handle:
        cfg = handle.stats()["config"][0]
        assert cfg["threshold"] == 0.2 and cfg["first_block_order"] == 3 and cfg["schedule"] == "gate"  # Wan's gate


@pytest.mark.parametrize("build", [tm.wan, tm.flux, tm.dit, tm.pixart, tm.sana, tm.sana_video], ids=lambda b: b.__name__)
def test_a_quarter_of_the_steps_is_reachable_on_every_family(build):
    from test_cg_taylor import denoise

    model = build()
    x = tm.inputs(model)
    for options in ({"threshold": 1e9}, {"schedule": 5, "warmup_steps": 1}):  # the gate's preset passing everywhere
        with accel.patch(model, num_inference_steps=20, **options) as handle:
            denoise(model, x, steps=20)
            assert handle.stats()["computed"] <= 5, options


def test_stats_before_any_call():
    with accel.patch(tm.wan()) as handle:
        s = handle.stats()
    assert s["computed"] == 0 and s["predicted"] == 0 and s["method"] == "cg_taylor"


def test_remove_leaves_no_hook_behind():
    model = tm.flux()
    for method in ("cg_taylor", "first_block_cache", "taylorseer"):
        accel.patch(model, method=method).remove()
    registries = [m._diffusers_hook for _, m in model.named_modules() if hasattr(m, "_diffusers_hook")]
    assert all(not r.hooks for r in registries)
    assert isinstance(HookRegistry.check_if_exists_or_initialize(model), HookRegistry)


@pytest.mark.parametrize("method", ["cg_taylor", "taylorseer", "first_block_cache"])
def test_remove_frees_cached_features_without_the_cyclic_collector(method):
    """Hook state sits in reference cycles; remove() resets it, so its tensors go at once, not at the next gc."""
    import gc

    def tensors() -> int:
        return sum(isinstance(o, torch.Tensor) and not isinstance(o, torch.nn.Parameter) for o in gc.get_objects())

    model, steps = tm.wan().eval(), 4
    x = tm.inputs(model)
    gc.collect()
    gc.disable()
    try:
        before = tensors()
        handle = accel.patch(model, method=method, num_inference_steps=steps)
        with torch.no_grad():
            for i in range(steps):
                with model.cache_context("cond"):
                    model(**x, timestep=tm.timestep(model, 900 - 200 * i))
        assert tensors() > before  # something was cached
        handle.remove()
        assert tensors() == before
    finally:
        gc.enable()


def test_attention_methods_compose_with_one_cache_and_refuse_unsupported_models():
    import tiny_pipelines as tp

    pipe, kwargs = tp.sana()
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(**kwargs, num_inference_steps=4, generator=torch.Generator().manual_seed(0))[0]  # noqa: E731
    base = run()
    with accel.patch(pipe, method="linear_attention_kernels") as attention:
        fast = run()
        torch.testing.assert_close(fast, base, rtol=1e-3, atol=1e-3)
        with pytest.raises(RuntimeError, match="already patched"):
            accel.patch(pipe, method="linear_attention_kernels")
        with accel.patch(pipe, threshold=0.0) as cache:  # a cache on top of the kernels
            assert torch.equal(run(), fast) and cache.stats()["predicted"] == 0
        assert attention.stats()["method"] == "linear_attention_kernels"
    assert torch.equal(run(), base)
    with pytest.raises((ValueError, NotImplementedError, TypeError), match="linear attention|SANA|Sana"):
        accel.patch(tm.wan(), method="linear_attention_kernels")


def test_stats_describe_callbacks_by_name_without_copying_what_they_hold():
    """PAB / FasterCache configs carry a callback holding the pipeline: stats() must not deep-copy it."""
    import dataclasses

    from accel.patch import _describe

    class Holder:
        def __deepcopy__(self, memo):
            raise AssertionError("deep-copied")

        def __call__(self):
            return 0

    @dataclasses.dataclass
    class Inner:
        threshold: float = 0.1

    @dataclasses.dataclass
    class Config:
        callback: object
        inner: Inner
        blocks: tuple = (0, 1)

    described = _describe(Config(Holder(), Inner()))
    assert isinstance(described["callback"], str)
    assert described["inner"] == {"threshold": 0.1} and described["blocks"] == (0, 1)
