"""`accel.patch(target, config)` / `accel.patch(target, method=..., **options)`: one call to accelerate a diffusers
pipeline or transformer, and the handle that reports on it and removes it."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.hooks import HookRegistry

from . import diffusers_internals as internals
from .cg_taylor import CG_TAYLOR_HOOK, apply_cg_taylor
from .diffusers_caches import DIFFUSERS_METHODS, DiffusersCache
from .methods import METHODS, Method, make_config, method_of, validated
from .models import blocks_of, is_cond_last_pipeline, spec_for
from .steps import STEP_HOOK, ComputeCounter, Schedule, StepClock, StepHook, StepTotals
from .validation import check_int

logger = logging.getLogger("accel")

COUNTER_HOOK = "accel_compute_counter"
# Attention methods swap attention processors inside the blocks: they compose with one caching method.
_SLOTS = {False: "_accel_handle", True: "_accel_attention_handle"}


def _attention_installer(method: str) -> Callable[..., Callable[[], None]]:
    if method == "linear_attention_kernels":
        from .attention.linear import apply_linear_attention_kernels

        return lambda model, config: apply_linear_attention_kernels(model)
    from .attention.sparse import apply_sparse_attention

    return lambda model, config: apply_sparse_attention(model, pattern=config.pattern)


def _denoisers(target: Any) -> tuple[list[torch.nn.Module], DiffusionPipeline | None]:
    """The transformers to patch, and the pipeline they belong to (if one was given)."""
    if isinstance(target, DiffusionPipeline):
        models = [m for m in (getattr(target, "transformer", None), getattr(target, "transformer_2", None)) if m is not None]
        if not models:
            raise TypeError(f"{type(target).__name__} has no `transformer`: accel accelerates diffusion transformers")
        return [getattr(m, "_orig_mod", m) for m in models], target
    model = getattr(target, "_orig_mod", target)  # torch.compile(model) wraps the module
    if isinstance(model, ModelMixin):
        return [model], None
    raise TypeError(
        f"accel.patch expects a diffusers DiffusionPipeline or a diffusers model (ModelMixin), got {type(target).__name__}"
    )


def _cond_half_reader(model: torch.nn.Module, pipeline: DiffusionPipeline | None) -> Callable[[tuple, dict], str | None]:
    spec = spec_for(model)
    if pipeline is not None and is_cond_last_pipeline(pipeline):
        return lambda args, kwargs: "last" if pipeline.do_classifier_free_guidance else None
    if spec.cond_half is not None:
        return lambda args, kwargs: spec.cond_half(args, kwargs, model)
    return lambda args, kwargs: None


def _merge_models(per_model: list[dict], lists: tuple[str, ...] = ()) -> dict:
    """One report for the models that share a generation's steps (Wan 2.2's two experts)."""
    out = dict(per_model[0])
    for extra in per_model[1:]:
        for key in ("steps", "computed", "predicted", *lists):
            out[key] = out[key] + extra[key]
    return out


class PatchHandle:
    """What `accel.patch` returns: `.stats()`, `.totals()`, `.reset()`, `.remove()`; also a context manager."""

    def __init__(self, method: str, models: list[torch.nn.Module], configs: list[Any], clocks: list[StepClock]):
        self.method, self.models, self.configs, self.clocks = method, models, configs, clocks
        self.slot = _SLOTS[METHODS[method].attention]
        self._removers: list[Callable[[], None]] = []
        self.removed = False

    def _configs(self) -> list:
        return [_describe(c) for c in self.configs]

    def stats(self) -> dict[str, Any]:
        """For the last generation: steps, `computed`, `predicted`, gate error per step, predicted step indices."""
        if not self.clocks:  # an attention method: nothing is skipped
            return {"method": self.method, "config": self._configs()}
        out = _merge_models([clock.stats.as_dict() for clock in self.clocks], ("gate_errors", "predicted_steps"))
        out["method"] = self.method
        out["config"] = self._configs()
        return out

    def totals(self) -> dict[str, Any]:
        """Steps, `computed` and `predicted` over every generation since the last `reset()` (or the patch). A long
        video is one generation per chunk, for which `stats()` tells the last chunk only."""
        if not self.clocks:
            return {"method": self.method, "config": self._configs()}
        out = _merge_models([clock.totals.as_dict() for clock in self.clocks])
        out["method"] = self.method
        return out

    def reset(self) -> None:
        """Forget all cached state (a new generation would do this by itself) and the totals."""
        self._check_active("reset()")
        for model in self.models:
            HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
        for clock in self.clocks:
            clock.totals = StepTotals()

    def remove(self) -> None:
        """Back to the exact original behaviour, whatever hooks were registered after ours. Safe to call twice."""
        if self.removed:
            return
        # Hooks' state sits in reference cycles (hook <-> registry <-> module): dropped only by the cyclic collector,
        # which may wait long enough to count gigabytes of cached features against whatever runs next. Reset first.
        for model in self.models:
            HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
        for remover in reversed(self._removers):
            remover()
        for model in self.models:
            HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
            vars(model).pop(self.slot, None)
        self.removed = True

    def _check_active(self, what: str) -> None:
        if self.removed:
            raise RuntimeError(f"{what} on a removed {self!r}: it patches nothing; call accel.patch again")

    def __enter__(self) -> "PatchHandle":
        self._check_active("`with`")
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"PatchHandle(method={self.method!r}, models={[type(m).__name__ for m in self.models]}, {state})"


def _install_cg_taylor(handle: PatchHandle, model: torch.nn.Module, config, clock: StepClock) -> None:
    apply_cg_taylor(model, config, clock)
    handle._removers.append(lambda: internals.remove_hook(model, CG_TAYLOR_HOOK))
    _hold_cache_slot(handle, model, config)


def _install_diffusers(handle: PatchHandle, model: torch.nn.Module, cache: DiffusersCache, clock: StepClock) -> None:
    # The counter sits inside the cache's hook, so it sees only the steps the cache lets run.
    HookRegistry.check_if_exists_or_initialize(cache.observed).register_hook(ComputeCounter(clock), COUNTER_HOOK)
    clock.derives_predictions = True
    handle._removers.append(lambda: internals.remove_hook(model, COUNTER_HOOK))
    if cache.watch is not None:
        cache.watch.install(model)
        handle._removers.append(cache.watch.remove)
    cache.apply(model, cache.config)
    handle._removers.append(lambda: [internals.remove_hook(model, name) for name in cache.hook_names])
    _hold_cache_slot(handle, model, cache.config)


def _hold_cache_slot(handle: PatchHandle, model: torch.nn.Module, config) -> None:
    """diffusers' `enable_cache()` then refuses a second cache on this model while the handle is active (stacking
    two caches would have each count, and skip, the other's steps)."""
    internals.mark_cache_enabled(model, config)
    handle._removers.append(lambda: internals.mark_cache_enabled(model, None))


