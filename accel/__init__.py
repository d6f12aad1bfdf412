"""accel: faster diffusers pipelines, measurably, without giving up quality.

    import accel
    handle = accel.patch(pipe, method="cg_taylor")
    image = pipe(prompt).images[0]
    print(handle.stats())
    handle.remove()
"""

from .cg_taylor import PRESETS, CGTaylorConfig
from .models import register_model
from .patch import METHODS, PatchHandle, patch

__all__ = ["patch", "PatchHandle", "METHODS", "CGTaylorConfig", "PRESETS", "register_model"]
__version__ = "0.1.0"
