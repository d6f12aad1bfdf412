"""The models the demo offers: the shipped reference pipelines and the user's local diffusers folders.

A model is described from its `model_index.json` when the app starts (what it makes, which modes and attention
methods it takes) and loaded on its first request only, once, then kept. A folder that fails to load leaves the app
serving: the request that tried gets the message, and the next request tries again.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import threading
from dataclasses import dataclass, field

import torch

from accel.eval.harness.generate import OWN_PIPELINES, load_pipeline
from accel.eval.harness.spec import SpecError
from accel.pipelines.shapes.reference import reference_names, weights_dir

PLAIN, LONG = "plain", "long video by chunks"
IMAGE, VIDEO = "image", "video"
CACHES = ("none", "cg_taylor", "first_block_cache", "taylorseer", "mag_cache")
# The attention method that fits each transformer class; other transformers take none.
ATTENTION_BY_TRANSFORMER = {
    "WanTransformer3DModel": "sparse_attention",
    "SanaTransformer2DModel": "linear_attention_kernels",
    "SanaVideoTransformer3DModel": "linear_attention_kernels",
    "CausalSanaVideoTransformer3DModel": "linear_attention_kernels",
}
EXAMPLE_PROMPTS = {"shapes-image": "a red circle", "shapes-video": "a red circle moving left",
                   "shapes-long-video": "a blue square moving right"}
# Bidirectional video pipelines that accel's chunked long-video pipelines load from the same folder.
LONG_VERSIONS = {"SanaVideoPipeline": ("accel.pipelines", "LongSanaVideoPipeline")}


class DemoError(Exception):
    """A request the demo cannot serve; the message is shown in the page."""


def _pipeline_class(name: str) -> type:
    module = OWN_PIPELINES.get(name, "diffusers")
    cls = getattr(importlib.import_module(module), name, None)
    if cls is None:
        raise DemoError(f"pipeline class {name!r} is neither in diffusers nor one of accel's")
    return cls


@dataclass
class ModelEntry:
    """One model of the model menu."""

    name: str
    source: str  # a shipped reference name or a local folder
    pipeline_class: str
    transformer_class: str | None
    kind: str = IMAGE
    modes: tuple[str, ...] = (PLAIN,)
    problem: str | None = None  # why it cannot be used, shown when it is picked
    defaults: dict = field(default_factory=dict)  # the pipeline's own defaults: steps, guidance, frames
    example_prompt: str | None = None
    _pipelines: dict = field(default_factory=dict, repr=False)  # mode -> loaded pipeline

    @property
    def attention_methods(self) -> tuple[str, ...]:
        method = ATTENTION_BY_TRANSFORMER.get(self.transformer_class)
        return ("none", method) if method else ("none",)

    def check_choice(self, what: str, chosen: str) -> None:
        offered = {"mode": self.modes, "caching method": self.caches, "attention method": self.attention_methods}[what]
        if chosen not in offered:
            raise DemoError(f"{self.name} offers {' or '.join(map(repr, offered))} as {what}, not {chosen!r}")

    @property
    def caches(self) -> tuple[str, ...]:
        # diffusers ships MagCache's magnitude ratios for FLUX only; other models would need calibrating first.
        flux = self.transformer_class == "FluxTransformer2DModel"
        return tuple(c for c in CACHES if c != "mag_cache" or flux)


def describe(name: str, folder: str, source: str) -> ModelEntry:
    """A menu entry from a saved pipeline's model_index.json, without loading any weights."""
    index = json.load(open(os.path.join(folder, "model_index.json")))
    transformer = index.get("transformer")
    entry = ModelEntry(name, source, index.get("_class_name", "?"), transformer[1] if transformer else None)
    try:
        params = inspect.signature(_pipeline_class(entry.pipeline_class).__call__).parameters
    except DemoError as err:
        entry.problem = f"{name}: {err}"
        return entry
    entry.kind = VIDEO if "num_frames" in params else IMAGE
    entry.defaults = {k: params[k].default for k in ("num_inference_steps", "guidance_scale", "num_frames")
                      if k in params and isinstance(params[k].default, (int, float))}
    entry.example_prompt = EXAMPLE_PROMPTS.get(source)
    if "num_chunks" in params:
        entry.modes = (LONG,)
    elif entry.pipeline_class in LONG_VERSIONS:
        entry.modes = (PLAIN, LONG)
    return entry


class Catalog:
    """The model menu; `pipeline(name, mode)` loads a model once and returns it with the lock its requests share."""

    def __init__(self, entries: list[ModelEntry], device: str, dtype: torch.dtype):
        self.entries = {e.name: e for e in entries}
        self.device, self.dtype = device, dtype
        self._load_lock = threading.Lock()
        self._run_locks: dict[str, threading.Lock] = {name: threading.Lock() for name in self.entries}

    @classmethod
    def build(cls, folders: list[str], device: str, dtype: torch.dtype) -> "Catalog":
        entries = [describe(name, weights_dir(name), name) for name in reference_names(prompted_only=True)]
        taken = {e.name for e in entries}
        for folder in folders:
            name = base = os.path.basename(os.path.normpath(folder))
            suffix = 2
            while name in taken:
                name, suffix = f"{base}-{suffix}", suffix + 1
            taken.add(name)
            entries.append(describe(name, folder, os.path.abspath(folder)))
        return cls(entries, device, dtype)

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> ModelEntry:
        if name not in self.entries:
            raise DemoError(f"unknown model {name!r}; available: {', '.join(self.entries)}")
        entry = self.entries[name]
        if entry.problem:
            raise DemoError(entry.problem)
        return entry

    def pipeline(self, name: str, mode: str):
        """The loaded pipeline of `name` in `mode`, and the lock that keeps its requests from overlapping."""
        entry = self.entry(name)
        entry.check_choice("mode", mode)
        with self._load_lock:
            if mode not in entry._pipelines:
                entry._pipelines[mode] = self._load(entry, mode)
        return entry._pipelines[mode], self._run_locks[name]

    def _load(self, entry: ModelEntry, mode: str):
        try:
            if mode == LONG and entry.pipeline_class in LONG_VERSIONS:
                module, class_name = LONG_VERSIONS[entry.pipeline_class]
                cls = getattr(importlib.import_module(module), class_name)
                pipe = cls.from_pretrained(entry.source, dtype=self.dtype).to(self.device)
            else:
                pipe = load_pipeline(entry.source, self.device, str(self.dtype).removeprefix("torch."))
        except SpecError as err:
            raise DemoError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - a folder that does not load is the user's to fix; the app goes on
            raise DemoError(f"cannot load {entry.name} from {entry.source}: {type(err).__name__}: {err}") from None
        pipe.set_progress_bar_config(disable=False)  # the page's progress bar follows the pipeline's
        return pipe
