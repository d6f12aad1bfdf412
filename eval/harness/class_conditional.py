"""Class-conditional image generators in the harness: the shipped shapes-var and shapes-hmar (next-scale prediction,
`accel.pipelines.hmar`), and diffusers' DiTPipeline.

Their "prompts" are class names, mapped to class ids: the shipped shapes models' names are shapes-image's captions
("a red circle": class = shape * 6 + colour), DiTPipeline's its own ImageNet names (`get_label_ids`); a prompt that
is a whole number is taken as the class id itself, for any of them. Each sample records its class id (its .json
beside the .npy), so a run folder's report needs no pipeline.

Quality, for the shapes models: the shapes classifier's agreement with the class (shape and colour) and FID / KID
on its features against real images of the shapes data, the measures of `accel.pipelines.hmar.report` (the model
cards). Time: one batch of images (one per prompt, up to TIMED_BATCH) per timed round, as such a generator is used.
Several generators compared side by side (the quickstart's HMAR against VAR) are timed in the same interleaved
rounds, so each speedup is a median of paired ratios, as a method's is against the baseline.

accel.patch's methods skip or approximate denoising steps (caches) or replace a diffusion transformer's attention
(kernels): a next-scale generator has neither, so each method is refused on it with the reason, never run as a no-op.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import statistics
import sys

import torch

logger = logging.getLogger(__name__)

TIMED_BATCH = 32  # images in a timed call at most: the first prompts', one each
SHAPES_REFERENCE_RULE = (
    "Class-conditional shapes generators: the class agreement is the shapes classifier's reading of the class's shape "
    "and colour in every sample; FID and KID compare all samples with real images of the shapes data of the same "
    "classes, one per sample (held-out seed), the measure of the shapes-var / shapes-hmar cards."
)


def is_class_conditional(pipe) -> bool:
    """Called with class ids (`class_labels`), not with a prompt."""
    params = inspect.signature(pipe.__call__).parameters
    return "class_labels" in params and "prompt" not in params


def methods_refusal(pipe) -> str | None:
    """Why no accel.patch method applies to this pipeline, or None."""
    from accel.pipelines.hmar import HMARPipeline, VARPipeline

    if not isinstance(pipe, (VARPipeline, HMARPipeline)):
        return None
    return (f"{type(pipe).__name__} is a class-conditional next-scale generator: it draws tokens scale by scale, with "
            "no denoising steps for accel's caches to skip and no diffusion-transformer attention for its kernels to "
            "replace, so no accel.patch method applies; run it with --method baseline (its quality and time), or "
            "compare it with another generator (`accel-eval quickstart` sets shapes-hmar beside shapes-var)")


def _is_shipped_shapes(pipe) -> bool:
    """Loaded from a shipped shapes-var / shapes-hmar folder: its classes are the shapes data's, with their names."""
    from accel.pipelines import reference_names
    from accel.pipelines.shapes.reference import CLASS_CONDITIONAL, weights_dir

    path = pipe.name_or_path
    return bool(path) and any(os.path.realpath(path) == os.path.realpath(weights_dir(name))
                              for name in CLASS_CONDITIONAL if name in reference_names())


def class_names(pipe) -> dict[str, int]:
    """Name -> class id, where the pipeline's classes have names."""
    if callable(getattr(pipe, "get_label_ids", None)):  # DiTPipeline: its id2label
        return dict(getattr(pipe, "labels", {}))
    if _is_shipped_shapes(pipe):
        from accel.pipelines.hmar.train import CLASS_NAMES

        return {name: i for i, name in enumerate(CLASS_NAMES)}
    return {}


def label_ids(pipe, prompts: list[str]) -> list[int]:
    """The class id of each prompt: a class name, or a whole number. A ValueError (the harness's refusal of a prompt)
    names what is allowed; the pipeline checks the ids' range itself."""
    names = class_names(pipe)
    ids = []
    for prompt in prompts:
        text = prompt.strip()
        if text in names:
            ids.append(names[text])
        elif text.isdigit():
            ids.append(int(text))
        else:
            shown = ", ".join(repr(n) for n in list(names)[:6]) + (", ..." if len(names) > 6 else "")
            allowed = f"a class name ({shown}) or a class id" if names else "a class id (a whole number)"
            raise ValueError(f"{type(pipe).__name__} is class-conditional: each prompt must be {allowed}; "
                             f"got {prompt!r}")
    return ids


def sample_labels(stats: list[dict]) -> list[int] | None:
    """The class id each sample of a run was drawn for (recorded at generation), or None for a prompted run."""
    labels = [s.get("class_label") for s in stats]
    return labels if labels and all(isinstance(label, int) for label in labels) else None


