"""Where the denoising loop is: one hook on the transformer that every cache method shares.

Each transformer call is one step of one branch ("cond", "uncond", or "default" when the pipeline sets no
cache context, as DiT, PixArt and SANA pipelines don't). The hook
- gives pipelines that set no cache context a "default" one, so diffusers' stateful caches work there too;
- numbers the steps of each branch and knows the step count (from the cache context, the pipeline's
  scheduler, or the user), so "first", "last" and "warm-up" mean something;
- notices a new generation (step index back at 0, a new scheduler run, another input shape, the step count
  reached, or, for a bare transformer with nothing else to go by, the timestep rising) and then resets every
  stateful hook under the model, including diffusers' own caches, so a second call with another step count,
  resolution or batch size never reuses stale state;
- keeps the statistics of the last generation for `handle.stats()`, and step counts over every generation since the
  handle's last reset for `handle.totals()` (a long video is one generation per chunk).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .diffusers_internals import BaseState, CacheContext, StateManager, set_cache_context

logger = logging.getLogger("accel")

STEP_HOOK = "accel_step_hook"
FOLLOWER_CONTEXTS = ("uncond",)  # branches that reuse the conditional branch's decisions


@dataclass(frozen=True)
class Step:
    context: str
    index: int
    total: int | None
    cond_half: str | None  # batched CFG: "first" / "last" half of the batch is the conditional branch

    @property
    def decides(self) -> bool:
        return self.context not in FOLLOWER_CONTEXTS

    @property
    def is_last(self) -> bool:
        return self.total is not None and self.index >= self.total - 1


@dataclass
class RunStats:
    """What happened in the last generation, per branch."""

    steps: dict[str, int] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)
    gate_errors: dict[str, list] = field(default_factory=dict)
    predicted_steps: dict[str, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        main = _main_context(self.steps)
        if main is None:
            return {"steps": 0, "computed": 0, "predicted": 0, "gate_errors": [], "predicted_steps": []}
        steps, computed = self.steps[main], self.computed.get(main, 0)
        return {
            "context": main,
            "steps": steps,
            "computed": computed,
            "predicted": steps - computed,
            "gate_errors": list(self.gate_errors.get(main, [])),
            "predicted_steps": list(self.predicted_steps.get(main, [])),
            "per_context": {c: {"steps": n, "computed": self.computed.get(c, 0)} for c, n in self.steps.items()},
        }


@dataclass
class StepTotals:
    """Step counts over every generation since the last reset, per branch."""

    generations: int = 0
    steps: dict[str, int] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        main = _main_context(self.steps)
        steps, computed = self.steps.get(main, 0), self.computed.get(main, 0)
        return {"context": main, "generations": self.generations, "steps": steps, "computed": computed,
                "predicted": steps - computed,
                "per_context": {c: {"steps": n, "computed": self.computed.get(c, 0)} for c, n in self.steps.items()}}


def _main_context(steps: dict[str, int]) -> str | None:
    """The branch whose counts speak for a run: the first that makes its own decisions."""
    return next((c for c in steps if c not in FOLLOWER_CONTEXTS), next(iter(steps), None))


class Schedule:
    """What the pipeline's scheduler says about the current run; nothing for a bare transformer."""

    def __init__(self, pipeline=None, num_inference_steps: int | None = None):
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._num_inference_steps = num_inference_steps

    def _scheduler(self):
        return getattr(self._pipeline(), "scheduler", None) if self._pipeline is not None else None

    def total_steps(self) -> int | None:
        """Transformer calls per branch in this run: the scheduler's timesteps from its begin index."""
        timesteps = getattr(self._scheduler(), "timesteps", None)
        if timesteps is None:
            return self._num_inference_steps
        return len(timesteps) - (getattr(self._scheduler(), "begin_index", None) or 0)

    def marker(self):
        """The scheduler's timesteps tensor: every pipeline call sets a new one, which marks a new generation
        without reading anything back from the device."""
        return getattr(self._scheduler(), "timesteps", None)


