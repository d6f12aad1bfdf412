"""accel: faster diffusers pipelines, measurably, without giving up quality.

    import accel
    handle = accel.patch(pipe, accel.CGTaylorConfig(threshold=0.05))   # or accel.patch(pipe, method="cg_taylor")
    image = pipe(prompt).images[0]
    print(handle.stats())
    handle.remove()
"""

from .cg_taylor import PRESETS, CGTaylorConfig
from .methods import (
    METHODS,
    FasterCacheConfig,
    FirstBlockCacheConfig,
    LinearAttentionKernelsConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    SparseAttentionConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
    make_config,
)
from .mag_calibration import calibrate_mag_ratios
from .models import register_model
from .patch import PatchHandle, patch

__all__ = [
    "patch", "PatchHandle", "METHODS", "make_config", "CGTaylorConfig", "FirstBlockCacheConfig", "TaylorSeerCacheConfig",
    "MagCacheConfig", "calibrate_mag_ratios", "PyramidAttentionBroadcastConfig", "FasterCacheConfig", "SeaCacheConfig",
    "TextKVCacheConfig", "SparseAttentionConfig", "LinearAttentionKernelsConfig", "PRESETS", "register_model",
]
__version__ = "0.1.0"
