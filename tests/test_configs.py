"""Typed configs: validated at construction, one per method, the same through the short form; bad input to
`accel.patch` and `accel.register_model` answered before the model is touched, with the argument named."""

import math

import pytest
import torch
from diffusers import hooks as diffusers_hooks

import accel
import tiny_models as tm
from accel.methods import METHODS


def _hooks(model):
    return sorted((n, h) for n, m in model.named_modules() if hasattr(m, "_diffusers_hook") for h in m._diffusers_hook._hook_order)


BAD_OPTIONS = [  # (patch keyword arguments, exception, a word the message must hold)
    ({"method": "warp_speed"}, ValueError, "warp_speed"),
    ({"method": 3}, TypeError, "method"),
    ({"threshold": "0.1"}, TypeError, "threshold"),
    ({"threshold": torch.tensor(0.1)}, TypeError, "threshold"),
    ({"threshold": -0.1}, ValueError, "threshold"),
    ({"threshold": math.nan}, ValueError, "threshold"),
    ({"threshold": True}, TypeError, "threshold"),
    ({"warmup_steps": 1.5}, TypeError, "warmup_steps"),
    ({"first_block_order": -1}, ValueError, "first_block_order"),
    ({"last_block_order": "2"}, TypeError, "last_block_order"),
    ({"max_consecutive_predicted": -1}, ValueError, "max_consecutive_predicted"),
    ({"treshold": 0.1}, TypeError, "treshold"),
    ({"num_inference_steps": -5}, ValueError, "num_inference_steps"),
    ({"num_inference_steps": "10"}, TypeError, "num_inference_steps"),
    ({"method": "first_block_cache", "threshold": -0.5}, ValueError, "threshold"),
    ({"method": "first_block_cache", "threshold": "x"}, TypeError, "threshold"),
    ({"method": "first_block_cache", "thresh": 1}, TypeError, "thresh"),
    ({"method": "taylorseer", "cache_interval": -3}, ValueError, "cache_interval"),
    ({"method": "taylorseer", "cache_interval": 0}, ValueError, "cache_interval"),
    ({"method": "taylorseer", "max_order": -1}, ValueError, "max_order"),
    ({"method": "taylorseer", "disable_cache_before_step": 3, "disable_cache_after_step": 1}, ValueError,
     "disable_cache_after_step"),
    ({"method": "taylorseer", "cache_identifiers": "blocks"}, TypeError, "cache_identifiers"),
    ({"method": "taylorseer", "cache_identifiers": ["blocks.(0"]}, ValueError, "cache_identifiers"),
    ({"method": "taylorseer", "taylor_factors_dtype": torch.int8}, TypeError, "taylor_factors_dtype"),
    ({"method": "mag_cache", "mag_ratios": [1.0, math.nan, 1.0]}, ValueError, "mag_ratios"),
    ({"method": "mag_cache", "mag_ratios": []}, ValueError, "mag_ratios"),
    ({"method": "mag_cache", "mag_ratios": [1.0] * 4, "retention_ratio": 2.0}, ValueError, "retention_ratio"),
    ({"method": "mag_cache", "num_inference_steps": 10}, ValueError, "mag_ratios"),  # Wan: no ratios shipped
    ({"method": "mag_cache", "mag_ratios": [1.0] * 4}, ValueError, "num_inference_steps"),
    ({"method": accel.MagCacheConfig(mag_ratios=[1.0] * 4, num_inference_steps=8), "num_inference_steps": 4},
     ValueError, "num_inference_steps"),
    ({"method": "sparse_attention", "pattern": "abc"}, ValueError, "abc"),
    ({"method": "sparse_attention", "pattern": 3}, TypeError, "pattern"),
    ({"method": "linear_attention_kernels", "heads": 2}, TypeError, "heads"),
    ({"method": accel.CGTaylorConfig(), "threshold": 0.1}, TypeError, "threshold"),
    ({"method": object()}, TypeError, "config"),
]


