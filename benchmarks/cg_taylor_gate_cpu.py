"""Does CG-Taylor's gate earn its cost? Gated schedules against fixed ones at equal computed fraction, on the shipped
shapes models (CPU, float32, 20 steps; PSNR / SSIM against the unaccelerated output of the same prompt and seed).

    python benchmarks/cg_taylor_gate_cpu.py [--models image,video] [--out benchmarks/results/cg_taylor_gate_cpu.json]

Configurations per model:
- fixed: `schedule=N` (no gate: after `warmup_steps`, one step in N computed, the last step computed) over warm-ups,
  intervals and last-block orders;
- gate "forecast": the paper's gate, the relative L1 error of block 0's Taylor forecast, at several block-0 / last-block
  orders (block-0 order 1 with a higher last-block order is the "low-order forecast for the gate" design), and with
  the paper's series form;
- gate "residual_change": the relative L1 change of block 0's residual (output - input) since the last full step
  (FirstBlockCache's indicator), the last block still forecast by its series;
- gate "accumulated_change": block 0's relative output change from step to step, summed since the last full step
  (TeaCache's accumulation, on block 0's output rather than a calibrated input).
Each gated configuration is compared with the fixed schedules computing no more steps: it "beats the fixed schedule"
only where its PSNR is above every such fixed schedule's. Samples run one at a time (a gate decides per sample), on
one thread; the two redesigned gates are benchmark-only subclasses of accel's head hook.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

import accel
from accel.cg_taylor import CG_TAYLOR_HOOK, CGTaylorHeadHook, gate_error
from accel.models import block_input, blocks_of
from accel.pipelines import reference_pipeline

STEPS = 20
SEEDS = (0, 1)
PROMPTS = {
    "image": ["a red circle", "a blue square", "a green triangle", "a yellow cross"],
    "video": ["a red circle moving left", "a blue square moving up", "a green cross moving right"],
}
PIPELINES = {"image": "shapes-image", "video": "shapes-video"}


class ResidualChangeHead(CGTaylorHeadHook):
    """Gate on the relative change of block 0's residual since the last full step (deciding branch only); block 0's
    input comes from a forward pre-hook (`install_gate`)."""

    def _enter(self, step, state, skip, hidden):
        super()._enter(step, state, skip, hidden)
        if not skip and step.decides and hidden is not None:
            self.full_residual = (hidden - self.block_input).detach()

    def _gate_signal(self, step, state, hidden):
        return gate_error(self.full_residual, hidden - self.block_input, step.cond_half)


class AccumulatedChangeHead(CGTaylorHeadHook):
    """Gate on block 0's step-to-step relative output change, summed since the last full step."""

    def _enter(self, step, state, skip, hidden):
        super()._enter(step, state, skip, hidden)
        if step.decides and hidden is not None:
            self.previous = hidden.detach().clone()
            if not skip:
                self.accumulated = 0.0

    def _gate_signal(self, step, state, hidden):
        self.accumulated += gate_error(self.previous, hidden, step.cond_half)
        return self.accumulated


GATE_HOOKS = {"forecast": CGTaylorHeadHook, "residual_change": ResidualChangeHead,
              "accumulated_change": AccumulatedChangeHead}


def fixed_configs(warmups, intervals, orders) -> list[dict]:
    return [dict(kind="fixed", gate=None, options=dict(schedule=n, warmup_steps=w, last_block_order=o))
            for w in warmups for n in intervals for o in orders]


def gated_configs(gate: str, thresholds, warmup: int, first_order: int, last_order: int, series: str) -> list[dict]:
    return [dict(kind="gated", gate=gate, options=dict(threshold=t, warmup_steps=warmup, first_block_order=first_order,
                                                      last_block_order=last_order, max_consecutive_predicted=5,
                                                      series=series))
            for t in thresholds]


def sweep(model: str) -> list[dict]:
    """The configurations measured (threshold ranges from probing one sample per model first)."""
    dd = "divided_differences"
    if model == "image":
        return (fixed_configs((1, 2, 3, 4), (2, 3, 4, 5, 6), (1, 2))
                + gated_configs("forecast", (0.01, 0.02, 0.04, 0.08, 0.16, 0.3), 2, 3, 1, dd)
                + gated_configs("forecast", (0.005, 0.01, 0.02, 0.04, 0.08, 0.2), 2, 1, 2, dd)
                + gated_configs("forecast", (0.01, 0.02, 0.04, 0.08, 0.16, 0.3), 2, 3, 1, "paper")
                + gated_configs("residual_change", (0.05, 0.1, 0.2, 0.3, 0.4, 0.7), 2, 1, 2, dd)
                + gated_configs("accumulated_change", (0.05, 0.1, 0.15, 0.2, 0.3, 0.5), 2, 1, 2, dd))
    return (fixed_configs((2, 4, 6), (2, 3, 4), (2,)) + fixed_configs((4,), (2, 3, 4), (1,))
            + gated_configs("forecast", (0.1, 0.2, 0.36), 2, 3, 1, dd)
            + gated_configs("forecast", (0.05, 0.1, 0.2), 2, 1, 2, dd)
            + gated_configs("residual_change", (0.1, 0.15, 0.25, 0.4), 2, 1, 2, dd)
            + gated_configs("accumulated_change", (0.1, 0.2, 0.3), 2, 1, 2, dd))