def _config_from(method: Any, options: dict):
    if isinstance(method, str):
        return make_config(method, **options)
    if options:
        raise TypeError(f"options {sorted(options)} given beside a config object: set them in the config")
    return validated(method)


def _check_patchable(models: list[torch.nn.Module], method: Method) -> None:
    slot = _SLOTS[method.attention]
    for model in models:
        if getattr(model, slot, None) is not None:
            raise RuntimeError(f"{type(model).__name__} is already patched ({getattr(model, slot)}); remove() it first")
        if not method.attention and internals.enabled_cache_config(model) is not None:
            raise RuntimeError(f"{type(model).__name__} has a diffusers cache enabled; call disable_cache() first")


def _patch_attention(method: Method, models: list[torch.nn.Module], config) -> PatchHandle:
    handle = PatchHandle(method.name, models, [config], [])
    install = _attention_installer(method.name)
    try:
        for model in models:
            handle._removers.append(install(model, config))
            setattr(model, handle.slot, handle)
    except BaseException:
        handle.remove()
        raise
    logger.info("accel: %s on %s", method.name, ", ".join(type(m).__name__ for m in models))
    return handle


def _bound_configs(method: Method, models: list[torch.nn.Module], config, steps: int | None, pipeline) -> list:
    """The config of each model: CG-Taylor's preset filled in by family, diffusers' caches bound to the model."""
    if method.name == "cg_taylor":
        return [config.resolved(spec_for(m).family) for m in models]
    return [DIFFUSERS_METHODS[method.name](m, config, steps, pipeline) for m in models]


