"""Confidence-gated Taylor caching (CG-Taylor, arXiv 2508.02240) as diffusers hooks on the transformer blocks.

Per step, in the deciding branch ("cond", or "default" without CFG contexts):
  block 0 runs for real; its output is also forecast by its own Taylor series; the gate error
  e = mean|forecast - actual| / mean|actual| decides. If e < threshold (and the step is past warm-up, not the
  first or last, and the run of predicted steps is under the cap), blocks 1..N-1 are skipped and the last
  block's output is the forecast of the last block's own Taylor series; norm_out and proj_out still run.
  Otherwise every block runs and both series take the new full step.
With a fixed schedule (`schedule=N` or a list of steps) there is no gate: the schedule decides and a predicted step
skips block 0 too.
The unconditional branch follows the conditional branch's decision and keeps its own last-block series; called
on its own (a pipeline running CFG as two calls a step) it skips block 0 on predicted steps, as the paper's released
Wan code does. With batched CFG only the conditional half of the batch feeds the gate.
Under diffusers' context parallelism each rank's blocks see a shard of the sequence: the gate's two norms are summed
over the context-parallel group, so every rank gates on the error of the whole sequence and takes the same decision.
"""

from __future__ import annotations

import dataclasses
import numbers
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook

from .diffusers_internals import BaseState, StateManager
from .models import Block, block_input, blocks_of
from .parallel import context_parallel_group
from .steps import Step, StepClock
from .taylor import SERIES_FORMS, TaylorSeries
from .validation import check_int, check_real

CG_TAYLOR_HOOK = "accel_cg_taylor"
GATE = "gate"
_GATE_FIELDS = ("threshold", "max_consecutive_predicted")  # meaningful only while the gate decides


def _check_schedule(schedule) -> "str | int | tuple[int, ...] | None":
    """The schedule as stored: None, "gate", an interval >= 1, or a sorted tuple of distinct step indices with 0."""
    if schedule is None or schedule == GATE:
        return schedule
    if isinstance(schedule, numbers.Integral) and not isinstance(schedule, bool):
        return check_int("CGTaylorConfig", "schedule", schedule, minimum=1)
    if isinstance(schedule, (list, tuple)) and schedule:
        steps = [check_int("CGTaylorConfig", "schedule's step", s, minimum=0) for s in schedule]
        if len(set(steps)) != len(steps) or 0 not in steps:
            raise ValueError(f"CGTaylorConfig: a schedule of steps must hold distinct step indices including 0 (the "
                             f"first step has nothing to forecast from), got {schedule!r}")
        return tuple(sorted(steps))
    raise TypeError(f"CGTaylorConfig: schedule must be \"gate\", an integer N >= 1 (one step in N computed after "
                    f"warm-up) or a non-empty list of the step indices to compute, got {schedule!r}")


