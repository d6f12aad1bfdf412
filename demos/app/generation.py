"""One demo request, from settings to files: the unaccelerated run (once per settings, then cached), the
accelerated run, the measurements between them.

`Runner.stream(...)` is a generator of events for the page: `Chunk`s of a long video as they finish, then one
`Result`. The pipeline runs on a worker thread so that chunks can be handed over while it goes on; the caller's
cancel event stops it at its next denoising step.
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import logging
import math
import os
import queue
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import imageio.v2 as imageio
import numpy as np
import torch

import accel
from accel.eval.harness.metrics import fidelity

from .catalog import IMAGE, LONG, Catalog, DemoError

logger = logging.getLogger("accel.demos.app")
FPS = 16
DISPLAY_SIZE = 256  # small outputs (the shipped models make 32 px) are shown enlarged, nearest-neighbour
MAX_STEPS, MAX_FRAMES = 200, 257
REQUESTS = "requests"  # out_dir/requests/<id>/: one folder per request


class Cancelled(Exception):
    """The request was stopped (Stop button, or the page went away)."""


@dataclass(frozen=True)
class Settings:
    """What to generate; equal settings give equal unaccelerated outputs (the cache key)."""

    model: str
    mode: str
    prompt: str
    steps: int
    seed: int
    guidance: float
    length: int  # frames (plain video) or chunks (long video); unused for images

    def check(self, max_chunks: int) -> None:
        if not self.prompt.strip():
            raise DemoError("Enter a prompt.")
        _check_range("steps", self.steps, 1, MAX_STEPS)
        _check_range("seed", self.seed, 0, 2**32 - 1)
        if not math.isfinite(self.guidance) or not 0 <= self.guidance <= 30:
            raise DemoError(f"guidance must be between 0 and 30, got {self.guidance}")
        if self.mode == LONG:
            _check_range("chunks", self.length, 1, max_chunks)
        else:
            _check_range("frames", self.length, 1, MAX_FRAMES)


def _check_range(name: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise DemoError(f"{name} must be a whole number from {low} to {high}, got {value!r}")


@dataclass(frozen=True)
class Acceleration:
    """The page's method choice: one cache and one attention method, each with its main knob."""

    cache: str = "none"
    attention: str = "none"
    threshold: float | None = None  # cg_taylor, first_block_cache, mag_cache; None: the method's default / preset
    interval: int = 3  # taylorseer
    pattern: str = "local_3d"  # sparse_attention

    @property
    def is_none(self) -> bool:
        return self.cache == "none" and self.attention == "none"

    def configs(self) -> list:
        """The typed accel configs, checked as `accel.patch` checks them."""
        options = {
            "cg_taylor": {"threshold": self.threshold},
            "first_block_cache": {"threshold": self.threshold},
            "mag_cache": {"threshold": self.threshold},
            "taylorseer": {"cache_interval": self.interval},
            "sparse_attention": {"pattern": self.pattern},
            "linear_attention_kernels": {},
        }
        configs = []
        for method in (self.attention, self.cache):
            if method == "none":
                continue
            if method not in options:
                raise DemoError(f"unknown method {method!r}")
            fields = {k: v for k, v in options[method].items() if v is not None}
            try:
                configs.append(accel.make_config(method, **fields))
            except (TypeError, ValueError) as err:
                raise DemoError(f"{method}: {err}") from None
        return configs

    def label(self) -> str:
        parts = []
        if self.attention != "none":
            parts.append(f"{self.attention}({self.pattern})" if self.attention == "sparse_attention" else self.attention)
        if self.cache == "taylorseer":
            parts.append(f"taylorseer(interval={self.interval})")
        elif self.cache != "none":
            parts.append(f"{self.cache}(threshold={'default' if self.threshold is None else self.threshold})")
        return " + ".join(parts) or "none"


@dataclass
class Output:
    """One generation: uint8 pixels, (H, W, 3) or (T, H, W, 3), and what it cost."""

    pixels: np.ndarray
    seconds: float
    steps: dict | None = None  # steps / computed / predicted over the whole generation, for a caching method


@dataclass
class Chunk:
    """A finished chunk of the streamed long video: its frames, written to `path` (an mp4 segment) by the request's
    thread, so that encoding never counts in the pipeline's time."""

    index: int
    path: str
    pixels: np.ndarray = field(repr=False)


@dataclass
class Result:
    """What the page shows when a request is done."""

    kind: str
    accelerated: str  # file paths
    unaccelerated: str
    measurements: dict = field(default_factory=dict)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _to_uint8(pixels) -> np.ndarray:
    return (np.asarray(pixels)[0] * 255).round().clip(0, 255).astype(np.uint8)