class StepClock:
    """Shared by the step hook (which sets `current`) and the cache hooks (which read it and report back)."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.current: Step | None = None
        self.stats = RunStats()
        self.totals = StepTotals()
        self.in_generation = False
        # diffusers' caches report nothing: a step in which the observed module did not run was predicted.
        self.derives_predictions = False
        self._ran = False

    def start_generation(self) -> None:
        self.stats = RunStats()
        self.totals.generations += 1
        self.in_generation = True

    def record_step(self) -> None:
        c = self.current.context
        for counts in (self.stats.steps, self.totals.steps):
            counts[c] = counts.get(c, 0) + 1
        self._ran = False

    def record_computed(self) -> None:
        c = self.current.context
        for counts in (self.stats.computed, self.totals.computed):
            counts[c] = counts.get(c, 0) + 1
        self._ran = True

    def end_step(self) -> None:
        if self.derives_predictions and not self._ran:
            self.stats.predicted_steps.setdefault(self.current.context, []).append(self.current.index)

    def record_gate(self, error: float | None, predicted: bool) -> None:
        c, i = self.current.context, self.current.index
        self.stats.gate_errors.setdefault(c, []).append(error)
        if predicted:
            self.stats.predicted_steps.setdefault(c, []).append(i)


class _BranchRecord(BaseState):
    def __init__(self) -> None:
        self.seen = False
        self.next_index = 0
        self.timestep: float | None = None
        self.shape: tuple | None = None
        self.marker = None

    def reset(self) -> None:
        pass


def timestep_of(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep")
    if t is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        t = args[1]
    if not isinstance(t, torch.Tensor):
        return None if t is None else float(t)
    return float(t.detach().max())


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class StepHook(ModelHook):
    _is_stateful = True

    def __init__(self, clock: StepClock, cond_half: Callable[[tuple, dict], str | None]):
        super().__init__()
        self.clock = clock
        self.cond_half = cond_half
        self.records = StateManager(_BranchRecord)
        self._last_uncontexted = None  # (timestep, input's storage) of the last call without a cache context

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        try:
            self.records.context
        except ValueError:  # the pipeline set no cache context
            set_cache_context(module, CacheContext(self._branch_without_context(args, kwargs)))
            try:
                return self._step(module, args, kwargs)
            finally:
                set_cache_context(module, None)
        return self._step(module, args, kwargs)

    def _branch_without_context(self, args: tuple, kwargs: dict) -> str:
        """A pipeline without cache contexts that runs guidance as two calls a step (WanVideoToVideoPipeline; FLUX
        img2img with true_cfg_scale) hands both the same latents at the same timestep: the second call is the
        unconditional branch, which follows the first's decisions, not a step of its own."""
        call = (timestep_of(args, kwargs), _hidden_of(args, kwargs).untyped_storage().data_ptr())
        if call[0] is not None and call == self._last_uncontexted:
            return "uncond"
        self._last_uncontexted = call
        return "default"

    def _step(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        context = self.records.context
        record = self.records.get_state()
        if record.seen and self._new_generation(context, record, args, kwargs):
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)
            set_cache_context(module, context)  # the reset cleared every branch's context
            record = self.records.get_state()
        if not self.clock.in_generation:
            self.clock.start_generation()

        index = context.step_index if context.step_index is not None else record.next_index
        record.seen, record.next_index, record.shape = True, index + 1, tuple(_hidden_of(args, kwargs).shape)
        record.marker = self.clock.schedule.marker()
        if context.step_index is None and record.marker is None:
            record.timestep = timestep_of(args, kwargs)  # the only signal left: a device read
        total = context.num_inference_steps or self.clock.schedule.total_steps()
        self.clock.current = Step(context.name, index, total, self.cond_half(args, kwargs))
        self.clock.record_step()
        try:
            output = self.fn_ref.original_forward(*args, **kwargs)
            self.clock.end_step()
            return output
        finally:
            self.clock.current = None

    def _new_generation(self, context: CacheContext, record: _BranchRecord, args: tuple, kwargs: dict) -> bool:
        if context.step_index is not None:
            return context.step_index == 0
        if tuple(_hidden_of(args, kwargs).shape) != record.shape:
            return True
        total = context.num_inference_steps or self.clock.schedule.total_steps()
        if total is not None and record.next_index >= total:
            return True
        marker = self.clock.schedule.marker()
        if marker is not None:
            return marker is not record.marker
        timestep = timestep_of(args, kwargs)
        return timestep is not None and record.timestep is not None and timestep > record.timestep

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.records.reset()
        self.clock.in_generation = False
        return module


class ComputeCounter(ModelHook):
    """Counts the steps in which the wrapped module really ran (registered inside a diffusers cache's hook)."""

    def __init__(self, clock: StepClock):
        super().__init__()
        self.clock = clock

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.clock.current is not None:
            self.clock.record_computed()
        return self.fn_ref.original_forward(*args, **kwargs)
