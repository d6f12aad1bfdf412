"""Every private diffusers name accel relies on, in one place.

diffusers keeps its hook machinery's details private: the hook names of its caches, the block identifiers they search
for, the cache-context setter, the block registry. accel uses them to count what diffusers' caches skip, to walk blocks
as diffusers does and to give context-less pipelines a cache context. Each is resolved here, by name, so that a
diffusers release that moves one fails at `import accel` with the name, and `tests/test_diffusers_internals.py`
checks each one's kind. Checked against the diffusers versions in CHECKED_VERSIONS.
"""

from __future__ import annotations

import importlib

import diffusers
import torch

CHECKED_VERSIONS = ("0.42.1",)


def _private(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(
            f"accel relies on diffusers' private `{module}.{name}`, checked with diffusers "
            f"{', '.join(CHECKED_VERSIONS)}; this diffusers ({diffusers.__version__}) has no such name ({err})"
        ) from None


# Hook names of diffusers' caches (to count the steps they let run, and to remove them).
FBC_LEADER_BLOCK_HOOK = _private("diffusers.hooks.first_block_cache", "_FBC_LEADER_BLOCK_HOOK")
FBC_BLOCK_HOOK = _private("diffusers.hooks.first_block_cache", "_FBC_BLOCK_HOOK")
MAG_CACHE_LEADER_BLOCK_HOOK = _private("diffusers.hooks.mag_cache", "_MAG_CACHE_LEADER_BLOCK_HOOK")
MAG_CACHE_BLOCK_HOOK = _private("diffusers.hooks.mag_cache", "_MAG_CACHE_BLOCK_HOOK")
TAYLORSEER_CACHE_HOOK = _private("diffusers.hooks.taylorseer_cache", "_TAYLORSEER_CACHE_HOOK")
PAB_HOOK = _private("diffusers.hooks.pyramid_attention_broadcast", "_PYRAMID_ATTENTION_BROADCAST_HOOK")
FASTER_CACHE_DENOISER_HOOK = _private("diffusers.hooks.faster_cache", "_FASTER_CACHE_DENOISER_HOOK")
FASTER_CACHE_BLOCK_HOOK = _private("diffusers.hooks.faster_cache", "_FASTER_CACHE_BLOCK_HOOK")
SEA_CACHE_HOOKS = tuple(_private("diffusers.hooks.sea_cache", name) for name in (
    "_SEA_CACHE_ROOT_HOOK", "_SEA_CACHE_LEADER_BLOCK_HOOK", "_SEA_CACHE_BLOCK_HOOK", "_SEA_CACHE_POST_NORM_HOOK"))
TEXT_KV_CACHE_HOOKS = tuple(_private("diffusers.hooks.text_kv_cache", name) for name in (
    "_TEXT_KV_CACHE_TRANSFORMER_HOOK", "_TEXT_KV_CACHE_BLOCK_HOOK"))

# What diffusers' caches search for: block-list attribute names, TaylorSeer's lite-mode patterns, the attention
# layer names FasterCache hooks, module classes.
ALL_TRANSFORMER_BLOCK_IDENTIFIERS = _private("diffusers.hooks._common", "_ALL_TRANSFORMER_BLOCK_IDENTIFIERS")
TAYLORSEER_BLOCK_IDENTIFIERS = _private("diffusers.hooks.taylorseer_cache", "_BLOCK_IDENTIFIERS")
TAYLORSEER_PROJ_OUT_IDENTIFIERS = _private("diffusers.hooks.taylorseer_cache", "_PROJ_OUT_IDENTIFIERS")
FASTER_CACHE_LAYER_IDENTIFIERS = _private("diffusers.hooks.faster_cache", "_TRANSFORMER_BLOCK_IDENTIFIERS")
ATTENTION_CLASSES = _private("diffusers.hooks._common", "_ATTENTION_CLASSES")
FEEDFORWARD_CLASSES = _private("diffusers.hooks._common", "_FEEDFORWARD_CLASSES")

# Hook state: per-cache-context state objects, and the setter pipelines without cache contexts never call.
BaseState = _private("diffusers.hooks.hooks", "BaseState")
StateManager = _private("diffusers.hooks.hooks", "StateManager")
CacheContext = _private("diffusers.hooks.hooks", "CacheContext")
set_cache_context = _private("diffusers.hooks.hooks", "_set_cache_context")

# How diffusers describes a transformer block's inputs and outputs.
TransformerBlockMetadata = _private("diffusers.hooks._helpers", "TransformerBlockMetadata")
TransformerBlockRegistry = _private("diffusers.hooks._helpers", "TransformerBlockRegistry")
CacheMixin = _private("diffusers.models.cache_utils", "CacheMixin")

# Model internals reused rather than copied: Wan attention's q/k/v projections (fused or not), Wan VAE's unpatchify.
get_wan_qkv_projections = _private("diffusers.models.transformers.transformer_wan", "_get_qkv_projections")
wan_vae_unpatchify = _private("diffusers.models.autoencoders.autoencoder_kl_wan", "unpatchify")

# Private attributes used below (the tests check each on a live object): TransformerBlockRegistry._registry,
# a module's HookRegistry `_diffusers_hook`, HookRegistry._hook_order / _fn_refs and each HookFunctionReference's
# forward / original_forward, CacheMixin._cache_config (its "a cache is enabled" marker). Undocumented ones, used by
# accel.calibrate_mag_ratios: MagCache's head hook's `state_manager` and its state's `calibration_ratios`.


def block_is_registered(block_cls: type) -> bool:
    return block_cls in TransformerBlockRegistry._registry


def enabled_cache_config(model: torch.nn.Module):
    """The config of the cache diffusers' `CacheMixin` believes enabled on `model` (None if none)."""
    return getattr(model, "_cache_config", None)


def mark_cache_enabled(model: torch.nn.Module, config) -> None:
    """Make diffusers' `enable_cache()` refuse a second cache while `config` holds the model (None: release)."""
    model._cache_config = config


def find_hook(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, object] | None:
    """The first of `module` and its submodules that has a hook registered as `name`, and that hook (None if none)."""
    for submodule in module.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(name) is not None:
            return submodule, registry.get_hook(name)
    return None


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """`HookRegistry.remove_hook(name, recurse=True)`, correct whatever was registered after the hook.

    diffusers relinks the next hook's `forward` to what lay below the removed one; when the next hook wraps with
    `new_forward`, its `forward` is that wrapper and what it calls is `original_forward`, so the next hook would be
    bypassed (and its state left without a cache context). Here the next hook's wrapper is kept and its
    `original_forward` relinked.
    """
    for submodule in module.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is None or name not in registry.hooks:
            continue
        index = registry._hook_order.index(name)
        later = registry._fn_refs[index + 1] if index + 1 < len(registry._fn_refs) else None
        if later is None or later.original_forward is None:
            registry.remove_hook(name, recurse=False)
            continue
        removed = registry._fn_refs[index]
        below = removed.original_forward if removed.original_forward is not None else removed.forward
        wrapper = later.forward
        registry.remove_hook(name, recurse=False)
        later.forward, later.original_forward = wrapper, below
