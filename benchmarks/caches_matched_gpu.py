"""Every caching method at a matched fraction of steps computed, on Wan 2.1 1.3B and FLUX.1-dev shapes: wall-clock
and peak memory per generation, side by side, each against the baseline measured in the same run.

    python benchmarks/caches_matched_gpu.py [--models wan,flux] [--targets 0.4,0.6] [--wan-frames 33]
        [--deadline 400] [--out benchmarks/results/caches_matched_<gpu>.json]
    python benchmarks/caches_matched_gpu.py --tiny --out /tmp/caches_tiny.json   # CPU, tiny configs, < 1 min

Models: random-init bf16 transformers with the real shapes (`cg_taylor_gpu.build`), each driven as a bare transformer
by a flow-matching Euler loop (sigmas 1 -> 0, shift 3) over random latents and random text embeddings (512 tokens),
one call a step in `cache_context("cond", step_index=, num_inference_steps=, sigma=)`:
- Wan 2.1 1.3B, 480p (832 x 480), 33 frames by default: 9 x 30 x 52 = 14,040 tokens, 20 steps. `--wan-frames 81` is
  the full clip (32,760 tokens, about 0.6 s a step, about 2.5x the time: not within one 10-minute call beside FLUX).
  Classifier-free guidance off (Wan runs it as a second call a step; left out to bound the time).
- FLUX.1-dev, 1024 px: 4096 image + 512 text tokens, 28 steps, guidance embedding 3.5 (guidance-distilled: no CFG).
About 7 minutes on one H100 with the defaults (Wan about 3, FLUX about 4); `--deadline` skips the generations that
would start later, and the JSON (written after each model) says which.

Per method and target fraction: the method's one knob set so that the steps it computes (`handle.stats()`) come
closest to the target (within one step counts as met). CG-Taylor takes the target itself (`schedule=<fraction>`, its
default mode; the rest of its settings the family's defaults). Interval knobs (TaylorSeer's `cache_interval`, PAB's
and FasterCache's `spatial_attention_block_skip_range`) by trying integers on a latent of a few tokens (their counts
do not depend on the data); thresholds (FirstBlockCache, MagCache, CG-Taylor's gate, SeaCache) by a bracketing search,
one full generation a try, from the method's default. Other settings are the defaults, except: PAB may skip over the
whole run and FasterCache from step 2 on (diffusers' timestep ranges (100, 800) and (-1, 681) leave too many steps
computed for 0.4); FasterCache without its guidance branch (`is_guidance_distilled`); MagCache with diffusers' FLUX
ratios, Wan's measured by `accel.calibrate_mag_ratios` in one generation. For PAB and FasterCache a "computed" step is
one in which the last hooked attention layer ran: the rest of every block runs on every step.

Per configuration: one warm-up generation, then `--runs` timed ones, the device synchronised around each: seconds per
generation, steps computed / predicted, peak memory allocated during a generation above what was allocated before the
method was installed (so its cached state counts), the speedup over the baseline, and the relative L2 distance of the
final latent to the baseline's. A method that `accel.patch` refuses or that fails on the model is recorded with its
error; one that computes every step at every knob tried (SeaCache without an adapter for the model) likewise.

Random weights measure cost, not quality: thresholds are searched to match the fraction computed only, and the distance
to the baseline is a sanity check (0: nothing was skipped), not a quality figure.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, NamedTuple

import torch

import accel

STEPS = {"wan": 20, "flux": 28}
SHIFT = 3.0  # Wan's flow shift at 480p; FLUX's dynamic shift at 1024 px is about 3.2
WHOLE_RUN = (-1.0, 1001.0)  # a timestep range (pipeline scale, 0-1000) holding every step


class Deadline(Exception):
    """Raised before a generation that would start after `--deadline`."""


class Timestep:
    """The current timestep on the pipeline's scale (0-1000), for PAB's and FasterCache's callback, as a pipeline's
    `current_timestep`. A small object of its own: `handle.stats()` deep-copies the config, callback included, and a
    bound method of Bench would copy the model with it (24 GB a call on FLUX: the H100 ran out of memory)."""

    t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Bench:
    name: str
    model: torch.nn.Module
    inputs: dict
    probe: dict  # the inputs with a latent of a few tokens: a cheap run for counts that do not depend on the data
    steps: int
    device: str
    deadline: float
    timestep: Timestep = field(default_factory=Timestep)
    generations: int = 0

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @cached_property
    def mag_ratios(self) -> list[float] | None:
        # diffusers ships FLUX's ratios (accel fills them in); other models measure theirs in one generation.
        return None if self.name == "flux" else accel.calibrate_mag_ratios(self.model, generate, self)


def sigmas(steps: int) -> list[float]:
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (SHIFT * s / (1 + (SHIFT - 1) * s)).tolist()


def generate(b: Bench, inputs: dict | None = None) -> torch.Tensor:
    """One generation: Euler steps of the flow x' = v from the noise in the inputs (b.inputs); the final latent."""
    if time.perf_counter() > b.deadline:
        raise Deadline
    b.generations += 1
    inputs = inputs or b.inputs
    lat, sig = inputs["hidden_states"], sigmas(b.steps)
    scale = 1e-3 if b.name == "flux" else 1.0  # FluxPipeline passes t / 1000
    with torch.no_grad():
        for i in range(b.steps):
            b.timestep.t = 1000 * sig[i]
            t = torch.full((lat.shape[0],), b.timestep.t * scale, device=b.device)
            with b.model.cache_context("cond", step_index=i, num_inference_steps=b.steps, sigma=sig[i]):
                v = b.model(**{**inputs, "hidden_states": lat}, timestep=t, return_dict=False)[0]
            lat = lat + (sig[i + 1] - sig[i]) * v
    return lat


