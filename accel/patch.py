"""`accel.patch(target, method=..., **options)`: one call to accelerate a diffusers pipeline or transformer."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.hooks import HookRegistry

from .cg_taylor import CG_TAYLOR_HOOK, apply_cg_taylor, config_for
from .diffusers_caches import DIFFUSERS_METHODS, DiffusersCache, remove_diffusers_cache
from .models import COND_LAST_PIPELINES, blocks_of, spec_for
from .steps import STEP_HOOK, ComputeCounter, Schedule, StepClock, StepHook, StepTotals

logger = logging.getLogger("accel")

COUNTER_HOOK = "accel_compute_counter"
# Attention methods swap attention processors inside the blocks: they compose with one caching method.
ATTENTION_METHODS = ("linear_attention_kernels", "sparse_attention")
METHODS = ("cg_taylor", *DIFFUSERS_METHODS, *ATTENTION_METHODS)
_SLOTS = {False: "_accel_handle", True: "_accel_attention_handle"}


def _attention_installer(method: str) -> Callable[..., Callable[[], None]]:
    if method == "linear_attention_kernels":
        from .attention.linear import apply_linear_attention_kernels

        return apply_linear_attention_kernels
    from .attention.sparse import apply_sparse_attention

    return apply_sparse_attention


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
    if pipeline is not None and type(pipeline).__name__ in COND_LAST_PIPELINES:
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
        self.slot = _SLOTS[method in ATTENTION_METHODS]
        self._removers: list[Callable[[], None]] = []
        self.removed = False

    def stats(self) -> dict[str, Any]:
        """For the last generation: steps, `computed`, `predicted`, gate error per step, predicted step indices."""
        if not self.clocks:  # an attention method: nothing is skipped
            return {"method": self.method, "config": self.configs}
        out = _merge_models([clock.stats.as_dict() for clock in self.clocks], ("gate_errors", "predicted_steps"))
        out["method"] = self.method
        out["config"] = [dataclasses.asdict(c) if dataclasses.is_dataclass(c) else repr(c) for c in self.configs]
        return out

    def totals(self) -> dict[str, Any]:
        """Steps, `computed` and `predicted` over every generation since the last `reset()` (or the patch). A long
        video is one generation per chunk, for which `stats()` tells the last chunk only."""
        if not self.clocks:
            return {"method": self.method, "config": self.configs}
        out = _merge_models([clock.totals.as_dict() for clock in self.clocks])
        out["method"] = self.method
        return out

    def reset(self) -> None:
        """Forget all cached state (a new generation would do this by itself) and the totals."""
        for model in self.models:
            HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
        for clock in self.clocks:
            clock.totals = StepTotals()

    def remove(self) -> None:
        """Back to the exact original behaviour. Safe to call twice."""
        if self.removed:
            return
        for remover in reversed(self._removers):
            remover()
        for model in self.models:
            HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
            vars(model).pop(self.slot, None)
        self.removed = True

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"PatchHandle(method={self.method!r}, models={[type(m).__name__ for m in self.models]}, {state})"


def _install_cg_taylor(handle: PatchHandle, model: torch.nn.Module, config, clock: StepClock) -> None:
    apply_cg_taylor(model, config, clock)
    handle._removers.append(lambda: HookRegistry.check_if_exists_or_initialize(model).remove_hook(CG_TAYLOR_HOOK))


def _install_diffusers(handle: PatchHandle, model: torch.nn.Module, cache: DiffusersCache, clock: StepClock) -> None:
    # The counter sits inside the cache's hook, so it sees only the steps the cache lets run.
    HookRegistry.check_if_exists_or_initialize(cache.observed).register_hook(ComputeCounter(clock), COUNTER_HOOK)
    clock.derives_predictions = True
    handle._removers.append(lambda: HookRegistry.check_if_exists_or_initialize(model).remove_hook(COUNTER_HOOK))
    if hasattr(model, "enable_cache"):  # CacheMixin: diffusers then knows a cache is on and refuses a second one
        model.enable_cache(cache.config)
        handle._removers.append(model.disable_cache)
    else:
        cache.apply(model, cache.config)
        handle._removers.append(lambda: remove_diffusers_cache(model, cache))


def _patch_attention(method: str, models: list[torch.nn.Module], options: dict) -> PatchHandle:
    handle = PatchHandle(method, models, [dict(options)], [])
    install = _attention_installer(method)
    try:
        for model in models:
            handle._removers.append(install(model, **options))
            setattr(model, handle.slot, handle)
    except BaseException:
        handle.remove()
        raise
    logger.info("accel: %s on %s", method, ", ".join(type(m).__name__ for m in models))
    return handle


def patch(target: Any, method: str = "cg_taylor", num_inference_steps: int | None = None, **options) -> PatchHandle:
    """Accelerate a diffusers pipeline (its `transformer`, and `transformer_2` if any) or a bare transformer.

    method: "cg_taylor" (options: threshold, warmup_steps, first_block_order, last_block_order,
        max_consecutive_predicted; defaults from the model family's preset), or one of diffusers' caches
        "first_block_cache", "taylorseer", "mag_cache" (options: the fields of its diffusers config), or an
        attention method, which composes with one of the above: "linear_attention_kernels" (SANA, SANA-Video)
        or "sparse_attention" (Wan; option `pattern`).
    num_inference_steps: for a bare transformer called outside a pipeline that sets
        `cache_context(..., num_inference_steps=)`, so the last step is recognised; mag_cache needs it always.
    Raises on bad input before touching the model.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    models, pipeline = _denoisers(target)
    slot = _SLOTS[method in ATTENTION_METHODS]
    for model in models:
        if getattr(model, slot, None) is not None:
            raise RuntimeError(f"{type(model).__name__} is already patched ({getattr(model, slot)}); remove() it first")
        if method not in ATTENTION_METHODS and getattr(model, "_cache_config", None) is not None:
            raise RuntimeError(f"{type(model).__name__} has a diffusers cache enabled; call disable_cache() first")
    if method in ATTENTION_METHODS:
        return _patch_attention(method, models, options)
    for model in models:
        blocks_of(model)  # unknown models fail here, before any hook is registered

    if method == "cg_taylor":
        configs = [config_for(spec_for(m).family, options) for m in models]
    else:
        configs = [DIFFUSERS_METHODS[method](m, options, num_inference_steps) for m in models]

    if pipeline is None and num_inference_steps is None:
        logger.warning(
            "accel.patch on a bare %s without num_inference_steps: the last step is only recognised when "
            "the caller sets cache_context(..., num_inference_steps=)", type(models[0]).__name__
        )
    clocks = [StepClock(Schedule(pipeline, num_inference_steps)) for _ in models]
    handle = PatchHandle(method, models, [getattr(c, "config", c) for c in configs], clocks)
    try:
        for model, config, clock in zip(models, configs, clocks):
            registry = HookRegistry.check_if_exists_or_initialize(model)
            registry.register_hook(StepHook(clock, _cond_half_reader(model, pipeline)), STEP_HOOK)
            handle._removers.append(lambda r=registry: r.remove_hook(STEP_HOOK, recurse=False))
            setattr(model, handle.slot, handle)
            if method == "cg_taylor":
                _install_cg_taylor(handle, model, config, clock)
            else:
                _install_diffusers(handle, model, config, clock)
            registry.invalidate_child_registries_cache()
    except BaseException:
        handle.remove()
        raise
    logger.info("accel: %s on %s", method, ", ".join(type(m).__name__ for m in models))
    return handle
