"""Generate and time every (configuration, prompt, seed) sample, caching each one atomically on disk.

Layout of a run folder:
    spec.json                         what was asked
    samples/<config>/<prompt>-<seed>.npy    uint8 (H, W, 3) or (T, H, W, 3), written through a temporary file
    samples/<config>/<prompt>-<seed>.json   the accelerator's stats for that sample
    timing/<config>.json              latencies of the timed repeats, peak memory
A sample already on disk is never generated again, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import accel
from accel.pipelines import reference_names, reference_pipeline

from .spec import MethodConfig, RunSpec, SpecError


_OWN_PIPELINES = {  # class name in a saved model_index.json -> the accel module defining it
    "ShapesImagePipeline": "accel.pipelines.shapes.pipelines",
    "ShapesVideoPipeline": "accel.pipelines.shapes.pipelines",
    "ShapesLongVideoPipeline": "accel.pipelines.shapes.long_video",
    "LongSanaVideoPipeline": "accel.pipelines",
}


def load_pipeline(name: str, device: str, dtype: str):
    """A shipped reference name, a local folder, or a model id already in the local HF cache. Never downloads."""
    torch_dtype = getattr(torch, dtype)
    index = os.path.join(name, "model_index.json")
    own = json.load(open(index)).get("_class_name") if os.path.isfile(index) else None
    if name in reference_names():
        pipe = reference_pipeline(name, device=device, dtype=torch_dtype)
    elif own in _OWN_PIPELINES:  # accel's own pipeline classes, saved locally
        pipe = getattr(importlib.import_module(_OWN_PIPELINES[own]), own).from_pretrained(name, dtype=torch_dtype)
        pipe = pipe.to(device)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(name, dtype=torch_dtype, local_files_only=True).to(device)
        except Exception as err:  # noqa: BLE001 - any loading failure is the user's input problem here
            raise SpecError(f"cannot load pipeline {name!r} from a local folder or the local HF cache: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def atomic_write(path: str, write) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: leave nothing half-written behind
            os.remove(tmp)


def atomic_json(path: str, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, default=str).encode()))


_FLAGS = {"num_inference_steps": "--steps", "height": "--height", "width": "--width", "num_frames": "--frames",
          "guidance_scale": "--guidance"}  # the command-line flag behind each pipeline argument


def check_call_arguments(pipe, call: dict) -> dict:
    """The pipeline call's arguments from the run's options; a SpecError for those the pipeline cannot take."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs = {k: v for k, v in call.items() if v is not None}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [_FLAGS.get(k, k) for k in kwargs if k not in params]
        if unknown:
            raise SpecError(f"{type(pipe).__name__} takes no {', '.join(unknown)}")
    if "num_chunks" in params and "num_frames" not in kwargs:
        raise SpecError(f"{type(pipe).__name__} makes videos of any length: give --frames")
    return kwargs


def _call(pipe, prompt: str, seed: int, call: dict, device: str) -> np.ndarray:
    """One sample as uint8, channels last; frames first for videos."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs = check_call_arguments(pipe, call)
    if "prompt" in params:
        kwargs["prompt"] = prompt
    elif "class_labels" in params:  # DiTPipeline: ImageNet label names as prompts
        kwargs["class_labels"] = pipe.get_label_ids([prompt])
    if "output_type" in params:  # long-video pipelines return numpy frames anyway
        kwargs["output_type"] = "np"
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(**kwargs, generator=generator)
    pixels = out.frames if hasattr(out, "frames") else out.images
    return (np.asarray(pixels)[0] * 255).round().clip(0, 255).astype(np.uint8)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def sample_path(run_dir: str, config: MethodConfig, prompt_index: int, seed: int) -> str:
    return os.path.join(run_dir, "samples", config.slug, f"{prompt_index:05d}-{seed}.npy")


def environment(spec: RunSpec) -> dict:
    """The machine and versions generating the samples (recorded with the timings they explain)."""
    import diffusers
    from accelerate import PartialState

    gpu = torch.cuda.get_device_name() if spec.device.startswith("cuda") and torch.cuda.is_available() else None
    return {"device": spec.device, "gpu": gpu, "processes": PartialState(cpu=spec.device == "cpu").num_processes,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version(), "dtype": spec.dtype,
            "call": spec.call, "pipeline": spec.pipeline, "prompts": len(spec.prompts), "seeds": spec.seeds}


def _time_config(pipe, spec: RunSpec, handle, path: str) -> None:
    """Warm-up, then `repeats` timed calls of the first prompt; median latency and peak memory."""
    if os.path.exists(path):
        return
    prompt = spec.prompts[0]
    _call(pipe, prompt, 0, spec.call, spec.device)  # warm-up: allocations, kernels, caches
    if handle:
        handle.reset()
    if spec.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(spec.device))
    latencies = []
    for _ in range(spec.repeats):
        _sync(spec.device)
        start = time.perf_counter()
        _call(pipe, prompt, 0, spec.call, spec.device)
        _sync(spec.device)
        latencies.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(torch.device(spec.device)) / 1e9 if spec.device.startswith("cuda") else None
    stats = handle.totals() if handle else None  # over the timed calls
    atomic_json(path, {"latencies_s": latencies, "median_s": statistics.median(latencies), "peak_memory_gb": peak,
                       "stats": stats, "environment": environment(spec)})


def patch_config(pipe, config: MethodConfig, spec: RunSpec):
    """accel.patch with the configuration's options; mag_cache lays its ratios out over the run's --steps."""
    options = dict(config.options)
    if config.method == "mag_cache" and "num_inference_steps" in spec.call:
        options.setdefault("num_inference_steps", spec.call["num_inference_steps"])
    return accel.patch(pipe, method=config.method, **options)


def generate(pipe, spec: RunSpec, run_dir: str, jobs: list[tuple[int, int]], time_it: bool = True) -> None:
    """All samples of `jobs` for every configuration (skipping those on disk), and each configuration's timing."""
    todo = [(c, j) for c in spec.configs for j in jobs if not os.path.exists(sample_path(run_dir, c, *j))]
    bar = tqdm(total=len(todo), desc="samples", disable=not todo)
    for config in spec.configs:
        handle = patch_config(pipe, config, spec) if config.method else None
        try:
            for prompt_index, seed in jobs:
                path = sample_path(run_dir, config, prompt_index, seed)
                if os.path.exists(path):
                    continue
                if handle:
                    handle.reset()  # the totals then count this sample's generations (a long video: one per chunk)
                pixels = _call(pipe, spec.prompts[prompt_index], seed, spec.call, spec.device)
                atomic_json(path[:-4] + ".json", handle.totals() if handle else {})
                atomic_write(path, lambda f: np.save(f, pixels))  # last: its presence marks the sample done
                bar.update()
            if time_it:
                _time_config(pipe, spec, handle, os.path.join(run_dir, "timing", f"{config.slug}.json"))
        finally:
            if handle:
                handle.remove()
    bar.close()


def load_samples(run_dir: str, spec: RunSpec, config: MethodConfig) -> tuple[np.ndarray, list[dict]]:
    """The configuration's samples in job order, with the accelerator's stats of each."""
    pixels, stats = [], []
    for prompt_index, seed in spec.jobs():
        path = sample_path(run_dir, config, prompt_index, seed)
        if not os.path.exists(path):
            raise SpecError(f"{run_dir}: sample {path} is missing; run `accel-eval run` again to finish it")
        pixels.append(np.load(path))
        stats.append(json.load(open(path[:-4] + ".json")))
    return np.stack(pixels), stats