def patch(target: Any, method: Any = "cg_taylor", num_inference_steps: int | None = None, **options) -> PatchHandle:
    """Accelerate a diffusers pipeline (its `transformer`, and `transformer_2` if any) or a bare transformer.

    method: a config object (CGTaylorConfig, FirstBlockCacheConfig, TaylorSeerCacheConfig, MagCacheConfig,
        PyramidAttentionBroadcastConfig, FasterCacheConfig, SeaCacheConfig, TextKVCacheConfig, SparseAttentionConfig,
        LinearAttentionKernelsConfig from `accel`; diffusers' own cache configs are accepted too), or a method name
        with the config's fields as keyword options: "cg_taylor" (fields left out come from the model family's
        preset), "first_block_cache", "taylorseer", "mag_cache", "pyramid_attention_broadcast", "faster_cache",
        "sea_cache", "text_kv_cache", or an attention method, which composes with one of those:
        "linear_attention_kernels" (SANA, SANA-Video), "sparse_attention" (Wan, HunyuanVideo).
    num_inference_steps: for a bare transformer called outside a pipeline that sets
        `cache_context(..., num_inference_steps=)`, so the last step is recognised; mag_cache needs it (or its
        config's field) always.
    Raises on bad input before touching the model.
    """
    config = _config_from(method, options)
    spec = method_of(config)
    if num_inference_steps is not None:
        check_int("accel.patch", "num_inference_steps", num_inference_steps, minimum=1)
    models, pipeline = _denoisers(target)
    _check_patchable(models, spec)
    if spec.attention:
        return _patch_attention(spec, models, config)
    for model in models:
        blocks_of(model)  # unknown models fail here, before any hook is registered
    configs = _bound_configs(spec, models, config, num_inference_steps, pipeline)

    if pipeline is None and num_inference_steps is None:
        logger.warning(
            "accel.patch on a bare %s without num_inference_steps: the last step is only recognised when "
            "the caller sets cache_context(..., num_inference_steps=)%s", type(models[0]).__name__,
            _needs_step_count(spec, configs),
        )
    clocks = [StepClock(Schedule(pipeline, num_inference_steps)) for _ in models]
    handle = PatchHandle(spec.name, models, [getattr(c, "config", c) for c in configs], clocks)
    try:
        for model, bound, clock in zip(models, configs, clocks):
            setattr(model, handle.slot, handle)
            if spec.name == "cg_taylor":
                _install_cg_taylor(handle, model, bound, clock)
            else:
                _install_diffusers(handle, model, bound, clock)
            # Registered last, so outermost: it sees the call as the pipeline made it (FasterCache's hook on the model
            # halves the batch) and sets the cache context before any cache's hook on the model reads it.
            registry = HookRegistry.check_if_exists_or_initialize(model)
            registry.register_hook(StepHook(clock, _cond_half_reader(model, pipeline)), STEP_HOOK)
            handle._removers.append(lambda m=model: internals.remove_hook(m, STEP_HOOK))
            registry.invalidate_child_registries_cache()
    except BaseException:
        handle.remove()
        raise
    logger.info("accel: %s on %s", spec.name, ", ".join(type(m).__name__ for m in models))
    return handle


def _needs_step_count(spec, configs) -> str:
    """The warning's addition where a schedule is a share of the steps (CG-Taylor's DiT and Wan default): without the
    count its first step raises."""
    fractions = [c.schedule for c in configs if spec.name == "cg_taylor" and isinstance(c.schedule, float)]
    return (f"; cg_taylor's schedule={fractions[0]} (a share of the steps) cannot run without it: a call without the "
            "count raises" if fractions else "")


def _describe(value: Any) -> Any:
    """A config as plain fields. Not `dataclasses.asdict`: it deep-copies every field, and a callback such as the
    call watch of PAB / FasterCache holds the whole pipeline."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return repr(value) if callable(value) else value