@dataclass(frozen=True)
class CGTaylorConfig:
    """threshold: gate on the relative error of block 0's forecast (0 never predicts).
    warmup_steps: steps always computed at the start of each model's run (the first step always is; Wan 2.2's second
        expert warms up on its own first steps).
    first_block_order / last_block_order: Taylor orders of the block-0 and last-block series.
    max_consecutive_predicted: cap on predicted steps in a row.
    series: "divided_differences" (ours: Newton divided differences, exact on polynomials of degree <= order) or
        "paper" (the released code's form: differences over the latest gap, summed as F(i) k^i / i!).
    schedule: "gate" (the gate decides), an integer N (no gate: after warm-up, one step in N is computed, the others
        predicted; the last step computed) or a list of step indices (no gate: exactly these steps are computed, and
        any step with nothing yet to forecast from). threshold and max_consecutive_predicted belong to the gate, and
        warmup_steps is not used by a list: setting them beside such a schedule is an error.
    A field left None takes the value of the model family's defaults when the method is installed: its fixed
    schedule (DEFAULT_SCHEDULES), or, when the gate is asked for (schedule="gate", or a threshold or cap given
    without a schedule), its gate preset (PRESETS).
    """

    threshold: float | None = None
    warmup_steps: int | None = None
    first_block_order: int | None = None
    last_block_order: int | None = None
    max_consecutive_predicted: int | None = None
    series: str | None = None
    schedule: "str | int | tuple[int, ...] | None" = None

    def __post_init__(self):
        if self.threshold is not None:
            check_real("CGTaylorConfig", "threshold", self.threshold, minimum=0)
        for name in ("warmup_steps", "first_block_order", "last_block_order", "max_consecutive_predicted"):
            if getattr(self, name) is not None:
                check_int("CGTaylorConfig", name, getattr(self, name), minimum=0)
        if self.series is not None and self.series not in SERIES_FORMS:
            raise ValueError(f"CGTaylorConfig: series must be one of {list(SERIES_FORMS)}, got {self.series!r}")
        object.__setattr__(self, "schedule", _check_schedule(self.schedule))
        self._check_fields_fit_the_schedule()

    def _check_fields_fit_the_schedule(self) -> None:
        if self.schedule in (None, GATE):
            return
        unused = [f for f in _GATE_FIELDS if getattr(self, f) is not None]
        if isinstance(self.schedule, tuple) and self.warmup_steps is not None:
            unused.append("warmup_steps")
        if unused:
            raise ValueError(f"CGTaylorConfig: {', '.join(unused)} would have no effect with schedule="
                             f"{self.schedule!r} (a fixed schedule has no gate; a list of steps has no warm-up)")

    @property
    def gated(self) -> bool:
        return self.schedule == GATE

    def resolved(self, family: str) -> "CGTaylorConfig":
        """Every field this config's mode uses set: the fields left None from the preset of the model family."""
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if "schedule" not in given and any(f in given for f in _GATE_FIELDS):
            given["schedule"] = GATE
        gated = given.get("schedule") == GATE
        merged = {**dataclasses.asdict(PRESETS[family] if gated else default_config(family)), **given}
        if merged["schedule"] != GATE:  # the preset's gate settings say nothing about a fixed schedule
            merged.update({f: given.get(f) for f in _GATE_FIELDS})
            if isinstance(merged["schedule"], tuple):
                merged["warmup_steps"] = None
        return CGTaylorConfig(**merged)


# Ours, measured on the shipped models (benchmarks/cg_taylor_gate_cpu.py, results/cg_taylor_gate_cpu.json): no gate
# beat the best fixed schedule at computed fractions 0.25-0.45, and none by more than the sample spread above, so the
# default is a fixed schedule. DiT (shapes-image, 20 steps): one step in 3 after 1 warm-up step, last-block order 1,
# 40% computed, 29.6 dB (order 0 lost 0.2-2.3 dB there, order 2 up to 8). Wan (shapes-video): one in 3 after 4, 50%, with
# last-block order 0 (the last full output reused): 32.0 dB against 30.4 at order 1, and 29.0 against 25.8 at one in
# 4 (40%), where linear extrapolation over 3-step gaps overshoots (results/pareto_shapes_cpu_video_order0.md).
# Other families: one in 3 after 2, order 1, not measured.
DEFAULT_SCHEDULES: dict[str, dict] = {
    "dit": dict(schedule=3, warmup_steps=1, last_block_order=1),
    "wan": dict(schedule=3, warmup_steps=4, last_block_order=0),
}
_GENERIC_SCHEDULE = dict(schedule=3, warmup_steps=2, last_block_order=1)

# The gate's settings, used when a threshold (or cap, or schedule="gate") is given. Ours: warm-up 2 and at most 5
# predicted steps in a row, so fractions down to 0.25 are reachable at 20+ steps; DiT's and Wan's thresholds and
# orders re-tuned on the shipped models (the best gated points: DiT 0.04 -> 53% computed, 30.3 dB; Wan 0.1 -> 55%,
# 34.6 dB); FLUX's and the other families' thresholds and orders as before (not measured here).
_GENERIC = dict(threshold=0.05, warmup_steps=2, first_block_order=1, last_block_order=1, max_consecutive_predicted=5,
                series="divided_differences", schedule=GATE)
PRESETS: dict[str, CGTaylorConfig] = {
    "flux": CGTaylorConfig(**{**_GENERIC, "threshold": 0.03}),
    "wan": CGTaylorConfig(**{**_GENERIC, "threshold": 0.1, "first_block_order": 3}),
    "dit": CGTaylorConfig(**{**_GENERIC, "threshold": 0.04, "first_block_order": 3}),
    "sana": CGTaylorConfig(**_GENERIC),
    "sana_video": CGTaylorConfig(**_GENERIC),
    "pixart": CGTaylorConfig(**_GENERIC),
    "generic": CGTaylorConfig(**_GENERIC),
}
# For reference: the released settings of the paper (arXiv 2508.02240), for its series form (series="paper") and its
# gate; FLUX gates after 6 steps in the released code.
PAPER_SETTINGS: dict[str, dict] = {
    "flux": dict(threshold=0.03, warmup_steps=6, first_block_order=1, last_block_order=1, series="paper"),
    "wan": dict(threshold=0.36, warmup_steps=6, first_block_order=3, last_block_order=1, series="paper"),
    "dit": dict(threshold=0.008, first_block_order=3, last_block_order=1, series="paper"),
}


