"""diffusers' own caches behind the same `accel.patch` call, configured so that they really engage.

Each method builds its diffusers config, checks that it will hook something on this model (TaylorSeer's
default patterns hook nothing on Wan, silently), and names the module whose real runs mark a fully computed
step, so `handle.stats()` reports computed / predicted steps for diffusers' caches too. For the caches that work per
attention layer (PyramidAttentionBroadcast, FasterCache) that module is the last hooked attention layer: a step counts
as computed when it ran.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.hooks import (
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_sea_cache,
    apply_taylorseer_cache,
    apply_text_kv_cache,
)
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
from diffusers.models.transformers.sana_transformer import GLUMBConv
from diffusers.models.transformers.transformer_sana_video import GLUMBTempConv

from . import diffusers_internals as internals
from .methods import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
)
from .models import blocks_of, spec_for
from .steps import timestep_of

@dataclass(frozen=True)
class DiffusersCache:
    """A diffusers cache bound to one model: how to apply and remove it, and which module marks a full step."""

    config: object
    apply: Callable[[torch.nn.Module, object], None]
    hook_names: tuple[str, ...]
    observed: torch.nn.Module
    watch: "CallWatch | None" = None  # for the caches that gate on the timestep; installed with them


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


def _first_block_cache(model: torch.nn.Module, config: FirstBlockCacheConfig, steps: int | None, pipeline=None) -> DiffusersCache:
    _check_diffusers_finds_the_blocks(model, "first_block_cache")
    hooks = (internals.FBC_LEADER_BLOCK_HOOK, internals.FBC_BLOCK_HOOK)
    return DiffusersCache(config, apply_first_block_cache, hooks, blocks_of(model)[-1].module)


def _mag_cache(model: torch.nn.Module, config: MagCacheConfig, steps: int | None, pipeline=None) -> DiffusersCache:
    _check_diffusers_finds_the_blocks(model, "mag_cache")
    ratios = config.mag_ratios
    if ratios is None and spec_for(model).family == "flux":
        ratios = FLUX_MAG_RATIOS
    if ratios is None and not config.calibrate:
        raise ValueError(
            f"mag_cache needs per-model magnitude ratios for {type(model).__name__} (diffusers ships FLUX's only): "
            "pass mag_ratios=accel.calibrate_mag_ratios(pipe, ...) (one run measures them)"
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


def _taylorseer(model: torch.nn.Module, config: TaylorSeerCacheConfig, steps: int | None, pipeline=None) -> DiffusersCache:
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


class CallWatch:
    """Sees each transformer call before any hook does (a forward pre-hook): hands PyramidAttentionBroadcast and
    FasterCache the current timestep (the pipeline's `current_timestep` where it has one, else the call's), and refuses
    what they would get silently wrong. diffusers keeps one attention cache per layer for all classifier-free-guidance
    branches, so a pipeline that runs the branches as two calls a step (the same timestep twice) would have one
    branch reuse the other's attention; FasterCache also needs the branches batched as [uncond, cond]."""

    def __init__(self, method: str, pipeline, needs_batched_cfg: bool):
        self.method, self.needs_batched_cfg = method, needs_batched_cfg
        self.pipeline = pipeline if hasattr(type(pipeline), "current_timestep") else None
        self.last: float | None = None
        self.handle = None

    def install(self, model: torch.nn.Module) -> None:
        self.handle = model.register_forward_pre_hook(self._see, with_kwargs=True)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()

    def _see(self, module, args: tuple, kwargs: dict) -> None:
        timestep = timestep_of(args, kwargs)
        if timestep is not None and timestep == self.last:
            raise RuntimeError(f"{self.method}: two transformer calls at timestep {timestep}: this pipeline runs "
                               f"classifier-free guidance as two calls a step, and diffusers' {self.method} keeps one "
                               "cache for both branches (one would reuse the other's attention). Use it with guidance "
                               "off or a pipeline that batches the branches, or another cache")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if self.needs_batched_cfg and hidden.shape[0] % 2:
            raise RuntimeError(f"{self.method}: a batch of {hidden.shape[0]}: FasterCache approximates the "
                               "unconditional half of a batch [uncond, cond]; without guidance set "
                               "is_guidance_distilled=True")
        self.last = timestep

    def __call__(self):
        current = self.pipeline.current_timestep if self.pipeline is not None else None
        return current if current is not None else self.last


