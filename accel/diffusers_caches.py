"""diffusers' own caches behind the same `accel.patch` call, configured so that they really engage.

Each method builds its diffusers config, checks that it will hook something on this model (TaylorSeer's
default patterns hook nothing on Wan, silently), and names the module whose real runs mark a fully computed
step, so `handle.stats()` reports computed / predicted steps for diffusers' caches too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_mag_cache,
    apply_taylorseer_cache,
)
from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS, _ATTENTION_CLASSES, _FEEDFORWARD_CLASSES
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK, FLUX_MAG_RATIOS
from diffusers.hooks.taylorseer_cache import _BLOCK_IDENTIFIERS, _PROJ_OUT_IDENTIFIERS, _TAYLORSEER_CACHE_HOOK
from diffusers.models.transformers.sana_transformer import GLUMBConv
from diffusers.models.transformers.transformer_sana_video import GLUMBTempConv

from .models import blocks_of, spec_for


@dataclass(frozen=True)
class DiffusersCache:
    """A diffusers cache bound to one model: how to apply and remove it, and which module marks a full step."""

    config: object
    apply: Callable[[torch.nn.Module, object], None]
    hook_names: tuple[str, ...]
    observed: torch.nn.Module


def _build_config(cls: type, defaults: dict, options: dict):
    try:
        return cls(**{**defaults, **options})
    except TypeError as err:
        fields = sorted(cls.__dataclass_fields__)
        raise TypeError(f"bad option for {cls.__name__}: {err}; valid: {fields}") from None


# SANA's feed-forwards are convolutions, which diffusers' list of feed-forward classes leaves out.
_FEEDFORWARDS = _FEEDFORWARD_CLASSES + (GLUMBConv, GLUMBTempConv)


def _check_diffusers_finds_the_blocks(model: torch.nn.Module, method: str) -> None:
    """diffusers' block caches look for blocks under fixed attribute names: a model whose blocks live elsewhere
    (`accel.register_model`) would be left uncached (mag_cache) or crash (first_block_cache)."""
    elsewhere = [name for name in spec_for(model).block_lists if name not in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS]
    if elsewhere:
        raise ValueError(
            f"{method}: diffusers finds transformer blocks only in attributes named "
            f"{sorted(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)}, and {type(model).__name__} keeps them in {elsewhere}; "
            "method='cg_taylor' takes the block lists given to accel.register_model"
        )


def _first_block_cache(model: torch.nn.Module, options: dict, steps: int | None) -> DiffusersCache:
    _check_diffusers_finds_the_blocks(model, "first_block_cache")
    config = _build_config(FirstBlockCacheConfig, {}, options)
    return DiffusersCache(config, apply_first_block_cache, (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK), blocks_of(model)[-1].module)


def _mag_cache(model: torch.nn.Module, options: dict, steps: int | None) -> DiffusersCache:
    _check_diffusers_finds_the_blocks(model, "mag_cache")
    defaults = {"mag_ratios": FLUX_MAG_RATIOS} if spec_for(model).family == "flux" else {}
    if "mag_ratios" not in {**defaults, **options} and not options.get("calibrate"):
        raise ValueError(
            f"mag_cache needs per-model magnitude ratios for {type(model).__name__} (diffusers ships FLUX's only): "
            "pass mag_ratios=[...] or run once with calibrate=True to print them"
        )
    if steps is None:
        raise ValueError("mag_cache needs accel.patch(..., num_inference_steps=N) to lay out its ratios")
    config = _build_config(MagCacheConfig, {**defaults, "num_inference_steps": steps}, options)
    return DiffusersCache(config, apply_mag_cache, (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK), blocks_of(model)[-1].module)


def _taylorseer_targets(model: torch.nn.Module) -> list[str]:
    """Every attention and feed-forward module directly inside a transformer block, by exact name."""
    names = []
    for block in blocks_of(model):
        for child_name, child in block.module.named_children():
            if isinstance(child, _ATTENTION_CLASSES + _FEEDFORWARDS):
                names.append(re.escape(f"{block.name}.{child_name}"))
    return names


def _taylorseer(model: torch.nn.Module, options: dict, steps: int | None) -> DiffusersCache:
    defaults = {"cache_identifiers": _taylorseer_targets(model)}
    config = _build_config(TaylorSeerCacheConfig, defaults, options)
    if config.use_lite_mode:
        patterns = list(_BLOCK_IDENTIFIERS) + list(_PROJ_OUT_IDENTIFIERS)
    else:
        patterns = list(config.cache_identifiers or []) + list(config.skip_predict_identifiers or [])
    hooked = [(n, m) for n, m in model.named_modules() if any(re.fullmatch(p, n) for p in patterns)]
    if not hooked:
        raise ValueError(f"taylorseer: the identifiers {patterns} match no module of {type(model).__name__}")
    # The last hooked module runs for real exactly on the full steps.
    return DiffusersCache(config, apply_taylorseer_cache, (_TAYLORSEER_CACHE_HOOK,), hooked[-1][1])


DIFFUSERS_METHODS: dict[str, Callable[[torch.nn.Module, dict, int | None], DiffusersCache]] = {
    "first_block_cache": _first_block_cache,
    "taylorseer": _taylorseer,
    "mag_cache": _mag_cache,
}


def remove_diffusers_cache(model: torch.nn.Module, cache: DiffusersCache) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(model)
    for name in cache.hook_names:
        registry.remove_hook(name, recurse=True)
