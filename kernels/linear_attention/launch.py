"""Launch arithmetic shared by the two kernels: padding, grid splits, configurations, dot precision."""

from __future__ import annotations

import functools

import torch
import triton

SPAN_GRANULE = 128  # token spans are multiples of the largest BLOCK_N, so every configuration tiles them evenly
INTERPRETER_BLOCK_N = 64  # the interpreter runs one fixed configuration: there is nothing to tune on a CPU


def is_interpreted(kernel) -> bool:
    """Whether triton.jit built this kernel for the interpreter (TRITON_INTERPRET=1 when the module was imported)."""
    return type(kernel).__name__ == "InterpretedFunction"


def pad_dim(d: int) -> int:
    """Channels padded to a power of two, at least 32: tensor-core dots need every side >= 16."""
    return max(32, triton.next_power_of_2(d))


def launch(kernel, tuned, grid, *args, **constexprs) -> None:
    """On the GPU through the autotuner (best BLOCK_N, warps and stages per head dim, RoPE and dtype, measured on
    first use); interpreted with one fixed configuration."""
    if is_interpreted(kernel):
        kernel[grid](*args, BLOCK_N=INTERPRETER_BLOCK_N, **constexprs)
    else:
        tuned[grid](*args, **constexprs)


def prune_fp32(configs, named_args, **kwargs):
    """The last configuration is the float32 one (no tuning: float32 is the accurate path, not the fast one); the
    others are tuned for 16-bit inputs."""
    first_tensor = next(a for a in named_args.values() if isinstance(a, torch.Tensor))
    return configs[-1:] if first_tensor.dtype == torch.float32 else configs[:-1]


@functools.lru_cache(maxsize=None)
def _slots(device: torch.device) -> int:
    """Programs resident at once: two per SM (the 4-warp configurations fit two; the 8-warp ones take two waves)."""
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=1024)  # launch-time arithmetic stays off the per-call path
def grid_split(n: int, heads: int, device: torch.device, overhead: int) -> tuple[int, int]:
    """(programs per head, tokens per program, a multiple of SPAN_GRANULE).

    On a GPU, the count minimising the estimated time in tokens:
        waves(p) * tokens per program + heads * p * overhead / slots
    The first term is the load balance (a last, partly filled wave costs a full one: 16 heads x 17 programs on 264
    slots run in 2 waves, 16 x 16 in 1); the second what a program costs besides its tokens (kernel 1 writes a D x D
    partial state that the launcher reads back, kernel 2 reads the state). The interpreter runs programs one by one:
    there, up to 3 programs per head, so small tests cover spans and the partial-state reduction.
    """
    blocks = max(1, triton.cdiv(n, SPAN_GRANULE))
    if device.type == "cuda":
        slots = _slots(device)

        def cost(p: int) -> float:
            return triton.cdiv(heads * p, slots) * triton.cdiv(blocks, p) * SPAN_GRANULE + heads * p * overhead / slots

        per_head = min(range(1, min(blocks, 4 * slots) + 1), key=cost)
    else:
        per_head = min(blocks, 3)
    span = triton.cdiv(blocks, per_head) * SPAN_GRANULE
    return max(1, triton.cdiv(n, span)), span


def state_dot(dtype: torch.dtype, kernel) -> tuple[bool, str]:
    """Kernel 1 (v^T phi(k)): (dot operands in float32?, float32 dot precision).

    On the GPU 16-bit tiles go to the tensor cores as they are (exact products, float32 accumulation); float32 inputs
    use 3-pass TF32 (float32 accuracy on the tensor cores; a plain float32 dot spills registers). The interpreter
    multiplies bf16 bit patterns as integers in tl.dot (triton-lang/triton#11584), so interpreted kernels upcast their
    operands to float32, where its dots are exact.
    """
    if is_interpreted(kernel):
        return True, "ieee"
    return dtype == torch.float32, "tf32x3"


def query_dot(dtype: torch.dtype, kernel) -> str:
    """Kernel 2 (S^T R(phi(q))^T): float32 dot precision. S is float32 (a 16-bit copy could overflow in fp16), so the
    16-bit paths use TF32: bf16 and fp16 queries are exact in TF32 and S keeps 10 mantissa bits, below the rounding of
    the 16-bit output. float32 inputs get 3-pass TF32, the interpreter exact float32."""
    if is_interpreted(kernel):
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"
