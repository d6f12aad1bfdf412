"""ReLU linear attention (SANA, SANA-Video): a fused non-causal op and a block-causal chunk step with a constant-size
state. Two Triton kernels, each beside its PyTorch reference in naive.py:
    state.py  keys and values -> state (S = sum R(phi(k)) v^T, z = sum phi(k)), split over tokens, optional prior state
    fused.py  queries x state -> outputs (ReLU, RoPE on the numerator, normaliser, cast: one pass over q)
"""

from .inputs import LinearAttentionState
from .ops import backend, block_causal_linear_attention, linear_attention
from .rotary import RotaryTables

__all__ = ["linear_attention", "block_causal_linear_attention", "LinearAttentionState", "RotaryTables", "backend"]
