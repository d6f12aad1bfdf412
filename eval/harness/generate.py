"""Generate and time every (configuration, prompt, seed) sample, caching each one atomically on disk.

Layout of a run folder:
    spec.json                         what was asked
    samples/<config>/<prompt>-<seed>.npy    uint8 (H, W, 3) or (T, H, W, 3), written through a temporary file
    samples/<config>/<prompt>-<seed>.json   the accelerator's stats for that sample
    timing.json                       every configuration's latencies over the interleaved rounds, peak memory
A class-conditional pipeline's sample also records its class id in its .json (class_conditional.py). A sample already
on disk is never generated again, so an interrupted run resumes where it stopped; the timing is written once, whole,
after the samples.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import platform
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import accel
from accel.pipelines import reference_names, reference_pipeline

from .class_conditional import TIMED_BATCH, is_class_conditional, label_ids, methods_refusal
from .spec import CALL_FLAGS, MethodConfig, RunSpec, SpecError


OWN_PIPELINES = {  # class name in a saved model_index.json -> the accel module defining it
    "ShapesImagePipeline": "accel.pipelines.shapes.pipelines",
    "ShapesVideoPipeline": "accel.pipelines.shapes.pipelines",
    "ShapesLongVideoPipeline": "accel.pipelines.shapes.long_video",
    "LongSanaVideoPipeline": "accel.pipelines",
    "StreamingT2VPipeline": "accel.pipelines",
    "ShapesStreamingT2VPipeline": "accel.pipelines",
    "VARPipeline": "accel.pipelines.hmar",
    "HMARPipeline": "accel.pipelines.hmar",
}


def load_pipeline(name: str, device: str, dtype: str):
    """A shipped reference name, a local folder, or a model id already in the local HF cache. Never downloads."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # loading bars would break the one-line error of a refused run
    transformers.utils.logging.disable_progress_bar()
    torch_dtype = getattr(torch, dtype)
    index = os.path.join(name, "model_index.json")
    own = json.load(open(index)).get("_class_name") if os.path.isfile(index) else None
    if name in reference_names():
        pipe = reference_pipeline(name, device=device, dtype=torch_dtype)
    elif own in OWN_PIPELINES:  # accel's own pipeline classes, saved locally
        pipe = getattr(importlib.import_module(OWN_PIPELINES[own]), own).from_pretrained(name, dtype=torch_dtype)
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


def check_call_arguments(pipe, call: dict) -> dict:
    """The pipeline call's arguments from the run's options; a SpecError for those the pipeline cannot take."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs = {k: v for k, v in call.items() if v is not None}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [CALL_FLAGS.get(k, k) for k in kwargs if k not in params]
        if unknown:
            raise SpecError(f"{', '.join(unknown)}: {type(pipe).__name__} takes no such argument")
    if "num_chunks" in params and "num_frames" not in kwargs:
        raise SpecError(f"--frames: {type(pipe).__name__} makes videos of any length: give --frames")
    return kwargs


def _call(pipe, prompt: str, seed: int, call: dict, device: str) -> np.ndarray:
    """One sample as uint8, channels last; frames first for videos."""
    return _batch(pipe, [prompt], [seed], call)[0]


def _batch(pipe, prompts: list[str], seeds: list[int], call: dict) -> np.ndarray:
    """One sample per prompt, sample i drawn from its own generator of seeds[i]. A prompted pipeline gets one prompt
    (`timed_batch`); a class-conditional one a batch of class ids, as such a generator is used."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs = check_call_arguments(pipe, call)
    if "prompt" in params:
        (kwargs["prompt"],) = prompts
    elif "class_labels" in params:  # class names (or ids) as prompts
        kwargs["class_labels"] = label_ids(pipe, prompts)
    if "output_type" in params:  # long-video pipelines return numpy frames anyway
        kwargs["output_type"] = "np"
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    out = pipe(**kwargs, generator=generators[0] if len(generators) == 1 else generators)
    pixels = out.frames if hasattr(out, "frames") else out.images
    return (np.asarray(pixels) * 255).round().clip(0, 255).astype(np.uint8)


class _Probed(Exception):
    """Raised at the denoiser's first call: the pipeline has accepted its inputs, and no step has run."""


def _stop(module, args, kwargs):
    raise _Probed


def _refusal(pipe, prompt: str, call: dict, device: str) -> str | None:
    """Why the pipeline refuses this call (its own checks, the prompt's encoding), found by running the call up to
    the denoiser's first step only; None if it accepts it."""
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if not isinstance(denoiser, torch.nn.Module):
        return None  # nothing to stop at: the pipeline's checks run at generation
    hook = denoiser.register_forward_pre_hook(_stop, with_kwargs=True)
    try:
        _call(pipe, prompt, 0, call, device)
    except _Probed:
        return None
    except (ValueError, TypeError) as err:  # what pipelines raise on arguments they refuse
        return " ".join(str(err).split())
    finally:
        hook.remove()
    return None


