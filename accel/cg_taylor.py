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
import functools
import numbers
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook

from .diffusers_internals import BaseState, StateManager
from .models import Block, block_input, blocks_of
from .parallel import context_parallel_group, sequence_shard
from .steps import Step, StepClock
from .taylor import SERIES_FORMS, TaylorSeries
from .validation import check_int, check_real

CG_TAYLOR_HOOK = "accel_cg_taylor"
GATE = "gate"
FORECASTS = ("output", "residual")  # what the last block's series holds: its output, or output - the stack's input
_GATE_FIELDS = ("threshold", "max_consecutive_predicted")  # meaningful only while the gate decides
_FRACTION_FIELDS = ("spacing",)  # meaningful only with a schedule given as a fraction


def _check_schedule(schedule) -> "str | int | tuple[int, ...] | None":
    """The schedule as stored: None, "gate", an interval >= 1, or a sorted tuple of distinct step indices with 0."""
    if schedule is None or schedule == GATE:
        return schedule
    if isinstance(schedule, numbers.Integral) and not isinstance(schedule, bool):
        return check_int("CGTaylorConfig", "schedule", schedule, minimum=1)
    if isinstance(schedule, numbers.Real) and not isinstance(schedule, bool):
        if not 0 < schedule < 1:
            raise ValueError(f"CGTaylorConfig: a schedule given as a fraction of the steps must be in (0, 1), got "
                             f"{schedule!r} (an integer N is one step in N)")
        return float(schedule)
    if isinstance(schedule, (list, tuple)) and schedule:
        steps = [check_int("CGTaylorConfig", "schedule's step", s, minimum=0) for s in schedule]
        if len(set(steps)) != len(steps) or 0 not in steps:
            raise ValueError(f"CGTaylorConfig: a schedule of steps must hold distinct step indices including 0 (the "
                             f"first step has nothing to forecast from), got {schedule!r}")
        return tuple(sorted(steps))
    raise TypeError(f"CGTaylorConfig: schedule must be \"gate\", an integer N >= 1 (one step in N computed after "
                    f"warm-up), a fraction in (0, 1) of the steps to compute or a non-empty list of the step indices "
                    f"to compute, got {schedule!r}")


