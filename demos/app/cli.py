"""`accel-demo`: parse the command line, check it, build the model menu and launch the page."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import tempfile

import torch

from accel.eval.harness.cli import check_device_present
from accel.eval.harness.spec import SpecError

logger = logging.getLogger("accel.demos.app")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _pipeline_folder(text: str) -> str:
    if not os.path.isfile(os.path.join(text, "model_index.json")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a saved diffusers pipeline (no model_index.json in it)")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="accel-demo", description=__doc__)
    p.add_argument("--pipeline", action="append", default=[], type=_pipeline_folder, metavar="PATH",
                   help="a local diffusers pipeline folder to offer beside the shipped models (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_positive(int), default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--out", default=None, help="output folder (default: a new temporary folder); the only one served")
    p.add_argument("--keep-minutes", type=_positive(float), default=60, help="outputs older than this are deleted")
    p.add_argument("--queue-size", type=_positive(int), default=16, help="requests waiting at most; more are refused")
    p.add_argument("--workers", type=_positive(int), default=1,
                   help="requests generating at once (default 1: one GPU worker); one model never runs two at once")
    p.add_argument("--max-chunks", type=_positive(int), default=64, help="longest long video, in chunks")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    try:
        check_device_present(args.device)
    except SpecError as err:
        parser().error(str(err))
    args.out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="accel-demo-"))
    os.makedirs(args.out, exist_ok=True)
    # gradio reads these when imported: its file cache goes inside our folder, so everything served lives there.
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join(args.out, "gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if importlib.util.find_spec("gradio") is None:
        parser().error("the demo needs gradio: pip install 'accel-diffusion[demo]'")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from .catalog import Catalog
    from .generation import Runner
    from .ui import build_app, launch

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    catalog = Catalog.build(args.pipeline, args.device, dtype)
    runner = Runner(catalog, args.out, max_chunks=args.max_chunks, keep_minutes=args.keep_minutes)
    logger.info("models: %s; outputs in %s", ", ".join(catalog.names()), args.out)
    launch(build_app(runner), args)
