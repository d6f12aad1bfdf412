"""diffusers' own caches behind the same `accel.patch` call, configured so that they really engage.

Each method builds its diffusers config, checks that it will hook something on this model (TaylorSeer's
default patterns hook nothing on Wan, silently), and names the module whose real runs mark a fully computed
step, so `handle.stats()` reports computed / predicted steps for diffusers' caches too.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.hooks import apply_first_block_cache, apply_mag_cache, apply_taylorseer_cache
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
from diffusers.models.transformers.sana_transformer import GLUMBConv
from diffusers.models.transformers.transformer_sana_video import GLUMBTempConv

from . import diffusers_internals as internals
from .methods import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from .models import blocks_of, spec_for


@dataclass(frozen=True)
class DiffusersCache:
    """A diffusers cache bound to one model: how to apply and remove it, and which module marks a full step."""

    config: object
    apply: Callable[[torch.nn.Module, object], None]
    hook_names: tuple[str, ...]
    observed: torch.nn.Module


# SANA's feed-forwards are convolutions, which diffusers' list of feed-forward classes leaves out.
_FEEDFORWARDS = internals.FEEDFORWARD_CLASSES + (GLUMBConv, GLUMBTempConv)


def _check_diffusers_finds_the_blocks(model: torch.nn.Module, method: str) -> None:
    """diffusers' block caches look for blocks under fixed attribute names: a model whose blocks live elsewhere
    (`accel.register_model`) would be left uncached (mag_cache) or crash (first_block_cache)."""
    elsewhere = [name for name in spec_for(model).block_lists if name not in internals.ALL_TRANSFORMER_BLOCK_IDENTIFIERS]
    if elsewhere:
        raise ValueError(
            f"{method}: diffusers finds transformer blocks only in attributes named "
            f"{sorted(internals.ALL_TRANSFORMER_BLOCK_IDENTIFIERS)}, and {type(model).__name__} keeps them in {elsewhere}; "
            "method='cg_taylor' takes the block lists given to accel.register_model"
        )


def _first_block_cache(model: torch.nn.Module, config: FirstBlockCacheConfig, steps: int | None) -> DiffusersCache:
    _check_diffusers_finds_the_blocks(model, "first_block_cache")
    hooks = (internals.FBC_LEADER_BLOCK_HOOK, internals.FBC_BLOCK_HOOK)
    return DiffusersCache(config, apply_first_block_cache, hooks, blocks_of(model)[-1].module)


def _mag_cache(model: torch.nn.Module, config: MagCacheConfig, steps: int | None) -> DiffusersCache:
    _check_diffusers_finds_the_blocks(model, "mag_cache")
    ratios = config.mag_ratios
    if ratios is None and spec_for(model).family == "flux":
        ratios = FLUX_MAG_RATIOS
    if ratios is None and not config.calibrate:
        raise ValueError(
            f"mag_cache needs per-model magnitude ratios for {type(model).__name__} (diffusers ships FLUX's only): "
            "pass mag_ratios=[...] or run once with calibrate=True to print them"
        )
    if None not in (steps, config.num_inference_steps) and steps != config.num_inference_steps:
        raise ValueError(f"mag_cache: num_inference_steps={steps} given to accel.patch, but its config says "
                         f"{config.num_inference_steps}")
    steps = steps or config.num_inference_steps
    if steps is None:
        raise ValueError("mag_cache needs accel.patch(..., num_inference_steps=N) (or the config's field) to lay out "
                         "its ratios")
    config = dataclasses.replace(config, mag_ratios=ratios, num_inference_steps=steps)
    hooks = (internals.MAG_CACHE_LEADER_BLOCK_HOOK, internals.MAG_CACHE_BLOCK_HOOK)
    return DiffusersCache(config, apply_mag_cache, hooks, blocks_of(model)[-1].module)


def _taylorseer_targets(model: torch.nn.Module) -> list[str]:
    """Every attention and feed-forward module directly inside a transformer block, by exact name."""
    names = []
    for block in blocks_of(model):
        for child_name, child in block.module.named_children():
            if isinstance(child, internals.ATTENTION_CLASSES + _FEEDFORWARDS):
                names.append(re.escape(f"{block.name}.{child_name}"))
    return names


def _taylorseer(model: torch.nn.Module, config: TaylorSeerCacheConfig, steps: int | None) -> DiffusersCache:
    if config.cache_identifiers is None:
        config = dataclasses.replace(config, cache_identifiers=_taylorseer_targets(model))
    if config.use_lite_mode:
        patterns = list(internals.TAYLORSEER_BLOCK_IDENTIFIERS) + list(internals.TAYLORSEER_PROJ_OUT_IDENTIFIERS)
    else:
        patterns = list(config.cache_identifiers) + list(config.skip_predict_identifiers or [])
    hooked = [(n, m) for n, m in model.named_modules() if any(re.fullmatch(p, n) for p in patterns)]
    if not hooked:
        raise ValueError(f"taylorseer: the identifiers {patterns} match no module of {type(model).__name__}")
    # The last hooked module runs for real exactly on the full steps.
    return DiffusersCache(config, apply_taylorseer_cache, (internals.TAYLORSEER_CACHE_HOOK,), hooked[-1][1])


DIFFUSERS_METHODS: dict[str, Callable[[torch.nn.Module, object, int | None], DiffusersCache]] = {
    "first_block_cache": _first_block_cache,
    "taylorseer": _taylorseer,
    "mag_cache": _mag_cache,
}