def generate(pipe, model: str, prompt: str, seed: int) -> np.ndarray:
    kwargs = dict(num_frames=17) if model == "video" else {}
    out = pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), output_type="np",
               **kwargs)
    pixels = out.frames if hasattr(out, "frames") else out.images
    return (np.asarray(pixels)[0] * 255).round().clip(0, 255).astype(np.uint8)


def _as_images(pixels: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(pixels).float() / 255
    return t.reshape(-1, *t.shape[-3:]).permute(0, 3, 1, 2)


def fidelity(sample: np.ndarray, baseline: np.ndarray) -> tuple[float, float]:
    x, y = _as_images(sample), _as_images(baseline)
    psnr = min(float(peak_signal_noise_ratio(x, y, data_range=1.0)), 100.0)  # identical outputs: 100 dB, not inf
    return psnr, float(structural_similarity_index_measure(x, y, data_range=1.0))


def install_gate(pipe, gate: str):
    """Turn the installed head hook into the gate under test (its bound forward stays accel's: only the gate methods
    change); returns the remover of the pre-hook that hands it block 0's input."""
    block = blocks_of(pipe.transformer)[0]
    head = block.module._diffusers_hook.get_hook(CG_TAYLOR_HOOK)
    head.__class__ = GATE_HOOKS[gate]

    def keep_input(module, args, kwargs):
        head.block_input = block_input(block, "hidden_states", args, kwargs)

    return block.module.register_forward_pre_hook(keep_input, with_kwargs=True).remove


def run_config(pipe, model: str, config: dict, baselines: dict) -> dict:
    handle = accel.patch(pipe, "cg_taylor", **config["options"])
    remove_gate = install_gate(pipe, config["gate"] or "forecast")
    psnrs, ssims, fractions, start = [], [], [], time.perf_counter()
    with handle:
        for key, baseline in baselines.items():
            psnr, ssim = fidelity(generate(pipe, model, *key), baseline)
            stats = handle.stats()
            psnrs.append(psnr), ssims.append(ssim), fractions.append(stats["computed"] / stats["steps"])
    remove_gate()
    return {**config, "computed_fraction": float(np.mean(fractions)), "fraction_min_max": [min(fractions), max(fractions)],
            "psnr_mean": float(np.mean(psnrs)), "psnr_std_over_samples": float(np.std(psnrs)), "psnr": psnrs,
            "ssim_mean": float(np.mean(ssims)), "seconds": time.perf_counter() - start}


def compare_with_fixed(rows: list[dict]) -> None:
    """For each gated row: the best fixed schedule computing no more steps, and whether the gated row beats it."""
    fixed = [r for r in rows if r["kind"] == "fixed"]
    for row in rows:
        if row["kind"] != "gated":
            continue
        peers = [f for f in fixed if f["computed_fraction"] <= row["computed_fraction"] + 1e-9]
        best = max(peers, key=lambda f: f["psnr_mean"], default=None)
        row["best_fixed_at_or_below"] = None if best is None else {
            "options": best["options"], "computed_fraction": best["computed_fraction"], "psnr_mean": best["psnr_mean"]}
        row["beats_fixed"] = best is None or row["psnr_mean"] > best["psnr_mean"]


def measure(model: str) -> dict:
    pipe = reference_pipeline(PIPELINES[model])
    pipe.set_progress_bar_config(disable=True)
    keys = [(p, s) for p in PROMPTS[model] for s in SEEDS]
    start = time.perf_counter()
    baselines = {key: generate(pipe, model, *key) for key in keys}
    baseline_seconds = time.perf_counter() - start
    rows = []
    for config in sweep(model):
        rows.append(run_config(pipe, model, config, baselines))
        print(model, config["gate"] or "fixed", config["options"], f"{rows[-1]['computed_fraction']:.3f}",
              f"{rows[-1]['psnr_mean']:.2f} dB", flush=True)
    compare_with_fixed(rows)
    return {"pipeline": PIPELINES[model], "prompts": PROMPTS[model], "seeds": list(SEEDS), "steps": STEPS,
            "baseline_seconds": baseline_seconds, "rows": rows}


def environment() -> dict:
    import diffusers

    return {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": sys.version.split()[0], "cpu": platform.processor() or platform.machine(), "threads": 1,
            "dtype": "float32", "command": " ".join(sys.argv)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="image,video")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cg_taylor_gate_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # comparable timings on a shared machine; quality does not depend on it
    results = {"env": environment(), "models": {m: measure(m) for m in args.models.split(",")}}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
