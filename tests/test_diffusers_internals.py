"""Every private diffusers name accel relies on still means what it did (a diffusers release that moves or changes
one fails here, by name), and hook removal stays correct whatever was registered after accel's hooks."""

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, ModelHook

import accel
import tiny_models as tm
from accel import diffusers_internals as internals

HOOK_NAMES = ["FBC_LEADER_BLOCK_HOOK", "FBC_BLOCK_HOOK", "MAG_CACHE_LEADER_BLOCK_HOOK", "MAG_CACHE_BLOCK_HOOK",
              "TAYLORSEER_CACHE_HOOK", "PAB_HOOK", "FASTER_CACHE_DENOISER_HOOK", "FASTER_CACHE_BLOCK_HOOK"]
HOOK_NAME_TUPLES = {"SEA_CACHE_HOOKS": 4, "TEXT_KV_CACHE_HOOKS": 2}
NAME_LISTS = ["ALL_TRANSFORMER_BLOCK_IDENTIFIERS", "TAYLORSEER_BLOCK_IDENTIFIERS", "TAYLORSEER_PROJ_OUT_IDENTIFIERS",
              "FASTER_CACHE_LAYER_IDENTIFIERS"]
CLASS_LISTS = ["ATTENTION_CLASSES", "FEEDFORWARD_CLASSES"]
CLASSES = ["BaseState", "StateManager", "CacheContext", "TransformerBlockMetadata", "TransformerBlockRegistry", "CacheMixin"]


def test_the_checked_versions_are_named():
    assert internals.CHECKED_VERSIONS and all(v.count(".") == 2 for v in internals.CHECKED_VERSIONS)


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_hook_names_are_strings(name):
    assert isinstance(getattr(internals, name), str) and getattr(internals, name)


@pytest.mark.parametrize("name, length", HOOK_NAME_TUPLES.items())
def test_hook_name_tuples_hold_distinct_strings(name, length):
    value = getattr(internals, name)
    assert isinstance(value, tuple) and len(set(value)) == length and all(isinstance(v, str) and v for v in value)


def _registered_hooks(model) -> set[str]:
    return {name for m in model.modules() if hasattr(m, "_diffusers_hook") for name in m._diffusers_hook._hook_order}


WIDE = {"spatial_attention_timestep_skip_range": (-1, 1001)}


@pytest.mark.parametrize("method, options", [
    ("first_block_cache", {}), ("taylorseer", {}), ("mag_cache", {"mag_ratios": [1.0] * 4}),
    ("pyramid_attention_broadcast", WIDE), ("faster_cache", {**WIDE, "tensor_format": "BCFHW"}), ("sea_cache", {}),
])
def test_the_hook_names_name_every_hook_the_caches_register(method, options):
    from accel.diffusers_caches import DIFFUSERS_METHODS
    from accel.patch import COUNTER_HOOK, STEP_HOOK

    model = tm.wan()
    named = DIFFUSERS_METHODS[method](model, accel.make_config(method, **options), 4, None).hook_names
    with accel.patch(model, method=method, num_inference_steps=4, **options):
        registered = _registered_hooks(model) - {STEP_HOOK, COUNTER_HOOK}
    assert registered and registered <= set(named)  # (SeaCache's post-norm hook is for some models only)
    assert _registered_hooks(model) == set()  # so removal found them all


@pytest.mark.parametrize("name", NAME_LISTS)
def test_identifier_lists_hold_strings(name):
    value = getattr(internals, name)
    assert len(value) > 0 and all(isinstance(v, str) for v in value)


@pytest.mark.parametrize("name", CLASS_LISTS)
def test_class_lists_hold_classes(name):
    value = getattr(internals, name)
    assert isinstance(value, tuple) and value and all(isinstance(c, type) for c in value)


FUNCTIONS = ["get_wan_qkv_projections", "wan_vae_unpatchify", "set_cache_context"]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_functions_are_callable(name):
    assert callable(getattr(internals, name))


