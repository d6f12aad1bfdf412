"""The page: inputs on the left, the accelerated output beside the unaccelerated one on the right.

Each request is one generator call of `Runner.stream`; a long video's chunks reach the streaming video player as
they finish. Stop sets the request's cancel event (the pipeline stops at its next step) and cancels the event.
"""

from __future__ import annotations

import logging
import shutil
import threading

import gradio as gr

from accel.attention.sparse import PATTERNS

from .catalog import IMAGE, LONG, PLAIN, DemoError
from .generation import MAX_FRAMES, MAX_STEPS, Acceleration, Cancelled, Chunk, Runner, Settings

logger = logging.getLogger("accel.demos.app")
THRESHOLD_METHODS = ("cg_taylor", "first_block_cache", "mag_cache")


def can_stream() -> bool:
    """gradio streams video through ffmpeg and ffprobe on the PATH; without them the video shows when complete."""
    return all(shutil.which(tool) for tool in ("ffmpeg", "ffprobe"))


def summary(m: dict) -> str:
    steps = (f"{m['steps_computed']} of {m['steps_steps']} steps computed, {m['steps_predicted']} predicted"
             if "steps_computed" in m else "every step computed")
    psnr = "identical" if m["psnr_db"] == "inf" else f"PSNR {m['psnr_db']} dB, SSIM {m['ssim']}"
    cached = " (unaccelerated run cached from an earlier request)" if m["unaccelerated_from_cache"] else ""
    return (f"**{m['method']}**: {m['latency_s']:.2f} s vs {m['unaccelerated_latency_s']:.2f} s unaccelerated{cached}: "
            f"**{m['speedup']:.2f}x**; {steps}; to the unaccelerated output: {psnr}.")