@dataclass(frozen=True)
class CGTaylorConfig:
    """threshold: gate on the relative error of block 0's forecast (0 never predicts).
    warmup_steps: steps always computed at the start of each model's run (the first step always is; Wan 2.2's second
        expert warms up on its own first steps).
    first_block_order / last_block_order: Taylor orders of the block-0 and last-block series.
    max_consecutive_predicted: cap on predicted steps in a row.
    series: "divided_differences" (ours: Newton divided differences, exact on polynomials of degree <= order) or
        "paper" (the released code's form: differences over the latest gap, summed as F(i) k^i / i!).
    schedule: "gate" (the gate decides); an integer N (no gate: after warm-up, one step in N is computed, the others
        predicted; the last step computed); a fraction in (0, 1) (no gate: that share of the run's steps computed, the
        warm-up and then spread up to the second-to-last step as `spacing` says: `fraction_steps`); or a list of step
        indices (no gate: exactly these steps are computed, and any step with nothing yet to forecast from).
        threshold and max_consecutive_predicted belong to the gate, and warmup_steps is not used by a list: setting
        them beside such a schedule is an error.
    forecast: what the last block's series holds: "output" (the last block's output) or "residual" (that output minus
        block 0's input, added back to the current step's input on a predicted step, as MagCache reuses it).
    damping: in [0, 1), how much the last block's forecast is pulled back from the Taylor extrapolation toward the
        last full value (0: the plain series; see `TaylorSeries`).
    spacing: > 0, with a fraction schedule: the j-th of the n steps computed after the warm-up sits (j / n) ** spacing
        of the way from the warm-up's last step to the second-to-last step: 1 spreads them evenly, above 1 packs them
        towards the start (where these models' features change fastest), below 1 towards the end.
    order_reach: > 0: the last block's terms of order 2 and above are used only while the predicted step lies within
        order_reach x the extent of the three newest full steps beyond the newest one (a curve fitted on close steps
        swings when carried far past them; see `TaylorSeries.terms`); None: always.
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
    schedule: "str | int | float | tuple[int, ...] | None" = None
    forecast: str | None = None
    damping: float | None = None
    order_reach: float | None = None
    spacing: float | None = None

    def __post_init__(self):
        if self.threshold is not None:
            check_real("CGTaylorConfig", "threshold", self.threshold, minimum=0)
        for name in ("warmup_steps", "first_block_order", "last_block_order", "max_consecutive_predicted"):
            if getattr(self, name) is not None:
                check_int("CGTaylorConfig", name, getattr(self, name), minimum=0)
        if self.damping is not None and check_real("CGTaylorConfig", "damping", self.damping, minimum=0) >= 1:
            raise ValueError(f"CGTaylorConfig: damping must be in [0, 1), got {self.damping!r}")
        for name in ("order_reach", "spacing"):
            value = getattr(self, name)
            if value is not None and check_real("CGTaylorConfig", name, value, minimum=0) == 0:
                raise ValueError(f"CGTaylorConfig: {name} must be > 0, got {value!r}")
        if self.forecast is not None and self.forecast not in FORECASTS:
            raise ValueError(f"CGTaylorConfig: forecast must be one of {list(FORECASTS)}, got {self.forecast!r}")
        if self.series is not None and self.series not in SERIES_FORMS:
            raise ValueError(f"CGTaylorConfig: series must be one of {list(SERIES_FORMS)}, got {self.series!r}")
        object.__setattr__(self, "schedule", _check_schedule(self.schedule))
        self._check_fields_fit_the_schedule()

    def _check_fields_fit_the_schedule(self) -> None:
        if self.schedule is None:
            return
        if self.schedule == GATE:
            if any(getattr(self, f) is not None for f in _FRACTION_FIELDS):
                raise ValueError("CGTaylorConfig: spacing would have no effect with schedule='gate' (only a fraction "
                                 "is spaced)")
            return
        unused = [f for f in _GATE_FIELDS if getattr(self, f) is not None]
        if isinstance(self.schedule, tuple) and self.warmup_steps is not None:
            unused.append("warmup_steps")
        if not isinstance(self.schedule, float):
            unused += [f for f in _FRACTION_FIELDS if getattr(self, f) is not None]
        if unused:
            raise ValueError(f"CGTaylorConfig: {', '.join(unused)} would have no effect with schedule="
                             f"{self.schedule!r} (a fixed schedule has no gate; a list of steps has no warm-up; only "
                             f"a fraction is spaced)")

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
        if not isinstance(merged["schedule"], float):  # the default's spacing says nothing about other schedules
            merged.update({f: given.get(f) for f in _FRACTION_FIELDS})
        return CGTaylorConfig(**merged)


# Ours, measured on the shipped models (8 prompts x 2 seeds, 20 steps;
# benchmarks/results/pareto_shapes_cpu_image_reach.md, pareto_shapes_cpu_video_residual.md). No gate beat the best fixed
# schedule (results/cg_taylor_gate_cpu.md; with this forecast, cg_taylor_gate_residual_cpu.md), so the default is a
# fixed schedule: 40% of the steps computed, the first 4 and then spread up to the second-to-last (below); the last
# block's series holds the stack's residual (its output minus block 0's input: a predicted step adds it to the step's
# own input, as MagCache does) and its forecast (order 1; on the DiT 2, below) is damped 0.7 toward the last full value
# (extrapolation over 3-4 step gaps overshoots these features). Against the previous default (one in 3 after 1 warm-up
# step, the output forecast undamped): shapes-image 28.9 against 27.4 dB at 40% computed; shapes-video (Wan; it reused
# the last output, one in 4 after 4) 30.7 against 29.0 dB at 40%. A warm-up of 3 is better on the DiT at 40% or less and
# worse above, and worse on Wan (results/pareto_shapes_cpu_warmup.md): both keep 4. On the DiT the forecast is of order
# 2 where the three newest full steps extend at least twice as far as the forecast reaches past them (order_reach=0.5),
# else of order 1: better than order 1 from 0.35 to 0.60 computed by 0.1-2.2 dB, on held-out seeds too, and level at
# 0.30 (results/pareto_shapes_cpu_image_order_reach.md); on Wan order 2 loses 1-2 dB. The steps after the warm-up are
# packed towards the start (spacing 1.25: the j-th of n at (j / n) ** 1.25 of the way), where the features change
# fastest: on the DiT +0.4 to +3.2 dB from 0.30 to 0.50 computed on held-out seeds too, -0.7 dB at 0.55-0.60; on Wan
# level at 0.30-0.35 and +0.3 to +1.4 dB from 0.40 to 0.60 (results/pareto_shapes_cpu_image_spacing.md). SANA-Video
# (shapes-long-video, chunk by chunk): Wan's forecast with a warm-up of 2, +0.8 to +5.6 dB over the previous default
# (the generic one below) at 0.30-0.40 and 0.60 on both seeds, level at 0.50; a warm-up of 4 is 0.5-1.4 dB better from
# 0.45 up and 0.7-2 dB worse below (results/pareto_shapes_cpu_long_video.md). Other families keep one in 3 after 2,
# order 1, the output: not measured.
DEFAULT_SCHEDULES: dict[str, dict] = {
    "dit": dict(schedule=0.4, warmup_steps=4, spacing=1.25, last_block_order=2, order_reach=0.5, forecast="residual",
                damping=0.7),
    "wan": dict(schedule=0.4, warmup_steps=4, spacing=1.25, last_block_order=1, forecast="residual", damping=0.7),
    "sana_video": dict(schedule=0.4, warmup_steps=2, spacing=1.25, last_block_order=1, forecast="residual",
                       damping=0.7),
}
_GENERIC_SCHEDULE = dict(schedule=3, warmup_steps=2, last_block_order=1)

# The gate's settings, used when a threshold (or cap, or schedule="gate") is given. Ours: warm-up 2 and at most 5
# predicted steps in a row, so fractions down to 0.25 are reachable at 20+ steps; DiT's and Wan's thresholds and
# orders re-tuned on the shipped models (the best gated points: DiT 0.04 -> 53% computed, 30.3 dB; Wan 0.1 -> 55%,
# 34.6 dB); FLUX's and the other families' thresholds and orders as before (not measured here).
_GENERIC = dict(forecast="output", damping=0.0, threshold=0.05, warmup_steps=2, first_block_order=1, last_block_order=1,
                max_consecutive_predicted=5, series="divided_differences", schedule=GATE)
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

    def __init__(self, series: type[TaylorSeries], first_order: int, last_order: int, damping: float):
        self.first = series(first_order)  # fed by the deciding branch of a gated run only
        self.last = series(last_order, damping)
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


def scheduled(schedule: "int | float | tuple[int, ...]", step: Step, start: int, warmup_steps: int | None,
              spacing: float | None = None) -> bool:
    """Whether a fixed schedule computes `step`: a listed step; (interval N) a warm-up step, every N-th step after
    the warm-up of this model's run (which began at `start`), and the last; (a fraction) one of `fraction_steps`."""
    if isinstance(schedule, tuple):
        return step.index in schedule
    if isinstance(schedule, float):
        if step.total is None:
            raise ValueError("cg_taylor: a schedule given as a fraction needs the number of steps: pass "
                             "num_inference_steps to accel.patch, or patch a pipeline")
        return step.index - start in fraction_steps(schedule, step.total - start, max(1, warmup_steps), spacing or 1.0)
    since_warmup = step.index - start - max(1, warmup_steps)
    return since_warmup < 0 or since_warmup % schedule == schedule - 1 or step.is_last


