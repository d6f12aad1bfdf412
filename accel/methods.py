"""The acceleration methods: one typed config per method, validated at construction, and the registry that maps
each method's name to its config class.

    accel.patch(pipe, CGTaylorConfig(threshold=0.05))            # typed, as diffusers' enable_cache(config)
    accel.patch(pipe, method="cg_taylor", threshold=0.05)        # short form: make_config("cg_taylor", ...)

The configs of diffusers' caches are diffusers' own config classes with validation added (they are still accepted
by diffusers' `enable_cache`); a plain diffusers config passed to `accel.patch` is validated the same way.
How each method is installed on a model lives in `accel.patch`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import hooks as diffusers_hooks

from .cg_taylor import CGTaylorConfig
from .validation import check_bool, check_int, check_real


@dataclass
class FirstBlockCacheConfig(diffusers_hooks.FirstBlockCacheConfig):
    """diffusers' FirstBlockCache: block 0 always runs; the rest is skipped while its output's relative change since
    the last full step stays under `threshold` (0 never skips)."""

    def __post_init__(self):
        check_real(type(self).__name__, "threshold", self.threshold, minimum=0)


def _check_patterns(owner: str, name: str, patterns) -> None:
    if patterns is None:
        return
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{owner}: {name} must be a list of regular expressions (str), got {patterns!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{owner}: {name} holds an invalid regular expression {pattern!r}: {err}") from None


@dataclass
class TaylorSeerCacheConfig(diffusers_hooks.TaylorSeerCacheConfig):
    """diffusers' TaylorSeer: the hooked modules run every `cache_interval`-th step and are forecast by a Taylor
    series of `max_order` in between, outside [disable_cache_before_step, disable_cache_after_step)."""

    def __post_init__(self):
        owner = type(self).__name__
        check_int(owner, "cache_interval", self.cache_interval, minimum=1)
        check_int(owner, "disable_cache_before_step", self.disable_cache_before_step, minimum=0)
        if self.disable_cache_after_step is not None:
            check_int(owner, "disable_cache_after_step", self.disable_cache_after_step, minimum=self.disable_cache_before_step)
        check_int(owner, "max_order", self.max_order, minimum=0)
        if self.taylor_factors_dtype is not None and not (
            isinstance(self.taylor_factors_dtype, torch.dtype) and self.taylor_factors_dtype.is_floating_point
        ):
            raise TypeError(f"{owner}: taylor_factors_dtype must be None or a floating torch.dtype, got {self.taylor_factors_dtype!r}")
        _check_patterns(owner, "cache_identifiers", self.cache_identifiers)
        _check_patterns(owner, "skip_predict_identifiers", self.skip_predict_identifiers)
        check_bool(owner, "use_lite_mode", self.use_lite_mode)


@dataclass
class MagCacheConfig(diffusers_hooks.MagCacheConfig):
    """diffusers' MagCache: skips while the accumulated magnitude-ratio error stays under `threshold`.

    `mag_ratios` are per model (and scheduler): diffusers ships FLUX's, used when they are left out; for any other
    model measure them once with `accel.calibrate_mag_ratios`, which runs a generation with nothing skipped:

        ratios = accel.calibrate_mag_ratios(pipe, prompt, num_inference_steps=30)
        accel.patch(pipe, accel.MagCacheConfig(mag_ratios=ratios), num_inference_steps=30)

    Ratios measured over another step count are resampled (nearest) to this one. `num_inference_steps` may come from
    `accel.patch(..., num_inference_steps=)`; both are filled in when the method is installed.
    """

    num_inference_steps: int | None = None

    def __post_init__(self):
        owner = type(self).__name__
        check_real(owner, "threshold", self.threshold, minimum=0)
        check_int(owner, "max_skip_steps", self.max_skip_steps, minimum=0)
        check_real(owner, "retention_ratio", self.retention_ratio, minimum=0, maximum=1)
        if self.num_inference_steps is not None:
            check_int(owner, "num_inference_steps", self.num_inference_steps, minimum=1)
        check_bool(owner, "calibrate", self.calibrate)
        if self.mag_ratios is not None:
            ratios = torch.as_tensor(self.mag_ratios, dtype=torch.float64) if not isinstance(self.mag_ratios, str) else None
            if ratios is None or ratios.ndim != 1 or ratios.numel() == 0 or not bool((ratios.isfinite() & (ratios > 0)).all()):
                raise ValueError(f"{owner}: mag_ratios must be a non-empty sequence of finite numbers > 0, got {self.mag_ratios!r}")
        if self.num_inference_steps is not None and (self.mag_ratios is not None or self.calibrate):
            super().__post_init__()  # diffusers lays the ratios out over the steps


def _check_range(owner: str, name: str, value) -> None:
    """A timestep range: a (low, high) pair of real numbers with low < high."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise TypeError(f"{owner}: {name} must be a (low, high) pair of timesteps, got {value!r}")
    low, high = (check_real(owner, name, v) for v in value)
    if low >= high:
        raise ValueError(f"{owner}: {name} must have low < high, got {value!r}")


