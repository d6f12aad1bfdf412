"""accel's Gradio demo: generate images and videos with any accelerator, beside the unaccelerated output.

    accel-demo                                  # the shipped models, on the CPU, at http://127.0.0.1:7860
    accel-demo --pipeline /models/Wan2.1-T2V-1.3B-Diffusers --device cuda
    python -m accel.demos.app --help

`catalog` describes and loads the models, `generation` runs one request (unaccelerated once per settings, then
accelerated) and measures it, `ui` lays out the page, `cli` parses the command line and launches.
"""

from .cli import main

__all__ = ["main"]