@functools.lru_cache(maxsize=64)
def fraction_steps(fraction: float, steps: int, warmup_steps: int, spacing: float = 1.0) -> frozenset[int]:
    """The steps (of `steps`) a fraction schedule computes: the first `warmup_steps`, then the rest of the budget,
    round(fraction * steps), after them up to the second-to-last step, the j-th of n at (j / n) ** spacing of the way
    (1: evenly; rounded, each at least one past the one before and leaving room for the ones after). The last step
    is predicted: it moves the sample least, and one more forecast from the second-to-last is cheap (shapes-image:
    computing step 18 instead of 19 of 20 is worth 1.1 dB at 40% computed)."""
    warmup = min(warmup_steps, steps)
    rest = min(max(0, int(fraction * steps + 0.5) - warmup), steps - warmup)
    end = steps - 2 if steps - 2 >= warmup else steps - 1
    span = end - (warmup - 1)
    spread, previous = set(), warmup - 1
    for j in range(1, rest + 1):
        at = warmup - 1 + int(span * j**spacing / rest**spacing + 0.5)
        previous = min(max(at, previous + 1), end - (rest - j))
        spread.add(previous)
    return frozenset(range(warmup)) | spread


class _Shared:
    """State common to the hooks of one model: the step clock, the config, the decisions per step."""

    def __init__(self, clock: StepClock, config: CGTaylorConfig, model: torch.nn.Module):
        self.clock, self.config = clock, config
        # Its parallel config is read at each gated step (enable_parallelism may come after the patch); weakly, so that
        # the hooks on its blocks do not keep the model alive.
        self.model = weakref.ref(getattr(model, "_orig_mod", model))  # torch.compile's wrapper: the module
        orders = (config.first_block_order, config.last_block_order)
        self.series = StateManager(_BranchSeries, (SERIES_FORMS[config.series], *orders, config.damping))
        self.decisions: dict[int, bool] = {}
        self.skipping = False  # the current call's decision, read by the middle blocks without a state lookup
        self.stack_input: torch.Tensor | None = None  # block 0's hidden-state input of the current call (residual)


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
        if self.shared.config.forecast == "residual":
            self.shared.stack_input = block_input(self.block, "hidden_states", args, kwargs)
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
                                                                                cfg.warmup_steps, cfg.spacing))
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
        self.shared.skipping, self.shared.stack_input = False, None
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
        stack_input, self.shared.stack_input = self.shared.stack_input, None  # held for this call only
        if state.skipping:
            forecast = state.last.predict(step.index, self.shared.config.order_reach)
            if stack_input is not None:
                forecast = forecast + self._local(stack_input, forecast)
            return _with_hidden(self.block, forecast, args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        hidden = _hidden(self.block, output)
        state.last.update(step.index, hidden if stack_input is None else hidden - self._local(stack_input, hidden))
        self.shared.clock.record_computed()
        return output


    def _local(self, stack_input: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Block 0's input as the last block's hidden states hold it: under context parallelism the hook may see the
        whole sequence before diffusers splits it, and the last block only this rank's share."""
        if stack_input.shape != like.shape:
            shard = sequence_shard(self.shared.model(), stack_input)
            if shard is None or shard.shape != like.shape:
                raise ValueError(f"cg_taylor forecast=\"residual\": the last block's hidden states {tuple(like.shape)} "
                                 f"are not shaped like block 0's input {tuple(stack_input.shape)}; use forecast=\"output\"")
            return shard
        return stack_input


def apply_cg_taylor(model: torch.nn.Module, config: CGTaylorConfig, clock: StepClock) -> None:
    blocks = blocks_of(model)
    if len(blocks) < 2:
        raise ValueError(f"cg_taylor needs at least 2 transformer blocks; {type(model).__name__} has {len(blocks)}")
    shared = _Shared(clock, config, model)
    roles = [CGTaylorHeadHook] + [CGTaylorMiddleHook] * (len(blocks) - 2) + [CGTaylorTailHook]
    for block, role in zip(blocks, roles):
        HookRegistry.check_if_exists_or_initialize(block.module).register_hook(role(shared, block), CG_TAYLOR_HOOK)