def _check_callable(owner: str, name: str, value) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{owner}: {name} must be None or a callable, got {value!r}")


def _check_skip_range(owner: str, name: str, value) -> None:
    if value is not None:
        check_int(owner, name, value, minimum=1)


@dataclass
class PyramidAttentionBroadcastConfig(diffusers_hooks.PyramidAttentionBroadcastConfig):
    """diffusers' Pyramid Attention Broadcast: each hooked attention layer computes one call in N (`*_block_skip_range`)
    while the timestep is inside its range and reuses its last output otherwise. At least one skip range must be set.
    `current_timestep_callback` may be left out: accel reads the pipeline's `current_timestep`, or the timestep of
    each transformer call."""

    spatial_attention_block_skip_range: int | None = 2  # diffusers' fallback, made the visible default

    def __post_init__(self):
        owner = type(self).__name__
        kinds = ("spatial", "temporal", "cross")
        for kind in kinds:
            _check_skip_range(owner, f"{kind}_attention_block_skip_range", getattr(self, f"{kind}_attention_block_skip_range"))
            _check_range(owner, f"{kind}_attention_timestep_skip_range", getattr(self, f"{kind}_attention_timestep_skip_range"))
            _check_patterns(owner, f"{kind}_attention_block_identifiers", getattr(self, f"{kind}_attention_block_identifiers"))
        if all(getattr(self, f"{kind}_attention_block_skip_range") is None for kind in kinds):
            # diffusers would warn and fall back to spatial 2: say it instead
            raise ValueError(f"{owner}: set at least one of spatial_attention_block_skip_range, "
                             "temporal_attention_block_skip_range, cross_attention_block_skip_range")
        _check_callable(owner, "current_timestep_callback", self.current_timestep_callback)


FASTER_CACHE_TENSOR_FORMATS = ("BCFHW", "BFCHW", "BCHW")