def default_config(family: str) -> CGTaylorConfig:
    """What `cg_taylor` runs with nothing given: the family's fixed schedule, the rest from its preset."""
    schedule = DEFAULT_SCHEDULES.get(family, _GENERIC_SCHEDULE)
    return CGTaylorConfig(**{**dataclasses.asdict(PRESETS[family]), **schedule, "threshold": None,
                             "max_consecutive_predicted": None})


class _BranchSeries(BaseState):
    """One branch's two Taylor series and where it stands."""

    def __init__(self, series: type[TaylorSeries], first_order: int, last_order: int):
        self.first = series(first_order)  # fed by the deciding branch of a gated run only
        self.last = series(last_order)
        self.skipping = False
        self.consecutive = 0
        self.start: int | None = None  # the first step this model ran in the generation (Wan 2.2's second expert)

    def reset(self) -> None:
        self.first.reset()
        self.last.reset()
        self.skipping, self.consecutive, self.start = False, 0, None


def _hidden(block: Block, output):
    return output[block.metadata.return_hidden_states_index] if isinstance(output, tuple) else output


def _with_hidden(block: Block, hidden: torch.Tensor, args: tuple, kwargs: dict):
    """The block's output as if it had returned `hidden` and left the text tokens as they came in."""
    enc_index = block.metadata.return_encoder_hidden_states_index
    if enc_index is None:
        return hidden
    out = [None, None]
    out[block.metadata.return_hidden_states_index] = hidden
    out[enc_index] = block_input(block, "encoder_hidden_states", args, kwargs)
    return tuple(out)


def _passed_through(block: Block, args: tuple, kwargs: dict):
    return _with_hidden(block, block_input(block, "hidden_states", args, kwargs), args, kwargs)


def _cond_slice(x: torch.Tensor, cond_half: str | None) -> torch.Tensor:
    half = x.shape[0] // 2
    return {"first": x[:half], "last": x[half:]}.get(cond_half, x)


def gate_error(forecast: torch.Tensor, actual: torch.Tensor, cond_half: str | None = None,
               group: dist.ProcessGroup | None = None) -> float:
    """mean|forecast - actual| / mean|actual| (as a ratio of L1 norms: fewer kernels), accumulated in the wider of
    the two dtypes and float32. With `group` (each rank holding a shard of the tokens) both norms are first summed
    over the group: every rank gets the same value, the error of the whole sequence."""
    forecast, actual = _cond_slice(forecast, cond_half).detach(), _cond_slice(actual, cond_half).detach()
    difference = forecast - actual  # in the wider of the two dtypes (a float64 forecast of a float32 feature)
    dtype = torch.promote_types(difference.dtype, torch.float32)
    norms = torch.stack([torch.linalg.vector_norm(x, ord=1, dtype=dtype) for x in (difference, actual)])
    if group is not None:
        # One collective, issued on the device like the norms: no host sync before the one below. An all-reduce
        # hands every rank the same sums, so the ratio, and the decision, is the same on every rank.
        dist.all_reduce(norms, group=group)
    num, den = norms
    return float(num / den.clamp_min(torch.finfo(dtype).tiny))  # the one host sync per step


def scheduled(schedule: "int | tuple[int, ...]", step: Step, start: int, warmup_steps: int | None) -> bool:
    """Whether a fixed schedule computes `step`: a listed step, or (interval N) a warm-up step, every N-th step after
    the warm-up of this model's run (which began at `start`), and the last."""
    if isinstance(schedule, tuple):
        return step.index in schedule
    since_warmup = step.index - start - max(1, warmup_steps)
    return since_warmup < 0 or since_warmup % schedule == schedule - 1 or step.is_last


class _Shared:
    """State common to the hooks of one model: the step clock, the config, the decisions per step."""

    def __init__(self, clock: StepClock, config: CGTaylorConfig, model: torch.nn.Module):
        self.clock, self.config = clock, config
        # Its parallel config is read at each gated step (enable_parallelism may come after the patch); weakly, so that
        # the hooks on its blocks do not keep the model alive.
        self.model = weakref.ref(getattr(model, "_orig_mod", model))  # torch.compile's wrapper: the module
        orders = (config.first_block_order, config.last_block_order)
        self.series = StateManager(_BranchSeries, (SERIES_FORMS[config.series], *orders))
        self.decisions: dict[int, bool] = {}
        self.skipping = False  # the current call's decision, read by the middle blocks without a state lookup