def _check_class_names(pipe, spec: RunSpec) -> None:
    """Each prompt of a class-conditional run names a class the pipeline has; then one call checks the settings: they
    are the same for every class, so a call per prompt would check nothing more."""
    owner, count = type(pipe).__name__, len(spec.prompts)
    num_classes = getattr(getattr(pipe.transformer, "config", None), "num_classes", None)
    for index, prompt in enumerate(spec.prompts):
        try:
            (label,) = label_ids(pipe, [prompt])
        except ValueError as err:
            raise SpecError(f"--prompts: prompt {index + 1} of {count} ({prompt!r}): {err}") from None
        if num_classes is not None and not 0 <= label < num_classes:
            raise SpecError(f"--prompts: prompt {index + 1} of {count} ({prompt!r}): {owner} has classes 0 .. "
                            f"{num_classes - 1}")
    why = _refusal(pipe, spec.prompts[0], spec.call, spec.device)
    if why:
        given = " ".join(f"{CALL_FLAGS[k]} {v}" for k, v in spec.call.items()) or "the default settings"
        raise SpecError(f"{given}: {owner} refuses these settings: {why}")


def check_inputs(pipe, spec: RunSpec) -> None:
    """Every prompt, with the run's call settings, as the pipeline will get them: a refusal names the prompt or the
    settings (the prompt is to blame when the pipeline also refuses it with its default settings)."""
    check_call_arguments(pipe, spec.call)
    if is_class_conditional(pipe):
        return _check_class_names(pipe, spec)
    essential = {k: v for k, v in spec.call.items() if k == "num_frames"}  # a long video needs its length
    owner = type(pipe).__name__
    first_index: dict[str, int] = {}
    for index, prompt in enumerate(spec.prompts):
        first_index.setdefault(prompt, index)
    for prompt, index in first_index.items():
        why = _refusal(pipe, prompt, spec.call, spec.device)
        if why is None:
            continue
        if essential != spec.call and _refusal(pipe, prompt, essential, spec.device) is None:
            given = " ".join(f"{CALL_FLAGS[k]} {v}" for k, v in spec.call.items())
            raise SpecError(f"{given}: {owner} refuses these settings: {why}")
        raise SpecError(f"--prompts: prompt {index + 1} of {len(spec.prompts)} ({prompt!r}): {owner} refuses it: {why}")


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


def patch_config(pipe, config: MethodConfig, spec: RunSpec):
    """accel.patch with the configuration's options; mag_cache lays its ratios out over the run's --steps, and takes
    the run's measured ratios (`spec.mag_ratios`) where its options give none. A pipeline
    no method applies to is refused here, with the reason (every path to a patch comes through here)."""
    why = methods_refusal(pipe)
    if why:
        raise NotImplementedError(why)
    options = dict(config.options)
    if config.method == "mag_cache" and "num_inference_steps" in spec.call:
        options.setdefault("num_inference_steps", spec.call["num_inference_steps"])
    if config.method == "mag_cache" and spec.mag_ratios is not None:
        options.setdefault("mag_ratios", spec.mag_ratios)
    return accel.patch(pipe, method=config.method, **options)


def generate(pipe, spec: RunSpec, run_dir: str, jobs: list[tuple[int, int]]) -> None:
    """All samples of `jobs` for every configuration, skipping those on disk."""
    todo = [(c, j) for c in spec.configs for j in jobs if not os.path.exists(sample_path(run_dir, c, *j))]
    class_conditional = is_class_conditional(pipe)
    bar = tqdm(total=len(todo), desc="samples", disable=not todo)
    for config in spec.configs:
        missing = [j for j in jobs if not os.path.exists(sample_path(run_dir, config, *j))]
        if not missing:
            continue
        handle = patch_config(pipe, config, spec) if config.method else None
        try:
            for prompt_index, seed in missing:
                if handle:
                    handle.reset()  # the totals then count this sample's generations (a long video: one per chunk)
                prompt = spec.prompts[prompt_index]
                pixels = _call(pipe, prompt, seed, spec.call, spec.device)
                path = sample_path(run_dir, config, prompt_index, seed)
                # A class-conditional sample keeps its class id: the report then needs neither pipeline nor names.
                label = {"class_label": label_ids(pipe, [prompt])[0]} if class_conditional else {}
                atomic_json(path[:-4] + ".json", {**(handle.totals() if handle else {}), **label})
                atomic_write(path, lambda f: np.save(f, pixels))  # last: its presence marks the sample done
                bar.update()
        finally:
            if handle:
                handle.remove()
    bar.close()


def timing_path(run_dir: str) -> str:
    return os.path.join(run_dir, "timing.json")