@pytest.mark.parametrize("name", CLASSES)
def test_classes_are_classes(name):
    assert isinstance(getattr(internals, name), type)


def test_cache_context_setter_sets_the_state_managers_context():
    model = tm.wan()
    HookRegistry.check_if_exists_or_initialize(model)
    internals.set_cache_context(model, internals.CacheContext("cond"))
    internals.set_cache_context(model, None)


def test_find_hook_finds_the_first_module_with_the_hook():
    model = tm.wan()
    assert internals.find_hook(model, internals.MAG_CACHE_LEADER_BLOCK_HOOK) is None
    with accel.patch(model, method="mag_cache", mag_ratios=[1.0] * 4, num_inference_steps=4):
        module, hook = internals.find_hook(model, internals.MAG_CACHE_BLOCK_HOOK)
        assert module is model.blocks[1] and hook is module._diffusers_hook.get_hook(internals.MAG_CACHE_BLOCK_HOOK)


def test_mag_cache_keeps_its_calibration_ratios_in_the_state_of_its_head_hooks_manager():
    model = tm.wan()
    with accel.patch(model, method="mag_cache", calibrate=True, num_inference_steps=4):
        _, hook = internals.find_hook(model, internals.MAG_CACHE_LEADER_BLOCK_HOOK)
        _run(model, tm.inputs(model), steps=2)  # fewer than the config's steps: diffusers has not emptied the list
        hook.state_manager.set_context(internals.CacheContext("default"))  # accel's context for context-less calls
        assert len(hook.state_manager.get_state().calibration_ratios) == 2


def test_block_registry():
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    assert internals.TransformerBlockRegistry.get(WanTransformerBlock).return_hidden_states_index == 0  # registers
    assert internals.block_is_registered(WanTransformerBlock)


def test_cache_mixin_marker_makes_enable_cache_refuse():
    model = tm.wan()
    assert internals.enabled_cache_config(model) is None
    internals.mark_cache_enabled(model, accel.CGTaylorConfig())
    with pytest.raises(ValueError, match="already been enabled"):
        model.enable_cache(FirstBlockCacheConfig())
    internals.mark_cache_enabled(model, None)
    model.enable_cache(FirstBlockCacheConfig())
    model.disable_cache()


class _Counting(ModelHook):
    """A hook that wraps the forward (new_forward), as diffusers' caches and ours do."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def new_forward(self, module, *args, **kwargs):
        self.calls += 1
        return self.fn_ref.original_forward(*args, **kwargs)


def _run(model, x, steps=4):
    with torch.no_grad():
        return torch.stack([model(**x, timestep=tm.timestep(model, 999 - 200 * i), return_dict=False)[0]
                            for i in range(steps)])


@pytest.mark.parametrize("user_hook_first", [True, False])
def test_remove_is_exact_whatever_was_registered_before_or_after(user_hook_first):
    model = tm.wan()
    x = tm.inputs(model)
    base = _run(model, x)
    registry, hook = HookRegistry.check_if_exists_or_initialize(model), _Counting()
    if user_hook_first:
        registry.register_hook(hook, "user")
    handle = accel.patch(model, threshold=1e9, warmup_steps=1, num_inference_steps=4)
    if not user_hook_first:
        registry.register_hook(hook, "user")  # after accel's step hook: diffusers' own removal would bypass it
    _run(model, x)
    handle.remove()
    calls = hook.calls
    assert torch.equal(_run(model, x), base) and hook.calls == calls + 4  # exact, and the user's hook still runs
    registry.remove_hook("user")
    assert torch.equal(_run(model, x), base)


def test_a_second_cache_is_refused_in_either_order():
    model = tm.wan()
    with accel.patch(model):
        with pytest.raises(ValueError, match="already been enabled"):
            model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))  # free again after remove()
    with pytest.raises(RuntimeError, match="disable_cache"):
        accel.patch(model)
    model.disable_cache()
    x = tm.inputs(model)
    with accel.patch(model, threshold=0.0, num_inference_steps=4) as handle:
        _run(model, x)
        assert handle.stats()["computed"] == 4
