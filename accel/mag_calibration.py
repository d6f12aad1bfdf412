"""MagCache's magnitude ratios for any model, measured in one run: diffusers ships FLUX's only.

    ratios = accel.calibrate_mag_ratios(pipe, prompt, num_inference_steps=30)
    accel.patch(pipe, accel.MagCacheConfig(mag_ratios=ratios, threshold=0.06), num_inference_steps=30)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, ModelMixin
from torch.utils.hooks import RemovableHandle

from . import diffusers_internals as internals
from .methods import MagCacheConfig
from .patch import PatchHandle, patch
from .validation import check_int

_OWNER = "calibrate_mag_ratios"
# diffusers empties the ratios it records (after printing them) once its config's step count is reached: a count
# never reached keeps them for reading back here, and keeps diffusers from printing.
_UNREACHED_STEPS = 2**62


def calibrate_mag_ratios(target: Any, *call_args, **call_kwargs) -> list[float]:
    """Run one generation under diffusers' MagCache in calibration mode (nothing is skipped) and return the
    magnitude ratios it measured, one per denoising step, for `accel.MagCacheConfig(mag_ratios=...)`.

    target: a diffusers pipeline, run once as `target(*call_args, **call_kwargs)`; or a bare diffusers transformer,
        with `call_args[0]` the callable that runs one generation through it (your denoising loop), called with the
        remaining arguments.
    Step i's ratio is the mean, over tokens, of |residual_i| / |residual_(i-1)|, the residual being what the blocks add
    to their input (1.0 for step 0), as diffusers measures it. Guidance batched as one call a step (DiT, PixArt, SANA)
    gives ratios over both halves of the batch together. Guidance run as two calls a step (Wan) gives each branch's
    cache context its own MagCache state, all of which index the same `mag_ratios` when caching: the conditional
    branch's ratios are returned. The hooks are removed before returning, whatever happened.
    """
    generate = _generation(target, call_args, call_kwargs)
    with patch(target, MagCacheConfig(calibrate=True), num_inference_steps=_UNREACHED_STEPS) as handle:
        recorded: dict[str, list[float]] = {}
        with _keeping_recorded_ratios(handle.models[0], recorded):
            generate()
        return _conditional_ratios(handle, recorded)


def _generation(target: Any, call_args: tuple, call_kwargs: dict) -> Callable[[], Any]:
    """What runs one generation through `target`, its arguments checked before anything is hooked."""
    if isinstance(target, DiffusionPipeline):
        if getattr(target, "transformer_2", None) is not None:
            raise ValueError(f"{_OWNER}: {type(target).__name__} has two transformers (transformer_2), each of which "
                             "would count its own steps against one list of ratios")
        if "num_inference_steps" in call_kwargs:
            check_int(_OWNER, "num_inference_steps", call_kwargs["num_inference_steps"], minimum=1)
        return lambda: target(*call_args, **call_kwargs)
    if isinstance(getattr(target, "_orig_mod", target), ModelMixin):
        if not call_args or not callable(call_args[0]):
            raise TypeError(f"{_OWNER}: a bare {type(target).__name__} needs the callable that runs one generation "
                            f"through it: {_OWNER}(transformer, generate, *args, **kwargs)")
        return lambda: call_args[0](*call_args[1:], **call_kwargs)
    raise TypeError(f"{_OWNER} expects a diffusers DiffusionPipeline or a diffusers transformer (ModelMixin), got "
                    f"{type(target).__name__}")


def _keeping_recorded_ratios(model: torch.nn.Module, recorded: dict[str, list[float]]) -> RemovableHandle:
    """Keeps, by cache context, the list each MagCache state records its ratios in: a pipeline resets the cache
    states of a transformer with diffusers' CacheMixin (Wan, FLUX) when it finishes, which gives them new, empty
    lists. Read after each call of the head block, within the call's cache context."""
    head, hook = internals.find_hook(model, internals.MAG_CACHE_LEADER_BLOCK_HOOK)

    def keep(module, args, output) -> None:
        recorded[hook.state_manager.context.name] = hook.state_manager.get_state().calibration_ratios

    return head.register_forward_hook(keep)


def _conditional_ratios(handle: PatchHandle, recorded: dict[str, list[float]]) -> list[float]:
    stats = handle.stats()
    if stats["steps"] == 0:
        raise ValueError(f"{_OWNER}: the generation never called {type(handle.models[0]).__name__}: no step to "
                         "calibrate")
    ratios = list(recorded[stats["context"]])
    bad = [i for i, r in enumerate(ratios) if not (math.isfinite(r) and r > 0)]
    if bad:
        raise ValueError(f"{_OWNER}: the blocks' residual vanished or was not finite at steps {bad} (ratios "
                         f"{[ratios[i] for i in bad]}); MagCache needs finite ratios > 0")
    return ratios