class App:
    """Builds the Blocks and holds what the callbacks share: the runner and each session's cancel event."""

    def __init__(self, runner: Runner):
        self.runner, self.catalog = runner, runner.catalog
        self.streaming = can_stream()
        if not self.streaming:
            logger.warning("ffmpeg/ffprobe not on the PATH: long videos show when complete, not chunk by chunk")
        self._cancels: dict[str, threading.Event] = {}

    # --- what a model choice changes -------------------------------------------------------------------------
    def model_changed(self, name: str, prompt: str):
        entry = self.catalog.entries[name]
        video = entry.kind != IMAGE
        d = entry.defaults
        return (
            gr.update(choices=list(entry.modes), value=entry.modes[0], visible=video),
            gr.update(choices=list(entry.caches), value="cg_taylor"),
            gr.update(choices=list(entry.attention_methods), value="none", visible=len(entry.attention_methods) > 1),
            gr.update(value=d.get("num_inference_steps", 20)),
            gr.update(value=d.get("guidance_scale", 3.0)),
            entry.example_prompt or prompt,
            *self.length_update(name, entry.modes[0]),
            *(gr.update(visible=video),) * 2, *(gr.update(visible=not video),) * 2,
        )

    def length_update(self, name: str, mode: str):
        return (gr.update(**self.length_slider(self.catalog.entries[name], mode)),)

    def length_slider(self, entry, mode: str) -> dict:
        """The length slider counts chunks of a long video, frames of a plain one; images have none."""
        if mode == LONG:
            return dict(label="Chunks", minimum=1, maximum=self.runner.max_chunks,
                        value=min(4, self.runner.max_chunks), visible=True)
        return dict(label="Frames", minimum=1, maximum=MAX_FRAMES, value=entry.defaults.get("num_frames", 17),
                    visible=entry.kind != IMAGE)

    # --- a request --------------------------------------------------------------------------------------------
    def generate(self, prompt, model, mode, cache, attention, threshold, interval, pattern, steps, seed, length,
                 guidance, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        cancel = self._cancels[request.session_hash] = threading.Event()
        try:
            settings = Settings(model, mode or PLAIN, prompt or "", _whole(steps), _whole(seed), float(guidance),
                                _whole(length))
            acceleration = Acceleration(cache or "none", attention or "none",
                                        _threshold(threshold), _whole(interval),
                                        pattern)
            yield {self.summary: "Generating…", self.base_video: None, self.base_image: None, self.image: None}
            for event in self.runner.stream(settings, acceleration, cancel):
                if isinstance(event, Chunk):
                    yield self.chunk_update(event)
                else:
                    yield self.result_update(event, settings)
        except DemoError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except Cancelled:
            gr.Warning("Stopped.")
        finally:
            self._cancels.pop(request.session_hash, None)

    def chunk_update(self, chunk: Chunk) -> dict:
        message = {self.summary: f"Chunk {chunk.index + 1} done…"}
        return {**message, self.video: chunk.path} if self.streaming else message

    def result_update(self, result, settings: Settings) -> dict:
        out = {self.summary: summary(result.measurements), self.details: result.measurements,
               self.download: gr.update(value=result.accelerated, visible=True)}
        if result.kind == IMAGE:
            return {**out, self.image: result.accelerated, self.base_image: result.unaccelerated}
        out[self.base_video] = result.unaccelerated
        if not (self.streaming and settings.mode == LONG):  # a streamed long video is in the player already
            out[self.video] = result.accelerated
        return out

    def stop(self, request: gr.Request) -> str:
        cancel = self._cancels.get(request.session_hash)
        if cancel is not None:
            cancel.set()
        return "Stopped."

    # --- layout -----------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        # A demo for generating videos: the first video model is preselected, a plain one if there is one.
        usable = [e for e in self.catalog.entries.values() if not e.problem] or list(self.catalog.entries.values())
        first = min(usable, key=lambda e: (e.kind == IMAGE, e.modes[0] != PLAIN))
        # The API checks a choice against the choices the page started with: every model's, narrowed per model later.
        modes, caches, attentions = (list(dict.fromkeys(c for e in self.catalog.entries.values() for c in getattr(e, name)))
                                     for name in ("modes", "caches", "attention_methods"))
        with gr.Blocks(title="accel demo", analytics_enabled=False,
                       delete_cache=(600, int(60 * self.runner.keep_minutes))) as blocks:
            gr.Markdown("# accel: faster diffusers pipelines\nGenerate with an accelerator; the unaccelerated output "
                        "of the same settings (computed once, then cached) is shown beside it, with the speedup.")
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", value=first.example_prompt or "", elem_id="prompt")
                    model = gr.Dropdown(self.catalog.names(), value=first.name, label="Model", elem_id="model")
                    mode = gr.Radio(modes, value=first.modes[0], label="Video",
                                    visible=first.kind != IMAGE, elem_id="mode")
                    with gr.Row():
                        cache = gr.Dropdown(caches, value="cg_taylor", label="Caching method",
                                            elem_id="cache")
                        attention = gr.Dropdown(attentions, value="none", label="Attention method",
                                                visible=len(first.attention_methods) > 1, elem_id="attention")
                    threshold = gr.Textbox(label="Threshold", placeholder="the method's default or the model's preset",
                                           elem_id="threshold")
                    interval = gr.Slider(1, 10, value=3, step=1, label="TaylorSeer interval", visible=False)
                    pattern = gr.Dropdown(list(PATTERNS), value="local_3d", label="Sparse attention pattern",
                                          visible=False)
                    steps = gr.Slider(1, MAX_STEPS, step=1, label="Steps",
                                      value=first.defaults.get("num_inference_steps", 20))
                    length = gr.Slider(step=1, elem_id="length", **self.length_slider(first, first.modes[0]))
                    guidance = gr.Slider(0, 30, step=0.5, label="Guidance",
                                         value=first.defaults.get("guidance_scale", 3.0))
                    seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                    with gr.Row():
                        run = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Column(scale=2):
                    video_shown = first.kind != IMAGE
                    with gr.Row():
                        self.video = gr.Video(label="Accelerated", streaming=self.streaming, autoplay=True,
                                              visible=video_shown, elem_id="accelerated-video")
                        self.base_video = gr.Video(label="Unaccelerated", visible=video_shown,
                                                   elem_id="unaccelerated-video")
                        self.image = gr.Image(label="Accelerated", visible=not video_shown, elem_id="accelerated-image")
                        self.base_image = gr.Image(label="Unaccelerated", visible=not video_shown,
                                                   elem_id="unaccelerated-image")
                    self.summary = gr.Markdown(elem_id="summary")
                    self.download = gr.DownloadButton("Download the accelerated output", visible=False,
                                                      elem_id="download")
                    with gr.Accordion("Measurements", open=False):
                        self.details = gr.JSON(elem_id="measurements")

            cache.change(lambda c: (gr.update(visible=c in THRESHOLD_METHODS), gr.update(visible=c == "taylorseer")),
                         cache, [threshold, interval], queue=False)
            attention.change(lambda a: gr.update(visible=a == "sparse_attention"), attention, pattern, queue=False)
            model.change(self.model_changed, [model, prompt],
                         [mode, cache, attention, steps, guidance, prompt, length,
                          self.video, self.base_video, self.image, self.base_image], queue=False)
            mode.change(self.length_update, [model, mode], [length], queue=False)
            outputs = [self.video, self.base_video, self.image, self.base_image, self.summary, self.details,
                       self.download]
            inputs = [prompt, model, mode, cache, attention, threshold, interval, pattern, steps, seed, length, guidance]
            generating = run.click(self.generate, inputs, outputs, api_name="generate")
            stop.click(self.stop, None, self.summary, cancels=[generating], queue=False, api_name="stop")
        return blocks


def _whole(value) -> int:
    """gradio numbers arrive as floats; a whole float is taken, anything else is refused by the settings check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    raise DemoError(f"expected a whole number, got {value!r}")


def _threshold(text) -> float | None:
    """The threshold box: empty for the default, else a number (range-checked by `Acceleration.check`)."""
    if text is None or not str(text).strip():
        return None
    try:
        return float(text)
    except ValueError:
        raise DemoError(f"threshold must be a number, got {text!r}") from None


def build_app(runner: Runner) -> gr.Blocks:
    return App(runner).build()


def launch(blocks: gr.Blocks, args) -> None:
    blocks.queue(default_concurrency_limit=args.workers, max_size=args.queue_size)
    blocks.launch(server_name=args.host, server_port=args.port, share=args.share,
                  allowed_paths=[args.out], show_error=True)
