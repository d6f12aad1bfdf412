"""Confidence-gated Taylor caching (CG-Taylor, arXiv 2508.02240) as diffusers hooks on the transformer blocks.

Per step, in the deciding branch ("cond", or "default" without CFG contexts):
  block 0 runs for real; its output is also forecast by its own Taylor series; the gate error
  e = mean|forecast - actual| / mean|actual| decides. If e < threshold (and the step is past warm-up, not the
  first or last, and the run of predicted steps is under the cap), blocks 1..N-1 are skipped and the last
  block's output is the forecast of the last block's own Taylor series; norm_out and proj_out still run.
  Otherwise every block runs and both series take the new full step.
The unconditional branch follows the conditional branch's decision and keeps its own series. With batched
CFG only the conditional half of the batch feeds the gate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .diffusers_internals import BaseState, StateManager
from .models import Block, block_input, blocks_of
from .steps import Step, StepClock
from .taylor import TaylorSeries
from .validation import check_int, check_real

CG_TAYLOR_HOOK = "accel_cg_taylor"


@dataclass(frozen=True)
class CGTaylorConfig:
    """threshold: gate on the relative error of block 0's forecast (0 never predicts).
    warmup_steps: steps always computed at the start of each model's run (the first step always is; Wan 2.2's second
        expert warms up on its own first steps).
    first_block_order / last_block_order: Taylor orders of the block-0 and last-block series.
    max_consecutive_predicted: cap on predicted steps in a row.
    A field left None takes the value of the model family's preset (PRESETS) when the method is installed.
    """

    threshold: float | None = None
    warmup_steps: int | None = None
    first_block_order: int | None = None
    last_block_order: int | None = None
    max_consecutive_predicted: int | None = None

    def __post_init__(self):
        if self.threshold is not None:
            check_real("CGTaylorConfig", "threshold", self.threshold, minimum=0)
        for name in ("warmup_steps", "first_block_order", "last_block_order", "max_consecutive_predicted"):
            if getattr(self, name) is not None:
                check_int("CGTaylorConfig", name, getattr(self, name), minimum=0)

    def resolved(self, family: str) -> "CGTaylorConfig":
        """Every field set: the fields left None from the preset of the model family."""
        preset = PRESETS[family]
        return dataclasses.replace(preset, **{k: v for k, v in dataclasses.asdict(self).items() if v is not None})


_GENERIC = dict(threshold=0.05, warmup_steps=4, first_block_order=1, last_block_order=1, max_consecutive_predicted=5)
# Released settings of the paper (threshold, warm-up, orders) for FLUX, DiT and Wan; the cap on consecutive
# predictions, DiT's warm-up and the presets of the other families (the generic one, until measured) are ours.
PRESETS: dict[str, CGTaylorConfig] = {
    "flux": CGTaylorConfig(**{**_GENERIC, "threshold": 0.03, "warmup_steps": 5}),
    "wan": CGTaylorConfig(**{**_GENERIC, "threshold": 0.36, "warmup_steps": 6, "first_block_order": 3}),
    "dit": CGTaylorConfig(**{**_GENERIC, "threshold": 0.008, "first_block_order": 3}),
    "sana": CGTaylorConfig(**_GENERIC),
    "sana_video": CGTaylorConfig(**_GENERIC),
    "pixart": CGTaylorConfig(**_GENERIC),
    "generic": CGTaylorConfig(**_GENERIC),
}


class _BranchSeries(BaseState):
    """One branch's two Taylor series and where it stands."""

    def __init__(self, first_order: int, last_order: int):
        self.first = TaylorSeries(first_order)
        self.last = TaylorSeries(last_order)
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


def _cond_slice(x: torch.Tensor, cond_half: str | None) -> torch.Tensor:
    half = x.shape[0] // 2
    return {"first": x[:half], "last": x[half:]}.get(cond_half, x)


def gate_error(forecast: torch.Tensor, actual: torch.Tensor, cond_half: str | None = None) -> float:
    """mean|forecast - actual| / mean|actual| (as a ratio of L1 norms: fewer kernels; accumulated in float32 at
    least)."""
    forecast, actual = _cond_slice(forecast, cond_half).detach(), _cond_slice(actual, cond_half).detach()
    dtype = torch.promote_types(actual.dtype, torch.float32)
    num = torch.linalg.vector_norm(forecast - actual, ord=1, dtype=dtype)
    den = torch.linalg.vector_norm(actual, ord=1, dtype=dtype)
    return float(num / den.clamp_min(torch.finfo(dtype).tiny))  # the one host sync per step


class _Shared:
    """State common to the hooks of one model: the step clock, the config, the decisions per step."""

    def __init__(self, clock: StepClock, config: CGTaylorConfig):
        self.clock, self.config = clock, config
        self.series = StateManager(_BranchSeries, (config.first_block_order, config.last_block_order))
        self.decisions: dict[int, bool] = {}
        self.skipping = False  # the current call's decision, read by the middle blocks without a state lookup


class CGTaylorHeadHook(ModelHook):
    """Block 0: always computed; its forecast error decides whether the rest of the stack runs."""

    _is_stateful = True

    def __init__(self, shared: _Shared, block: Block):
        super().__init__()
        self.shared, self.block = shared, block
        self.series = shared.series  # diffusers sets the cache context on StateManager attributes

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        output = self.fn_ref.original_forward(*args, **kwargs)
        hidden = _hidden(self.block, output)
        state = self.series.get_state()
        step = self.shared.clock.current
        state.skipping = self.shared.skipping = self._decide(step, state, hidden)
        state.consecutive = state.consecutive + 1 if state.skipping else 0
        if not state.skipping:
            state.first.update(step.index, hidden)
        return output

    @torch.compiler.disable
    def _decide(self, step: Step, state: _BranchSeries, hidden: torch.Tensor) -> bool:
        cfg = self.shared.config
        if not step.decides:
            return self.shared.decisions.get(step.index, False) and state.last.ready
        state.start = step.index if state.start is None else state.start
        eligible = (
            step.index - state.start >= max(1, cfg.warmup_steps)  # each expert warms up on its own first steps
            and not step.is_last
            and state.consecutive < cfg.max_consecutive_predicted
            and state.first.ready
            and state.last.ready
        )
        error = gate_error(state.first.predict(step.index), hidden, step.cond_half) if eligible else None
        skip = error is not None and error < cfg.threshold
        self.shared.decisions[step.index] = skip
        self.shared.clock.record_gate(error, skip)
        return skip

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.series.reset()
        self.shared.decisions.clear()
        self.shared.skipping = False
        return module


class CGTaylorMiddleHook(ModelHook):
    """Blocks 1..N-2: skipped (inputs passed through) when the gate passed."""

    def __init__(self, shared: _Shared, block: Block):
        super().__init__()
        self.shared, self.block = shared, block

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.shared.skipping:
            return _with_hidden(self.block, block_input(self.block, "hidden_states", args, kwargs), args, kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)


class CGTaylorTailHook(ModelHook):
    """Last block: forecast by its Taylor series when the gate passed, else computed and recorded."""

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
    shared = _Shared(clock, config)
    roles = [CGTaylorHeadHook] + [CGTaylorMiddleHook] * (len(blocks) - 2) + [CGTaylorTailHook]
    for block, role in zip(blocks, roles):
        HookRegistry.check_if_exists_or_initialize(block.module).register_hook(role(shared, block), CG_TAYLOR_HOOK)