class CGTaylorHeadHook(ModelHook):
    """Block 0: decides whether the rest of the stack runs. It runs itself unless the decision is known without it
    (a fixed schedule; the unconditional branch following the conditional one), as the step is then predicted."""

    _is_stateful = True

    def __init__(self, shared: _Shared, block: Block):
        super().__init__()
        self.shared, self.block = shared, block
        self.series = shared.series  # diffusers sets the cache context on StateManager attributes

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.series.get_state()
        step = self.shared.clock.current
        skip = self._decide(step, state, None)
        if skip:
            self._enter(step, state, True, None)
            return _passed_through(self.block, args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        hidden = _hidden(self.block, output)
        self._enter(step, state, self._decide(step, state, hidden) if skip is None else False, hidden)
        return output

    def _enter(self, step: Step, state: _BranchSeries, skip: bool, hidden: torch.Tensor | None) -> None:
        state.skipping = self.shared.skipping = skip
        state.consecutive = state.consecutive + 1 if skip else 0
        if not skip and step.decides and self.shared.config.gated:
            state.first.update(step.index, hidden)

    @torch.compiler.disable
    def _decide(self, step: Step, state: _BranchSeries, hidden: torch.Tensor | None) -> bool | None:
        """Whether this call is predicted; None while only block 0's output (`hidden`, not yet run) can tell."""
        if not step.decides:
            return self.shared.decisions.get(step.index, False) and state.last.ready
        cfg = self.shared.config
        state.start = step.index if state.start is None else state.start
        if not cfg.gated:
            # A fixed schedule depends on the step index and on the series' readiness only, the same on every rank
            # of a context-parallel group: no communication.
            return self._settle(step, None, state.last.ready and not scheduled(cfg.schedule, step, state.start,
                                                                                cfg.warmup_steps))
        eligible = (
            step.index - state.start >= max(1, cfg.warmup_steps)  # each expert warms up on its own first steps
            and not step.is_last
            and state.consecutive < cfg.max_consecutive_predicted
            and state.first.ready
            and state.last.ready
        )
        if not eligible:
            return self._settle(step, None, False)
        if hidden is None:
            return None
        error = self._gate_signal(step, state, hidden)
        return self._settle(step, error, error < cfg.threshold)

    def _gate_signal(self, step: Step, state: _BranchSeries, hidden: torch.Tensor) -> float:
        """What the threshold is compared with: the relative error of block 0's forecast."""
        return gate_error(state.first.predict(step.index), hidden, step.cond_half,
                          context_parallel_group(self.shared.model()))

    def _settle(self, step: Step, error: float | None, skip: bool) -> bool:
        self.shared.decisions[step.index] = skip
        self.shared.clock.record_gate(error, skip)
        return skip

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.series.reset()
        self.shared.decisions.clear()
        self.shared.skipping = False
        return module


class CGTaylorMiddleHook(ModelHook):
    """Blocks 1..N-2: skipped (inputs passed through) on a predicted step."""

    def __init__(self, shared: _Shared, block: Block):
        super().__init__()
        self.shared, self.block = shared, block

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.shared.skipping:
            return _passed_through(self.block, args, kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)


class CGTaylorTailHook(ModelHook):
    """Last block: forecast by its Taylor series on a predicted step, else computed and recorded."""

    def __init__(self, shared: _Shared, block: Block):
        super().__init__()
        self.shared, self.block = shared, block

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.shared.series.get_state()
        step = self.shared.clock.current
        if state.skipping:
            return _with_hidden(self.block, state.last.predict(step.index), args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        state.last.update(step.index, _hidden(self.block, output))
        self.shared.clock.record_computed()
        return output


def apply_cg_taylor(model: torch.nn.Module, config: CGTaylorConfig, clock: StepClock) -> None:
    blocks = blocks_of(model)
    if len(blocks) < 2:
        raise ValueError(f"cg_taylor needs at least 2 transformer blocks; {type(model).__name__} has {len(blocks)}")
    shared = _Shared(clock, config, model)
    roles = [CGTaylorHeadHook] + [CGTaylorMiddleHook] * (len(blocks) - 2) + [CGTaylorTailHook]
    for block, role in zip(blocks, roles):
        HookRegistry.check_if_exists_or_initialize(block.module).register_hook(role(shared, block), CG_TAYLOR_HOOK)
