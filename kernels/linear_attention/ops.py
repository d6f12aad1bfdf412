"""Public entry points: checks, then the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1), else a logged PyTorch
fallback computing the same thing in float32. The kernels are forward-only: when autograd needs gradients (training),
the differentiable PyTorch reference runs instead, logged once."""

from __future__ import annotations

import logging

import torch

from . import naive
from .fused import _fused_query_kernel, fused_query
from .inputs import LinearAttentionState, check_inputs, check_state
from .launch import is_interpreted
from .state import chunk_state

logger = logging.getLogger("accel")
# Under torch.compile the one-time warnings below are moved after the graph instead of breaking it in two (where
# dynamo can; elsewhere it breaks the graph of the first call only).
getattr(torch._dynamo.config, "reorderable_logging_functions", set()).add(logger.warning)
_warned_fallback = False
_warned_autograd = False


def backend(device: torch.device) -> str:
    """"triton" (CUDA), "interpreter" (CPU, TRITON_INTERPRET=1 when the kernels were imported) or "torch" (fallback)."""
    if device.type == "cuda":
        return "triton"
    return "interpreter" if is_interpreted(_fused_query_kernel) else "torch"


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _use_kernels(device: torch.device, *inputs: torch.Tensor | None) -> bool:
    global _warned_fallback, _warned_autograd
    if _needs_autograd(*inputs):
        if not _warned_autograd:
            logger.warning("accel linear attention: the Triton kernels are forward-only; inputs that need gradients "
                           "go through the differentiable PyTorch reference (logged once)")
            _warned_autograd = True
        return False
    kind = backend(device)
    if kind == "torch":
        if not _warned_fallback:
            logger.warning(
                "accel linear attention: no CUDA device and TRITON_INTERPRET is not set, so the Triton kernels cannot "
                "run on %s; using the PyTorch float32 reference instead (logged once)", device
            )
            _warned_fallback = True
        else:
            logger.debug("accel linear attention: PyTorch fallback on %s", device)
    return kind != "torch"


def _finish(result: torch.Tensor, q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return result.to(q.dtype) if out is None else out.copy_(result)


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-15, rotary=None, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """ReLU linear attention over (B, H, N, D) tensors, float32 inside, output in the input dtype:

        o_i = R(phi(q_i)) . sum_j R(phi(k_j)) v_j^T / (phi(q_i) . sum_j phi(k_j) + eps),   phi = ReLU

    rotary: None, or diffusers' (freqs_cos, freqs_sin) tables ((N, D) or (1, N, 1, D), repeat-interleaved), or
        RotaryTables; applied to the numerator only, as diffusers' SanaLinearAttnProcessor3_0 (needs Nq == Nk).
    eps: 1e-15 as diffusers. out: optional output buffer shaped like q (any strides).
    q may have another number of tokens than k and v when there is no rotary embedding.
    """
    tables = check_inputs(q, k, v, eps, rotary, out)
    if not _use_kernels(q.device, q, k, v):
        return _finish(naive.linear_attention(q, k, v, eps, tables), q, out)
    state = chunk_state(k, v, tables)
    return fused_query(q, state, tables, eps, torch.empty_like(q) if out is None else out)


def block_causal_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearAttentionState | None = None, *,
    eps: float = 1e-15, rotary=None, out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One chunk of a block-causal sequence: the chunk's tokens attend to each other and to every earlier chunk,
    summarised in `state` (None for the first chunk). Returns (out, new_state), new_state = state + this chunk;
    its size (B x H x D x D and B x H x D, float32) never depends on how many chunks came before.

    Feeding a sequence chunk by chunk equals the whole-sequence block-causal computation. rotary: as in
    `linear_attention`, for this chunk's positions (absolute positions, so later chunks continue the sequence).
    """
    tables = check_inputs(q, k, v, eps, rotary, out)
    if q.shape != k.shape:
        raise ValueError(f"a chunk's queries and keys are the same tokens: q {tuple(q.shape)} vs k {tuple(k.shape)}")
    prior = None if state is None else check_state(state, k)
    if not _use_kernels(q.device, q, k, v, *(prior or ())):
        result, new_state = naive.block_causal_linear_attention(q, k, v, prior, eps, tables)
        return _finish(result, q, out), new_state
    new_state = chunk_state(k, v, tables, prior)
    return fused_query(q, new_state, tables, eps, torch.empty_like(q) if out is None else out), new_state
