"""What the pipelines of `accel.pipelines` check before any work: call arguments, dtypes, and saved folders whose
configs and weights disagree. Messages name the argument (or file), its value and what is allowed.

The numbers' checks are `accel.validation`'s, shared with `accel.patch`; this module holds what only pipelines take.
"""

from __future__ import annotations

import glob
import importlib
import inspect
import json
import os
from collections import defaultdict

import torch
from diffusers import DiffusionPipeline

from accel.validation import check_bool, check_int, check_real

__all__ = [
    "OUTPUT_TYPES", "check_bool", "check_callback", "check_choice", "check_fixed_size", "check_generator", "check_int",
    "check_latents", "check_output_path", "check_real", "check_step_count", "load_checked", "resolve_dtype",
    "check_module_weights",
]

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_choice(owner: str, name: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{owner}: {name} must be one of {list(allowed)}, got {value!r}")


def check_step_count(owner: str, num_inference_steps) -> int:
    return check_int(owner, "num_inference_steps", num_inference_steps, minimum=1)


def check_callback(owner: str, callback, tensor_inputs, allowed) -> None:
    """diffusers' `callback_on_step_end` convention: a callable, and the names of the tensors it is handed among
    `allowed`."""
    if callback is not None and not callable(callback):
        raise TypeError(f"{owner}: callback_on_step_end must be a callable or None, got {callback!r}")
    if isinstance(tensor_inputs, str) or not isinstance(tensor_inputs, (list, tuple)):
        raise TypeError(f"{owner}: callback_on_step_end_tensor_inputs must be a list of names, got {tensor_inputs!r}")
    unknown = [k for k in tensor_inputs if k not in allowed]
    if unknown:
        raise ValueError(f"{owner}: callback_on_step_end_tensor_inputs must be among {list(allowed)}, got {unknown}")


def check_generator(owner: str, generator, batch_size: int) -> None:
    """None, a torch.Generator, or one per sample of the batch."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, list) or not all(isinstance(g, torch.Generator) for g in generator):
        raise TypeError(f"{owner}: generator must be a torch.Generator, a list of them or None, got {generator!r} "
                        "(for a seed, pass torch.Generator().manual_seed(seed))")
    if len(generator) != batch_size:
        raise ValueError(f"{owner}: generator is a list of {len(generator)} generators; the batch has {batch_size} "
                         "samples (prompts times samples per prompt): give one per sample or a single generator")


def check_latents(owner: str, latents, shape: tuple[int, ...]) -> None:
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{owner}: latents must be a torch.Tensor of shape {tuple(shape)} or None, got {type(latents).__name__}")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"{owner}: latents must have shape {tuple(shape)} (batch, channels, ...), "
                         f"got {tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise TypeError(f"{owner}: latents must be a floating-point tensor, got {latents.dtype}")


def check_fixed_size(owner: str, name: str, value, size: int) -> None:
    """height / width of a model that makes one size only: None (that size) or that size."""
    if value is not None and (isinstance(value, bool) or value != size):
        raise ValueError(f"{owner}: {name} must be {size} or None (the model makes {size}x{size} pixels only), "
                         f"got {value!r}")


def check_output_path(owner: str, path) -> str | None:
    """An mp4 path (or None) whose folder exists and can be written: refused now, not after the whole generation."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{owner}: output_path must be a path (str or os.PathLike) or None, got {path!r}")
    path = os.fspath(path)
    if not path.lower().endswith(".mp4"):
        raise ValueError(f"{owner}: output_path must name an .mp4 file (None: no file), got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{owner}: output_path {path!r}: its folder {folder!r} is not an existing directory")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        raise ValueError(f"{owner}: output_path {path!r} cannot be written as a file")
    return path


# Loading -------------------------------------------------------------------------------------------------------------

_DOWNLOAD_KWARGS = ("cache_dir", "local_files_only", "revision", "token", "variant", "use_safetensors")


def resolve_dtype(dtype, owner: str = "from_pretrained", name: str = "dtype"):
    """A torch dtype from a torch dtype or its name ("float16", "torch.bfloat16"); per component, a dict of them.
    (diffusers warns about a name and loads float32.)"""
    if dtype is None:
        return None
    if isinstance(dtype, dict):
        return {k: resolve_dtype(v, owner, f"{name}[{k!r}]") for k, v in dtype.items()}
    resolved = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise (ValueError if isinstance(dtype, (str, torch.dtype)) else TypeError)(
            f"{owner}: {name} must be a floating-point torch.dtype (or its name, e.g. 'float16'), got {dtype!r}")
    return resolved