def _attention_layers(model: torch.nn.Module, patterns_by_kind: dict[str, tuple], self_attention: set[str]) -> list:
    """The attention layers a per-layer diffusers cache hooks: names found by `re.search` on a kind's patterns, self-
    attention kinds never on cross-attention layers, cross kinds only on them (diffusers' own selection)."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, internals.ATTENTION_CLASSES):
            continue
        cross = bool(getattr(module, "is_cross_attention", False))
        for kind, patterns in patterns_by_kind.items():
            if (kind in self_attention) != cross and any(re.search(p, name) for p in patterns):
                layers.append(module)
                break
    return layers


def _with_watch(config, watch: CallWatch):
    return config if config.current_timestep_callback is not None else dataclasses.replace(config,
                                                                                          current_timestep_callback=watch)


def _pyramid_attention_broadcast(model, config: PyramidAttentionBroadcastConfig, steps, pipeline) -> DiffusersCache:
    kinds = {kind: getattr(config, f"{kind}_attention_block_identifiers") for kind in ("spatial", "temporal", "cross")
             if getattr(config, f"{kind}_attention_block_skip_range") is not None}
    layers = _attention_layers(model, kinds, {"spatial", "temporal"})
    if not layers:
        raise ValueError(f"pyramid_attention_broadcast: no attention layer of {type(model).__name__} matches the "
                         f"identifiers of the kinds with a skip range ({sorted(kinds)})")
    watch = CallWatch("pyramid_attention_broadcast", pipeline, needs_batched_cfg=False)
    hooks = (internals.PAB_HOOK,)
    return DiffusersCache(_with_watch(config, watch), apply_pyramid_attention_broadcast, hooks, layers[-1], watch)


def _faster_cache(model, config: FasterCacheConfig, steps, pipeline) -> DiffusersCache:
    kinds = {"spatial": config.spatial_attention_block_identifiers}
    if config.temporal_attention_block_skip_range is not None:
        kinds["temporal"] = config.temporal_attention_block_identifiers
    candidates = set(_attention_layers(model, {"any": internals.FASTER_CACHE_LAYER_IDENTIFIERS}, {"any"}))
    layers = [m for m in _attention_layers(model, kinds, {"spatial", "temporal"}) if m in candidates]
    if not layers:
        raise ValueError(f"faster_cache: no self-attention layer of {type(model).__name__} matches "
                         f"{sorted(set(sum(kinds.values(), ())))}")
    split = config._unconditional_conditional_input_kwargs_identifiers
    if "class_labels" in inspect.signature(type(model).forward).parameters and "class_labels" not in split:
        raise ValueError(f"faster_cache: diffusers' FasterCache halves only the inputs {list(split)} when it skips the "
                         f"unconditional branch, and {type(model).__name__} is conditioned on class_labels")
    watch = CallWatch("faster_cache", pipeline, needs_batched_cfg=not config.is_guidance_distilled)
    hooks = (internals.FASTER_CACHE_DENOISER_HOOK, internals.FASTER_CACHE_BLOCK_HOOK)
    return DiffusersCache(_with_watch(config, watch), apply_faster_cache, hooks, layers[-1], watch)


def _sea_cache(model, config: SeaCacheConfig, steps, pipeline) -> DiffusersCache:
    _check_diffusers_finds_the_blocks(model, "sea_cache")
    return DiffusersCache(config, apply_sea_cache, internals.SEA_CACHE_HOOKS, blocks_of(model)[-1].module)


def _text_kv_cache(model, config: TextKVCacheConfig, steps, pipeline) -> DiffusersCache:
    from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoEImageTransformerBlock

    blocks = [m for m in model.modules() if isinstance(m, NucleusMoEImageTransformerBlock)]
    if not blocks:
        raise ValueError(f"text_kv_cache: diffusers implements it for NucleusMoE-Image's blocks only; "
                         f"{type(model).__name__} has none")
    # Lossless: every step runs.
    return DiffusersCache(config, apply_text_kv_cache, internals.TEXT_KV_CACHE_HOOKS, blocks[-1])


DIFFUSERS_METHODS: dict[str, Callable[..., DiffusersCache]] = {  # (model, config, steps, pipeline) -> DiffusersCache
    "first_block_cache": _first_block_cache,
    "taylorseer": _taylorseer,
    "mag_cache": _mag_cache,
    "pyramid_attention_broadcast": _pyramid_attention_broadcast,
    "faster_cache": _faster_cache,
    "sea_cache": _sea_cache,
    "text_kv_cache": _text_kv_cache,
}