def timed_batch(pipe, spec: RunSpec) -> int:
    """Samples a timed call makes: one, or for a class-conditional pipeline a batch, one per prompt (a generator of
    images is used in batches; up to TIMED_BATCH)."""
    return min(len(spec.prompts), TIMED_BATCH) if is_class_conditional(pipe) else 1


def _timed_call(pipe, spec: RunSpec, config: MethodConfig) -> tuple[float, dict | None, float | None]:
    """Seconds of one call of the first prompt (a class-conditional pipeline: the first `timed_batch` prompts) under
    the configuration (patching excluded), its accelerator stats and peak GPU memory."""
    prompts = spec.prompts[: timed_batch(pipe, spec)]
    handle = patch_config(pipe, config, spec) if config.method else None
    cuda = torch.device(spec.device) if spec.device.startswith("cuda") else None
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(cuda)
        _sync(spec.device)
        start = time.perf_counter()
        _batch(pipe, prompts, list(range(len(prompts))), spec.call)
        _sync(spec.device)
        seconds = time.perf_counter() - start
        return seconds, handle.totals() if handle else None, torch.cuda.max_memory_allocated(cuda) / 1e9 if cuda else None
    finally:
        if handle:
            handle.remove()


def timing_rounds(configs: list[MethodConfig], repeats: int) -> list[list[MethodConfig]]:
    """A warm-up round, then `repeats` timed rounds, each configuration once per round. The order turns by one each
    round, so no configuration is always first (cold caches) or always after the same one; the rounds pair each
    configuration's latency with the baseline's of the same moment."""
    return [configs[r % len(configs):] + configs[: r % len(configs)] for r in range(repeats + 1)]


def time_configs(pipe, spec: RunSpec, run_dir: str) -> None:
    """Latencies of every configuration, interleaved (see `timing_rounds`), in timing.json (skipped if there)."""
    time_runs([(pipe, spec, run_dir)])


def time_runs(runs: list[tuple]) -> None:
    """Every configuration of each (pipe, spec, run_dir) in the same interleaved rounds (`timing_rounds` over all of
    them: several generators side by side pair their latencies as a run pairs its configurations), each run's in its
    timing.json. Skipped if every run has one; all retimed if one lacks it (its rounds would pair with nothing)."""
    if all(os.path.exists(timing_path(run_dir)) for _, _, run_dir in runs):
        return
    entries = [(i, config) for i, (_, spec, _) in enumerate(runs) for config in spec.configs]
    rounds = timing_rounds(entries, max(spec.repeats for _, spec, _ in runs))
    records = _time_rounds(runs, rounds)
    names = [spec.pipeline for _, spec, _ in runs]
    for i, (pipe, spec, run_dir) in enumerate(runs):
        atomic_json(timing_path(run_dir), {  # the other runs' entries of a round named by their pipeline
            "rounds": [[c.label if j == i else f"{names[j]}: {c.label}" for j, c in order] for order in rounds[1:]],
            "warm_up_rounds": 1, "configs": records[i], "timed_batch": timed_batch(pipe, spec),
            "environment": environment(spec)})


def _time_rounds(runs: list[tuple], rounds: list[list[tuple[int, MethodConfig]]]) -> list[dict]:
    """Each run's configurations' latencies, accelerator stats and peak memory over the rounds (the first, the
    warm-up, not kept); a round's entries are (run index, configuration)."""
    records = [{c.label: {"latencies_s": [], "stats": [], "peak_memory_gb": None} for c in spec.configs}
               for _, spec, _ in runs]
    bar = tqdm(total=sum(map(len, rounds)), desc="timing (round 0: warm-up)")
    for round_index, order in enumerate(rounds):
        for i, config in order:
            pipe, spec, _ = runs[i]
            seconds, stats, peak = _timed_call(pipe, spec, config)
            bar.update()
            if round_index == 0:
                continue
            entry = records[i][config.label]
            entry["latencies_s"].append(seconds)
            entry["stats"].append(stats)
            entry["peak_memory_gb"] = max(filter(None, [entry["peak_memory_gb"], peak]), default=None)
    bar.close()
    return records


def load_samples(run_dir: str, spec: RunSpec, config: MethodConfig) -> tuple[np.ndarray, list[dict]]:
    """The configuration's samples in job order, with the accelerator's stats of each."""
    pixels, stats = [], []
    for prompt_index, seed in spec.jobs():
        path = sample_path(run_dir, config, prompt_index, seed)
        if not os.path.exists(path):
            raise SpecError(f"{run_dir}: sample {path} is missing; run `accel-eval run` again to finish it")
        try:
            pixels.append(np.load(path))
            stats.append(json.load(open(path[:-4] + ".json")))
        except (OSError, ValueError, EOFError) as err:  # edited or damaged by hand: atomic writes leave none
            raise SpecError(f"{run_dir}: sample {path} is unreadable ({err}); delete it and run `accel-eval run` "
                            "again to regenerate it") from None
    return np.stack(pixels), stats