def _file_keys(folder: str) -> set[str] | None:
    """The tensor names in a folder's safetensors files (headers only); None when it has none."""
    from safetensors import safe_open

    files = glob.glob(os.path.join(folder, "*.safetensors"))
    if not files:
        return None
    keys = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys.update(f.keys())
    return keys


def _listed(keys: list[str], limit: int = 8) -> str:
    return f"{keys[:limit]}{f' and {len(keys) - limit} more' if len(keys) > limit else ''}"


def check_module_weights(module: torch.nn.Module, folder: str, hint: str = "") -> None:
    """The model's tensors and the folder's weights name the same tensors (tied parameters count once), or a
    ValueError listing what is missing and unexpected: diffusers would leave missing weights on the meta device and
    transformers would initialise them randomly, both without an error."""
    file_keys = _file_keys(folder)
    if file_keys is None:
        return
    aliases = defaultdict(set)  # a tied parameter is stored under one of its names
    for name, parameter in module.named_parameters(remove_duplicate=False):
        aliases[id(parameter)].add(name)
    alias_of = {name: names for names in aliases.values() for name in names}
    model_keys = set(module.state_dict())
    missing = sorted(k for k in model_keys if not alias_of.get(k, {k}) & file_keys)
    unexpected = sorted(file_keys - model_keys)
    if missing or unexpected:
        raise ValueError(
            f"{folder}: the config describes a model whose tensors the weights do not match: "
            + "; ".join(part for part in (missing and f"missing from the weights: {_listed(missing)}",
                                          unexpected and f"in the weights but not in the model: {_listed(unexpected)}") if part)
            + f". Check config.json against the weights{hint}."
        )


def _component_class(entry):
    library, class_name = entry
    return getattr(importlib.import_module(library), class_name, None) if library and class_name else None


def _kind(value) -> str | None:
    return ("a boolean" if isinstance(value, bool) else "a number" if isinstance(value, (int, float))
            else "a string" if isinstance(value, str) else None)


def _config_problems(cls, config: dict) -> tuple[list[str], list[str]]:
    """(fields the class does not take, fields whose value is of another kind than the class's default)."""
    parameters = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in config if not k.startswith("_") and k not in parameters
                     and k not in getattr(cls, "ignore_for_config", ()))
    mistyped = []
    for key, value in config.items():
        default = parameters[key].default if key in parameters else None
        expected, got = _kind(default), _kind(value)
        if value is not None and expected and got and expected != got:
            mistyped.append(f"{key}={value!r} (expected {expected}, as the default {default!r})")
    return unknown, mistyped


def _check_configs(folder: str, skip: set[str]) -> dict[str, str]:
    """Refuses the diffusers components' config.json fields of the wrong kind, and fields accel's own classes do not
    take; returns, per component, the unknown fields diffusers would ignore (a hint if the weights then mismatch)."""
    index = json.load(open(os.path.join(folder, "model_index.json")))
    hints = {}
    for name, entry in index.items():
        path = os.path.join(folder, name, "config.json")
        if name in skip or not isinstance(entry, list) or not os.path.isfile(path):
            continue
        cls = _component_class(entry)
        if cls is None or not hasattr(cls, "register_to_config"):  # not a diffusers model (transformers' configs)
            continue
        unknown, mistyped = _config_problems(cls, json.load(open(path)))
        if mistyped:
            raise TypeError(f"{path}: config fields of the wrong type for {cls.__name__}: {mistyped}")
        if unknown and cls.__module__.startswith("accel."):
            raise ValueError(f"{path}: {cls.__name__} takes no config field(s) {unknown} (misspelt?); its fields: "
                             f"{sorted(p for p in inspect.signature(cls.__init__).parameters if p != 'self')}")
        if unknown:
            hints[name] = f" (fields {cls.__name__} ignores: {unknown})"
    return hints


def load_checked(cls, path, kwargs: dict, load):
    """`cls.from_pretrained(path, **kwargs)` through `load(folder, kwargs)`, with the dtype resolved and the folder's
    configs checked before loading and its weights after: a config that disagrees with its weights is refused at
    load time, naming the tensors, instead of failing (or generating noise) at the first call."""
    kwargs = dict(kwargs)
    for key in ("dtype", "torch_dtype"):
        if key in kwargs:
            kwargs[key] = resolve_dtype(kwargs[key], f"{cls.__name__}.from_pretrained", key)
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        folder = DiffusionPipeline.download(folder, **{k: kwargs[k] for k in _DOWNLOAD_KWARGS if k in kwargs})
    given = set(kwargs)  # components the caller built: not loaded from the folder
    hints = _check_configs(folder, given)
    pipe = load(folder, kwargs)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name not in given:
            check_module_weights(component, os.path.join(folder, name), hints.get(name, ""))
    return pipe