# Generators side by side -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's native layers log its start and stop (and GPU probes on a CPU machine) straight to file
    descriptor 2: hidden here, so the quickstart's output stays the tables."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(call) -> int | None:
    """The running sum of the profiler's allocation events, in time order: the CPU has no peak counter to reset as
    CUDA's allocator has, and a process's high-water mark (ru_maxrss) would keep the image and video runs' peaks.
    Frees of memory allocated before the call are not counted (the profiler does not know their size), which can
    only overstate the peak."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    try:  # the profiler's event list is semi-private: a torch that moves it gets n/a, with the reason logged
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
    except AttributeError as err:
        logger.warning("accel-eval: no CPU peak memory (torch's profiler events moved: %s)", err)
        return None
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def peak_memory_gb(pipe, spec) -> float | None:
    """Memory one timed batch allocates through torch at its peak, above what was allocated before it, measured in
    one more call, untimed (the CPU's measure slows the call down)."""
    from .generate import _batch, timed_batch

    prompts = spec.prompts[: timed_batch(pipe, spec)]
    call = lambda: _batch(pipe, prompts, list(range(len(prompts))), spec.call)  # noqa: E731
    if spec.device == "cpu":
        peak = _cpu_peak_bytes(call)
        return None if peak is None else peak / 1e9
    if not spec.device.startswith("cuda"):
        return None  # MPS: no peak counter
    device = torch.device(spec.device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 1e9


def real_figures(labels: list[int]) -> dict:
    """What real images score in the shapes generators' quality columns: the classifier's agreement with the labels of
    real images of the shapes data, one per sample's class, and their FID against the generators' reference set
    (another such set). A reference, not a bound: at a few hundred samples FID's own noise is of its size, and a good
    generator can score below another set of real images."""
    from . import metrics

    images = metrics.shapes_real_images(labels, seed_offset=1)
    try:
        fid = metrics.fid(images, metrics.shapes_real_images(labels), metrics.feature_extractor("shapes-var"))
    except metrics.Unavailable:  # too few samples: the generators' FID is left out too, with the reason
        fid = {}
    agreement = metrics.class_agreement(images, labels)
    return {"generator": "real images (reference)", "class_agreement": agreement["class_agreement"],
            "class_agreement_n": len(labels), **fid}


def _median_range(values: list[float], fmt: str, unit: str = "") -> str:
    text = fmt.format(statistics.median(values)) + unit
    return text if len(values) < 2 else f"{text} ({fmt.format(min(values))}-{fmt.format(max(values))})"


TABLE_METRICS = ("class_agreement", "fid", "kid")  # the quality columns (the others compare with a baseline)


def _row(name: str, results: dict, latencies: list[float], base: list[float], peak_gb: float | None) -> dict:
    row = results["rows"][0]
    return {"generator": name, "latency_s": latencies, "speedup": [b / x for b, x in zip(base, latencies)],
            "peak_memory_gb": peak_gb, **{k: row.get(k) for k in (*TABLE_METRICS, "class_agreement_n", "kid_std")}}


def _cells(row: dict) -> list[str]:
    """A generator's cells; the real images' row has no time, memory or KID ("-")."""
    timed, n = "latency_s" in row, row["class_agreement_n"]
    agreement = None if row["class_agreement"] is None else \
        f"{row['class_agreement']:.0%} ({round(row['class_agreement'] * n)}/{n})"
    peak = None if row.get("peak_memory_gb") is None else f"{row['peak_memory_gb'] * 1e3:.0f}"
    kid = None if row.get("kid") is None else f"{row['kid']:.4f} ± {row['kid_std']:.4f}"
    cells = [_median_range(row["latency_s"], "{:.3f}") if timed else "-",
             _median_range(row["speedup"], "{:.2f}", "x") if timed else "-", peak if timed else "-", agreement,
             None if row.get("fid") is None else f"{row['fid']:.2f}", kid if timed else "-"]
    return [row["generator"], *("n/a" if cell is None else cell for cell in cells)]


def comparison(named_results: dict[str, dict], timings: dict[str, dict], peaks: dict[str, float | None],
               real: dict | None = None) -> tuple[str, dict]:
    """The generators' table, the first the baseline: time per batch, speedup (the median of each timed round's
    paired ratio), peak memory, class agreement, FID, KID; then `real` (real_figures), the reference. `named_results`:
    each run's results (report.evaluate); `timings`: each run's timing.json, from the same interleaved rounds;
    `peaks`: each generator's peak_memory_gb."""
    names = list(named_results)
    base = timings[names[0]]["configs"]["baseline"]["latencies_s"]
    rows = [_row(name, named_results[name], timings[name]["configs"]["baseline"]["latencies_s"], base, peaks[name])
            for name in names]
    batch, environment = timings[names[0]]["timed_batch"], timings[names[0]]["environment"]
    lines = [f"| generator | s per batch of {batch} | speedup vs {names[0]} | peak MB | class agreement | FID | KID |",
             "|---|---|---|---|---|---|---|", *("| " + " | ".join(_cells(r)) + " |" for r in rows + [real] if r)]
    first = named_results[names[0]]
    summary = (f"Each generator: {first['counts']['samples']} samples ({first['counts']['prompts']} classes x "
               f"{first['counts']['seeds']} seeds); timing: {len(base)} rounds after a warm-up on "
               f"{environment.get('gpu') or environment['device']}, the generators interleaved, median (min-max); "
               "peak memory: what one batch allocates through torch at its peak, above what was allocated before "
               "it (one more call, untimed; CUDA: the allocator's peak counter, CPU: the profiler's allocation "
               "events).")
    omitted = {k: why for k, why in first["omitted"].items() if k in TABLE_METRICS}
    notes = [f"- {k}: left out: {why}" for k, why in omitted.items()]
    table = "\n".join([summary, "", *lines, "", "Notes:", *notes, f"- Rules: {SHAPES_REFERENCE_RULE}"])
    return table, {"generators": names, "rows": rows + ([real] if real else []), "timed_batch": batch,
                   "omitted": omitted}