def probe_inputs(name: str, inputs: dict) -> dict:
    """The first latent frame's top-left 4 x 4 (Wan) or the first 16 image tokens (FLUX), the text unchanged."""
    h = inputs["hidden_states"]
    if name == "wan":
        return {**inputs, "hidden_states": h[:, :, :1, :4, :4].clone()}
    return {**inputs, "hidden_states": h[:, :16].clone(), "img_ids": inputs["img_ids"][:16]}


INTERVAL, THRESHOLD, FRACTION = "interval", "threshold", "fraction"


class Method(NamedTuple):
    kind: str  # INTERVAL: an integer from 2 up, the same counts on any input; THRESHOLD: a real, searched in log scale;
    # FRACTION: the target fraction itself (nothing to search)
    knob: str  # the config field searched
    start: float | None  # a threshold's first try: diffusers' (or accel's preset) default
    make: Callable  # (knob value, Bench) -> config


def _faster_cache(n: int, b: Bench):
    # It extrapolates from two computed attention outputs: steps 0 and 1 lie outside its timestep range.
    return accel.FasterCacheConfig(
        spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(-1.0, 1000 * sigmas(b.steps)[1]),
        is_guidance_distilled=True, current_timestep_callback=b.timestep)


# In the order they run: a deadline cuts the last ones.
METHODS: dict[str, Method] = {
    "cg_taylor": Method(FRACTION, "schedule", None, lambda f, b: accel.CGTaylorConfig(schedule=f)),
    "first_block_cache": Method(THRESHOLD, "threshold", 0.05, lambda x, b: accel.FirstBlockCacheConfig(threshold=x)),
    "taylorseer": Method(INTERVAL, "cache_interval", None, lambda n, b: accel.TaylorSeerCacheConfig(cache_interval=n)),
    "mag_cache": Method(THRESHOLD, "threshold", 0.06,
                        lambda x, b: accel.MagCacheConfig(threshold=x, mag_ratios=b.mag_ratios)),
    "pyramid_attention_broadcast": Method(
        INTERVAL, "spatial_attention_block_skip_range", None, lambda n, b: accel.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=WHOLE_RUN,
            current_timestep_callback=b.timestep)),
    "faster_cache": Method(INTERVAL, "spatial_attention_block_skip_range", None, _faster_cache),
    "cg_taylor_gate": Method(THRESHOLD, "threshold", 0.05, lambda x, b: accel.CGTaylorConfig(threshold=x)),
    "sea_cache": Method(THRESHOLD, "threshold", 0.25, lambda x, b: accel.SeaCacheConfig(threshold=x)),
}


def patched(b: Bench, config):
    return accel.patch(b.model, config, num_inference_steps=b.steps) if config is not None else nullcontext()


def release(b: Bench) -> None:
    """Free on the GPU whatever a configuration left behind before the next one is measured (`handle.remove()`
    resets the hooks' state; a collection catches anything else in reference cycles). GPU only: nothing is
    measured on the CPU, and a full collection takes a while."""
    if b.cuda:
        gc.collect()
        torch.cuda.empty_cache()


def computed_steps(b: Bench, config, inputs: dict) -> int:
    with patched(b, config) as handle:
        generate(b, inputs)
        return handle.stats()["computed"]