@pytest.mark.parametrize("kwargs, error, word", BAD_OPTIONS, ids=lambda v: repr(v)[:40] if isinstance(v, dict) else "")
def test_bad_options_name_the_argument_and_leave_the_model_untouched(kwargs, error, word):
    model = tm.wan()
    before = _hooks(model)
    with pytest.raises(error) as raised:
        accel.patch(model, **kwargs)
    assert word in str(raised.value)
    assert _hooks(model) == before and not hasattr(model, "_accel_handle") and model._cache_config is None


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_a_config_that_the_short_form_builds(name):
    method = METHODS[name]
    config = accel.make_config(name)
    assert type(config) is method.config_cls and accel.methods.method_of(config) is method


def test_diffusers_own_configs_are_accepted_and_validated():
    model = tm.wan()
    with accel.patch(model, diffusers_hooks.FirstBlockCacheConfig(threshold=0.2)) as handle:
        assert handle.method == "first_block_cache" and isinstance(handle.configs[0], accel.FirstBlockCacheConfig)
    with pytest.raises(ValueError, match="threshold"):
        accel.patch(model, diffusers_hooks.FirstBlockCacheConfig(threshold=-1.0))
    assert _hooks(model) == []


def test_typed_and_short_forms_patch_alike():
    x = tm.inputs(model := tm.wan())
    outs = []
    for how in (accel.CGTaylorConfig(threshold=1e9, warmup_steps=2), {"threshold": 1e9, "warmup_steps": 2}):
        handle = accel.patch(model, how, num_inference_steps=6) if not isinstance(how, dict) else \
            accel.patch(model, num_inference_steps=6, **how)
        with handle, torch.no_grad():
            outs.append(torch.stack([model(**x, timestep=tm.timestep(model, 999 - 100 * i), return_dict=False)[0]
                                     for i in range(6)]))
            assert handle.stats()["predicted"] > 0
    assert torch.equal(*outs)


def test_configs_validate_at_construction():
    with pytest.raises(ValueError, match="threshold"):
        accel.CGTaylorConfig(threshold=-1)
    with pytest.raises(ValueError, match="cache_interval"):
        accel.TaylorSeerCacheConfig(cache_interval=0)
    assert isinstance(accel.TaylorSeerCacheConfig(), diffusers_hooks.TaylorSeerCacheConfig)  # usable by diffusers too


def test_a_removed_handle_refuses_to_be_used_again():
    model = tm.wan()
    handle = accel.patch(model)
    handle.remove()
    for use in (lambda: handle.__enter__(), handle.reset):
        with pytest.raises(RuntimeError, match="removed"):
            use()
    assert handle.stats()["method"] == "cg_taylor"  # the last statistics stay readable


BAD_REGISTRATIONS = [  # (register_model keyword arguments, exception, a word the message must hold)
    ({"block_lists": "blocks"}, TypeError, "block_lists"),
    ({"block_lists": ()}, TypeError, "block_lists"),
    ({"block_lists": ("blocks", 3)}, TypeError, "block_lists"),
    ({"block_lists": ("blocks",), "family": "wann"}, ValueError, "family"),
    ({"block_lists": ("blocks",), "cond_half": "last"}, TypeError, "cond_half"),
    ({"block_lists": ("blocks",), "block_metadata": {torch.nn.Linear: "hidden first"}}, TypeError, "block_metadata"),
]


@pytest.mark.parametrize("kwargs, error, word", BAD_REGISTRATIONS, ids=lambda v: repr(v)[:40] if isinstance(v, dict) else "")
def test_bad_registrations_name_the_argument(kwargs, error, word):
    class MyModel(torch.nn.Module):
        pass

    with pytest.raises(error, match=word):
        accel.register_model(MyModel, **kwargs)
    with pytest.raises(NotImplementedError):  # nothing was registered
        accel.models.spec_for(MyModel())


def test_register_model_takes_a_class_not_an_instance():
    with pytest.raises(TypeError, match="model_cls"):
        accel.register_model(tm.wan(), block_lists=("blocks",))


def test_a_user_class_sharing_a_diffusers_name_is_not_that_class():
    WanTransformer3DModel = type("WanTransformer3DModel", (torch.nn.Module,), {})
    with pytest.raises(NotImplementedError, match="WanTransformer3DModel"):
        accel.models.spec_for(WanTransformer3DModel())


def test_sparse_attention_config_docstring_names_every_pattern():
    from accel.attention.sparse import PATTERNS

    missing = [name for name in PATTERNS if name not in accel.SparseAttentionConfig.__doc__]
    assert not missing, f"SparseAttentionConfig's docstring does not list {missing}"