@dataclass
class FasterCacheConfig(diffusers_hooks.FasterCacheConfig):
    """diffusers' FasterCache: attention reuse every `spatial_attention_block_skip_range` calls and, for pipelines that
    batch classifier-free guidance as [uncond, cond], the unconditional half approximated from the conditional one
    (every `unconditional_batch_skip_range`-th call computed). `current_timestep_callback` as for PAB."""

    def __post_init__(self):
        owner = type(self).__name__
        check_int(owner, "spatial_attention_block_skip_range", self.spatial_attention_block_skip_range, minimum=1)
        _check_skip_range(owner, "temporal_attention_block_skip_range", self.temporal_attention_block_skip_range)
        check_int(owner, "unconditional_batch_skip_range", self.unconditional_batch_skip_range, minimum=1)
        for name in ("spatial_attention_timestep_skip_range", "low_frequency_weight_update_timestep_range",
                     "high_frequency_weight_update_timestep_range", "unconditional_batch_timestep_skip_range"):
            _check_range(owner, name, getattr(self, name))
        if self.temporal_attention_timestep_skip_range is not None:
            _check_range(owner, "temporal_attention_timestep_skip_range", self.temporal_attention_timestep_skip_range)
        for name in ("alpha_low_frequency", "alpha_high_frequency"):
            check_real(owner, name, getattr(self, name), minimum=0)
        _check_patterns(owner, "spatial_attention_block_identifiers", self.spatial_attention_block_identifiers)
        _check_patterns(owner, "temporal_attention_block_identifiers", self.temporal_attention_block_identifiers)
        for name in ("attention_weight_callback", "low_frequency_weight_callback", "high_frequency_weight_callback",
                     "current_timestep_callback"):
            _check_callable(owner, name, getattr(self, name))
        if self.tensor_format not in FASTER_CACHE_TENSOR_FORMATS:
            raise ValueError(f"{owner}: tensor_format must be one of {FASTER_CACHE_TENSOR_FORMATS}, got {self.tensor_format!r}")
        check_bool(owner, "is_guidance_distilled", self.is_guidance_distilled)


@dataclass
class SeaCacheConfig(diffusers_hooks.SeaCacheConfig):
    """diffusers' SeaCache: the block stack is replaced by a cached residual while the accumulated change of its
    spectral indicator stays under `threshold`. It reads the step index, sigma and step count from the pipeline's
    cache context (WanPipeline and Cosmos 3 pass them); elsewhere it runs every step, and accel.patch says so."""

    def __post_init__(self):
        owner = type(self).__name__
        check_real(owner, "threshold", self.threshold, minimum=0)
        check_int(owner, "residual_order", self.residual_order, minimum=0)
        for name in ("retention_steps", "cache_end_steps", "max_consecutive_cached"):
            check_int(owner, name, getattr(self, name), minimum=0)
        check_real(owner, "power_exp", self.power_exp)
        _check_callable(owner, "raw_vision_callback", self.raw_vision_callback)
        try:
            super().__post_init__()  # diffusers' own checks (residual_order 0 or 1, power_exp > 0)
        except ValueError as err:
            raise ValueError(f"{owner}: {err}") from None


@dataclass
class TextKVCacheConfig(diffusers_hooks.TextKVCacheConfig):
    """diffusers' TextKVCache: lossless; the text keys and values of every block computed once per prompt. diffusers
    implements it for NucleusMoE-Image's blocks only."""