def next_knob(kind: str, bounds: tuple, tried: dict, wanted: list[int], first: float):
    """The next knob value to try, for the count missed by most so far (by more than one step: close enough, and
    the budget of tries goes further): inside the bracket of the closest tries on either side of it (a threshold
    interpolated on a log scale), else one step beyond the tries that all compute too much (or too little), within
    `bounds`; None when no try can get closer."""
    if not tried:
        return first
    misses = {w: min(abs(c - w) for c in tried.values()) for w in wanted}
    for count in sorted((w for w in wanted if misses[w] > 1), key=lambda w: -misses[w]):
        low = max((k for k, c in tried.items() if c > count), default=None)  # computes too much: knob too low
        high = min((k for k, c in tried.items() if c < count), default=None)
        if low is not None and high is not None:
            if kind == INTERVAL:
                knob = (low + high) // 2
            else:  # kept off the bracket's ends so that it shrinks
                w = min(max((tried[low] - count) / (tried[low] - tried[high]), 0.2), 0.8)
                knob = low * (high / low) ** w
            if knob in (low, high) or (kind == THRESHOLD and high / low < 1.05):
                continue
        elif low is not None:
            knob = low + 1 if kind == INTERVAL else low * 10
        else:
            knob = high - 1 if kind == INTERVAL else high / 10
        if bounds[0] <= knob <= bounds[1] and knob not in tried:
            return knob
    return None


def search(b: Bench, method: str, targets: list[float], trials: int) -> tuple[dict, dict]:
    """Knob value per target fraction, and every try (knob -> steps computed)."""
    kind, _, start, make = METHODS[method]
    if kind == FRACTION:
        return {f: f for f in targets}, {f: computed_steps(b, make(f, b), b.probe) for f in targets}
    wanted = [round(f * b.steps) for f in targets]
    if kind == INTERVAL:
        first, bounds, inputs = max(2, round(1 / targets[0])), (2, b.steps), b.probe
    else:  # up to 30 times the default: every method here then skips about whatever its caps allow
        first, bounds, inputs = start, (start * 1e-4, start * 30), b.inputs
    tried: dict = {}
    for _ in range(trials):
        knob = next_knob(kind, bounds, tried, wanted, first)
        if knob is None:
            break
        tried[knob] = computed_steps(b, make(knob, b), inputs)
    # Closest count; on a tie the larger knob, i.e. the fewer steps computed.
    best = {f: min(tried, key=lambda k: (abs(tried[k] - w), -k)) for f, w in zip(targets, wanted)}
    return best, tried


def sync(b: Bench) -> None:
    if b.cuda:
        torch.cuda.synchronize()