def call_pipeline(pipe, settings: Settings, kind: str, cancel: threading.Event,
                  on_chunk: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """One sample as uint8 from a diffusers-convention pipeline; raises Cancelled at the step after `cancel` is set."""
    params = inspect.signature(pipe.__call__).parameters

    def stop_when_cancelled(pipe, step, timestep, tensors):
        if cancel.is_set():
            raise Cancelled
        return {}

    kwargs = {"prompt": settings.prompt, "num_inference_steps": settings.steps, "guidance_scale": settings.guidance,
              "generator": torch.Generator("cpu").manual_seed(settings.seed), "output_type": "np",
              "callback_on_step_end": stop_when_cancelled}
    if settings.mode == LONG:
        kwargs["num_chunks"] = settings.length
        kwargs["return_frames"] = True
        if on_chunk is not None:
            kwargs["callback_on_chunk_end"] = lambda pipe, index, frames: on_chunk(index, _to_uint8(frames))
    elif kind != IMAGE:
        kwargs["num_frames"] = settings.length
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    out = pipe(**kwargs)
    return _to_uint8(out.frames if hasattr(out, "frames") else out.images)


def timed_run(pipe, settings: Settings, kind: str, configs: list, cancel: threading.Event, device: str,
              on_chunk=None) -> Output:
    """Generate under `configs` (patched for this run only, removed after it, whatever happens)."""
    handles = []
    try:
        for config in configs:
            handles.append(accel.patch(pipe, config))
        _sync(device)
        start = time.perf_counter()
        pixels = call_pipeline(pipe, settings, kind, cancel, on_chunk)
        _sync(device)
        seconds = time.perf_counter() - start
        totals = [h.totals() for h in handles if "computed" in h.totals()]
        steps = {k: totals[0][k] for k in ("steps", "computed", "predicted")} if totals else None
        return Output(pixels, seconds, steps)
    finally:
        for handle in reversed(handles):
            handle.remove()


def enlarged(pixels: np.ndarray) -> np.ndarray:
    factor = max(1, DISPLAY_SIZE // max(pixels.shape[-3:-1]))
    return pixels.repeat(factor, axis=-3).repeat(factor, axis=-2) if factor > 1 else pixels


def save(path: str, pixels: np.ndarray) -> str:
    """A png (image) or an H.264 mp4 (video), written to a temporary name and renamed into place."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.partial{ext}"
    if pixels.ndim == 3:
        imageio.imwrite(tmp, enlarged(pixels))
    else:  # imageio-ffmpeg's bundled ffmpeg: libx264, yuv420p, which every browser plays
        imageio.mimwrite(tmp, enlarged(pixels), fps=FPS, macro_block_size=1)
    os.replace(tmp, path)
    return path


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"


def measurements(settings: Settings, acceleration: Acceleration, accelerated: Output, baseline: Output,
                 baseline_cached: bool) -> dict:
    quality = fidelity(accelerated.pixels[None], baseline.pixels[None])
    out = {
        "model": settings.model, "mode": settings.mode, "method": acceleration.label(),
        "latency_s": round(accelerated.seconds, 4), "unaccelerated_latency_s": round(baseline.seconds, 4),
        "speedup": round(baseline.seconds / accelerated.seconds, 3),
        "unaccelerated_from_cache": baseline_cached,
        "psnr_db": _finite(round(quality["psnr"], 2)), "ssim": round(quality["ssim"], 4),
    }
    if accelerated.steps is not None:
        out.update({f"steps_{k}": v for k, v in accelerated.steps.items()})
    return out


class Runner:
    """Serves requests on a catalog: per settings, the unaccelerated run happens once and is kept (the `baselines`
    most recent settings); each accelerated run patches the pipeline for itself, under the model's lock."""

    def __init__(self, catalog: Catalog, out_dir: str, max_chunks: int = 64, keep_minutes: float = 60,
                 baselines: int = 8):
        self.catalog, self.out_dir, self.max_chunks, self.keep_minutes = catalog, out_dir, max_chunks, keep_minutes
        self._baselines: OrderedDict[Settings, Output] = OrderedDict()
        self._baselines_size = baselines
        self._baselines_lock = threading.Lock()
        self._warmed: set[int] = set()

    def stream(self, settings: Settings, acceleration: Acceleration, cancel: threading.Event) -> Iterator[Chunk | Result]:
        """Events of one request. Leaving the loop early (Stop, a closed page) cancels the run."""
        entry = self.catalog.entry(settings.model)
        entry.check_choice("mode", settings.mode)
        entry.check_choice("caching method", acceleration.cache)
        entry.check_choice("attention method", acceleration.attention)
        settings.check(self.max_chunks)
        if entry.kind == IMAGE:
            settings = dataclasses.replace(settings, length=1)  # one cache entry whatever the hidden frames field says
        configs = acceleration.configs()
        events: queue.Queue = queue.Queue()
        # The worker runs in a copy of this context, where gradio's progress tracker lives.
        worker = threading.Thread(target=contextvars.copy_context().run, daemon=True,
                                  args=(self._work, settings, acceleration, configs, cancel, events.put))
        worker.start()
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Chunk):
                    save(event.path, event.pixels)
                yield event
                if isinstance(event, Result):
                    return
        finally:
            cancel.set()  # stops a worker still running, at its next step; a finished one ignores it

    def _work(self, settings, acceleration, configs, cancel, emit) -> None:
        try:
            emit(self._serve(settings, acceleration, configs, cancel, emit))
        except Cancelled as err:
            logger.info("request stopped: %s, %s", settings, acceleration.label())
            emit(err)
        except BaseException as err:  # noqa: BLE001 - handed to the request's thread, which raises it
            emit(err)

    def _serve(self, settings, acceleration, configs, cancel, emit) -> Result:
        logger.info("request: %s, %s", settings, acceleration.label())
        entry = self.catalog.entry(settings.model)
        pipe, lock = self.catalog.pipeline(settings.model, settings.mode)
        self._prune()
        folder = os.path.join(self.out_dir, REQUESTS, uuid.uuid4().hex)
        os.makedirs(folder)
        ext = ".png" if entry.kind == IMAGE else ".mp4"

        def on_chunk(index: int, frames: np.ndarray) -> None:
            emit(Chunk(index, os.path.join(folder, f"chunk-{index:04d}.mp4"), frames))

        streamed = on_chunk if settings.mode == LONG else None
        with lock:
            self._warm_up(pipe, settings, entry.kind, cancel)
            baseline, cached = self._baseline(pipe, settings, entry.kind, cancel,
                                              streamed if acceleration.is_none else None)
            if acceleration.is_none:
                accelerated = baseline
                if cached and streamed:  # nothing was generated: the page still gets its video as one segment
                    streamed(0, baseline.pixels)
            else:
                accelerated = self._guarded(timed_run, pipe, settings, entry.kind, configs, cancel,
                                            self.catalog.device, streamed)
        return Result(
            entry.kind,
            accelerated=save(os.path.join(folder, "accelerated" + ext), accelerated.pixels),
            unaccelerated=save(os.path.join(folder, "unaccelerated" + ext), baseline.pixels),
            measurements=measurements(settings, acceleration, accelerated, baseline, cached),
        )

    def _warm_up(self, pipe, settings, kind, cancel) -> None:
        """A model's first generation pays one-off costs (allocations, kernel selection, lazy imports) that would
        otherwise count against whichever run came first: two steps at the request's sizes, once per model."""
        if id(pipe) in self._warmed:
            return
        short = dataclasses.replace(settings, steps=min(2, settings.steps),
                                    length=1 if settings.mode == LONG else settings.length)
        self._guarded(call_pipeline, pipe, short, kind, cancel)
        self._warmed.add(id(pipe))

    def _baseline(self, pipe, settings, kind, cancel, on_chunk) -> tuple[Output, bool]:
        with self._baselines_lock:
            if settings in self._baselines:
                self._baselines.move_to_end(settings)
                return self._baselines[settings], True
        output = self._guarded(timed_run, pipe, settings, kind, [], cancel, self.catalog.device, on_chunk)
        with self._baselines_lock:
            self._baselines[settings] = output
            if len(self._baselines) > self._baselines_size:
                self._baselines.popitem(last=False)
        return output, False

    def _prune(self) -> None:
        """Delete request folders older than `keep_minutes`: the app serves only its recent outputs."""
        root = os.path.join(self.out_dir, REQUESTS)
        cutoff = time.time() - 60 * self.keep_minutes
        for name in os.listdir(root) if os.path.isdir(root) else ():
            path = os.path.join(root, name)
            if os.path.getmtime(path) < cutoff:
                shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _guarded(run, *args):
        """The pipeline's own refusals (its check_inputs) are the user's input problems: shown as such."""
        try:
            return run(*args)
        except (ValueError, TypeError) as err:
            raise DemoError(str(err)) from None