@dataclass(frozen=True)
class SparseAttentionConfig:
    """Block-sparse self-attention (`accel.attention.sparse`) in WanTransformer3DModel's `attn1` layers, or the
    image-image part of HunyuanVideoTransformer3DModel's joint attention (image queries still see every text key,
    text queries every key). SANA / SANA-Video attention is linear: use "linear_attention_kernels" there.

    pattern: a name below (its factory's defaults) or the name called with literal keyword arguments
    ("dynamic(budget=0.1)"); what the factory of that name in `accel.attention.sparse` returns; a callable
    (grid, heads, device) -> BlockSparseMask; a fixed BlockSparseMask; or a SparsePattern.
    - "preset" (default): the model family's preset (`SPARSE_PRESETS`): a sliding-tile window (tiled_3d) whose tile
      is chosen per latent grid, or dense attention where the grid is too small for a window to pay; the choice is
      logged per grid;
    - "local_3d": each token sees the tokens within a (frames, rows, cols) radius of it;
    - "strided_shards": S2-Attention: head h sees the key blocks j = h (mod num_shards) and those by the diagonal;
    - "dense": every block: exact dense attention, for checks and baselines;
    - "tiled_3d": sliding-tile 3-D windows (STA): each query tile sees the tiles within a window, in tile order;
    - "dynamic": per query block, a `budget` share of key blocks chosen on the GPU from the current q and k;
    - "criss_cross": CCNet's criss-cross: a query tile sees its tile row and column in the nearby frames;
    - "window_global_random": Orion-MSP's: a window of blocks, global first blocks and seeded random blocks;
    - "pbs": PBS-Attn: keys permuted by importance within each frame, then a dynamic top-k block mask;
    - "hybrid": LongGen's layers: every `dense_every`-th layer keeps dense attention, the others run a pattern
      ("tiled_3d" by default).
    Why "preset" is the default: "local_3d" (the former default) needs a token rule and runs on the kernel's slow
    partial-block path; the tile-ordered window is a pure block table (measured 2.03x a dense Wan-1.3B step on an
    H200, tiles (2, 8, 8), window (1, 1, 1)), and the preset checks that its tile suits the grid the model is called
    at (and runs dense, logged, below 8,192 tokens: on the 1,088-token shapes-video model a tiled window cost ~24 dB
    PSNR against dense, eval/harness/sparse_quality.py), where a fixed tiled_3d tile would silently keep most block
    pairs (or all) on small grids.
    HunyuanVideo takes fixed-mask and tile-order patterns (not "dynamic" / "pbs").
    """

    pattern: Any = "preset"

    def __post_init__(self):
        from .attention.sparse import _as_pattern  # the kernels load only when the method is used

        _as_pattern(self.pattern)


@dataclass(frozen=True)
class LinearAttentionKernelsConfig:
    """accel's Triton linear-attention kernels in SANA's and SANA-Video's linear self-attention layers."""


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    attention: bool  # swaps attention processors (composes with one cache) rather than skipping steps
    diffusers_config_cls: type | None = None  # diffusers' own config class, also accepted


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("cg_taylor", CGTaylorConfig, False),
        Method("first_block_cache", FirstBlockCacheConfig, False, diffusers_hooks.FirstBlockCacheConfig),
        Method("taylorseer", TaylorSeerCacheConfig, False, diffusers_hooks.TaylorSeerCacheConfig),
        Method("mag_cache", MagCacheConfig, False, diffusers_hooks.MagCacheConfig),
        Method("pyramid_attention_broadcast", PyramidAttentionBroadcastConfig, False,
               diffusers_hooks.PyramidAttentionBroadcastConfig),
        Method("faster_cache", FasterCacheConfig, False, diffusers_hooks.FasterCacheConfig),
        Method("sea_cache", SeaCacheConfig, False, diffusers_hooks.SeaCacheConfig),
        Method("text_kv_cache", TextKVCacheConfig, False, diffusers_hooks.TextKVCacheConfig),
        Method("sparse_attention", SparseAttentionConfig, True),
        Method("linear_attention_kernels", LinearAttentionKernelsConfig, True),
    )
}


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def make_config(method: str, **options):
    """The typed config of `method` from keyword options: the short form of `accel.patch`."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a method name (str) or a config object, got {method!r}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    cls = METHODS[method].config_cls
    unknown = sorted(set(options) - set(_fields(cls)))
    if unknown:
        raise TypeError(f"unknown {method} option(s) {unknown}; valid: {_fields(cls)}")
    return cls(**options)


def method_of(config) -> Method:
    """The method a config object belongs to (accel's configs, or diffusers' plain ones)."""
    for method in METHODS.values():
        if isinstance(config, tuple(c for c in (method.config_cls, method.diffusers_config_cls) if c is not None)):
            return method
    names = ", ".join(m.config_cls.__name__ for m in METHODS.values())
    raise TypeError(f"accel.patch takes a method name or one of its configs ({names}), got {type(config).__name__}")


def validated(config):
    """`config` as its accel config class: a plain diffusers config is re-built, and so checked, field by field."""
    cls = method_of(config).config_cls
    if type(config) is cls:
        return config
    return cls(**{name: getattr(config, name) for name in _fields(type(config))})