def measure(b: Bench, config, runs: int, reference: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """One warm-up generation, then `runs` timed ones; peak memory counted above what was allocated before the patch,
    so a method's cached state counts."""
    release(b)
    base = torch.cuda.memory_allocated() if b.cuda else 0
    seconds, peaks = [], []
    with patched(b, config) as handle:
        generate(b)
        for _ in range(runs):
            if b.cuda:
                torch.cuda.reset_peak_memory_stats()
            sync(b)
            start = time.perf_counter()
            lat = generate(b)
            sync(b)
            seconds.append(time.perf_counter() - start)
            peaks.append(torch.cuda.max_memory_allocated() - base if b.cuda else None)
        stats = handle.stats() if handle else {"computed": b.steps, "predicted": 0}
    out = {"seconds": seconds, "mean_s": sum(seconds) / runs, "computed": stats["computed"],
           "predicted": stats["predicted"], "fraction": stats["computed"] / b.steps,
           "peak_MB": max(peaks) / 2**20 if b.cuda else None}
    if reference is not None:
        out["rel_l2_vs_baseline"] = float((lat.float() - reference.float()).norm() / reference.float().norm())
    return out, lat


def run_method(b: Bench, method: str, targets: list[float], args, baseline: dict, reference: torch.Tensor) -> dict:
    out = {"knob": METHODS[method].knob}
    try:
        best, tried = search(b, method, targets, args.search_trials)
        out["tried"] = {str(k): c for k, c in tried.items()}
        if all(c == b.steps for c in tried.values()):  # SeaCache runs "fail-open" on models it has no adapter for
            raise ValueError(f"computed every step at every knob tried ({out['tried']}): it does not engage here")
        for f in targets:
            r, _ = measure(b, METHODS[method].make(best[f], b), args.runs, reference)
            out[str(f)] = {"knob": best[f], **r, "speedup": baseline["mean_s"] / r["mean_s"]}
            print(row(method, f, out[str(f)], b.steps), flush=True)
    except Deadline:
        out["skipped"] = "deadline"
    except Exception as err:  # a method that does not apply to this model: its message is the result
        out["error"] = f"{type(err).__name__}: {err}"
        print(f"  {method}: {out['error']}", flush=True)
    return out


def row(method: str, target: float | None, r: dict, steps: int) -> str:
    peak = "-" if r["peak_MB"] is None else f"{r['peak_MB']:.0f}"
    knob = "" if target is None else f"{r['knob']:.4g}"
    return (f"  {method:28s} {'' if target is None else f'{target:.2f}':>6} {knob:>10} "
            f"{r['computed']:>3}/{steps:<3} {r['mean_s']:8.3f} {r.get('speedup', 1.0):6.2f} {peak:>9} "
            f"{r.get('rel_l2_vs_baseline', 0.0):9.3g}")


def table(res: dict) -> str:
    """The results side by side, by target: method, target, knob, computed, s / generation, speedup, peak MB, rel L2."""
    lines = [f"  {'method':28s} {'target':>6} {'knob':>10} {'computed':>7} {'s/gen':>8} {'speedup':>6} "
             f"{'peak MB':>9} {'rel L2':>9}", row("baseline", None, res["baseline"], res["steps"])]
    for f in res["targets"]:
        lines += [row(m, f, r[str(f)], res["steps"]) for m, r in res["methods"].items() if str(f) in r]
    lines += [f"  {m}: {r.get('error') or 'skipped: ' + r['skipped']}" for m, r in res["methods"].items()
              if "error" in r or "skipped" in r]
    return "\n".join(lines)


def build_tiny(name: str):
    """Tiny random-init configs of the same classes (tests/tiny_models.py's), on the CPU in fp32."""
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    torch.manual_seed(0)
    if name == "wan":
        m = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        return m.eval(), {"hidden_states": torch.randn(1, 4, 2, 8, 8), "encoder_hidden_states": torch.randn(1, 6, 16)}
    m = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return m.eval(), {"hidden_states": torch.randn(1, 16, 4), "encoder_hidden_states": torch.randn(1, 5, 32),
                      "pooled_projections": torch.randn(1, 32), "img_ids": ids.reshape(-1, 3),
                      "txt_ids": torch.zeros(5, 3)}


def build_real(name: str, wan_frames: int):
    from cg_taylor_gpu import build  # beside this script

    model, inputs, _, _ = build(name)
    if name == "wan":  # 480p: 60 x 104 latents; one latent frame for the first frame, then one per 4
        frames = (wan_frames - 1) // 4 + 1
        inputs["hidden_states"] = torch.randn(1, 16, frames, 60, 104, device="cuda", dtype=torch.bfloat16)
    return model, inputs


def bench_model(name: str, args, deadline: float) -> dict:
    if time.perf_counter() > deadline:
        return {"skipped": "deadline"}
    model, inputs = build_tiny(name) if args.tiny else build_real(name, args.wan_frames)
    b = Bench(name, model, inputs, probe_inputs(name, inputs), STEPS[name], "cpu" if args.tiny else "cuda", deadline)
    release(b)
    res = {"steps": b.steps, "latent_shape": list(inputs["hidden_states"].shape),
           "targets": [float(f) for f in args.targets.split(",")],
           "allocated_MB": torch.cuda.memory_allocated() / 2**20 if b.cuda else None}  # weights and inputs
    print(name, "latent", res["latent_shape"], "allocated MB", res["allocated_MB"], flush=True)
    try:
        res["baseline"], reference = measure(b, None, args.runs, None)
    except Deadline:
        return {**res, "skipped": "deadline"}
    res["methods"] = {m: run_method(b, m, res["targets"], args, res["baseline"], reference)
                      for m in args.methods.split(",")}
    if "mag_ratios" in vars(b):  # measured (Wan) when mag_cache ran
        res["mag_ratios"] = b.mag_ratios
    res["generations"] = b.generations
    print(table(res), flush=True)
    return res


def environment(tiny: bool) -> dict:
    import diffusers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # the CPU check needs no Triton
        triton_version = None
    return {"gpu": "cpu (tiny)" if tiny else torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton_version, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "dtype": "float32" if tiny else "bfloat16"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="wan,flux")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--targets", default="0.4,0.6", help="fractions of steps computed")
    p.add_argument("--wan-frames", type=int, default=33, help="video frames at 480p (4k+1)")
    p.add_argument("--runs", type=int, default=2, help="timed generations per configuration")
    p.add_argument("--search-trials", type=int, default=7, help="generations at most per method to pick its knob")
    p.add_argument("--deadline", type=float, default=400, help="seconds from start; later generations are skipped")
    p.add_argument("--tiny", action="store_true", help="tiny random configs on the CPU: checks the script")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.tiny:
        torch.set_num_threads(1)  # tiny ops: threads only contend (10x slower on 2 shared cores)
    start = time.perf_counter()
    deadline = start + args.deadline
    res = {"env": environment(args.tiny), "args": vars(args), "models": {}}
    tag = "tiny" if args.tiny else res["env"]["gpu"].split()[1].lower()  # "NVIDIA H100 80GB HBM3" -> h100
    out = args.out or f"benchmarks/results/caches_matched_{tag}.json"
    for name in args.models.split(","):
        res["models"][name] = bench_model(name, args, deadline)
        res["wall_s"] = time.perf_counter() - start
        gc.collect()  # the model goes before the next one is built
        if not args.tiny:
            torch.cuda.empty_cache()
            print("allocated MB after", name, torch.cuda.memory_allocated() / 2**20, flush=True)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(out + ".tmp", out)
    print(f"wrote {out} after {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
