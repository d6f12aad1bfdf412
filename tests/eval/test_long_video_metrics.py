"""The long-video metrics: boundary flicker and warp error, per-chunk caption agreement and CLIPScore (torchmetrics
through an open_clip model), seed spreads, and chunks collected from a long-video pipeline."""

import copy
import json

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from accel.eval.harness import long_video as lv
from accel.eval.harness.cli import main
from accel.pipelines import reference_classifier
from accel.pipelines.shapes.data import video_batch
from accel.pipelines.streaming_t2v import StreamingT2VPipeline

CAPTION = "a red circle moving left"
ARCH = "accel-test-long-video-clip"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
              "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 8, "heads": 1, "layers": 1}}
    (folder / f"{ARCH}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{ARCH}.json")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in open_clip.create_model(ARCH).state_dict().items()}, folder / "m.safetensors")
    return lv.load_clip(f"{ARCH}:{folder / 'm.safetensors'}")


def _data_video(chunk_frames=(4, 4, 4)) -> lv.LongVideo:
    """A real shapes clip cut into chunks: smooth motion at every boundary."""
    frames = (video_batch(1000, 0, 1, frames=sum(chunk_frames)).pixels[0].permute(1, 2, 3, 0).numpy() + 1) / 2
    cuts = np.cumsum(chunk_frames)[:-1]
    return lv.LongVideo(chunks=np.split(frames, cuts), peak_memory_MB=[1.0] * len(chunk_frames),
                        chunk_s=[1.0] * len(chunk_frames))


def test_warp_error_forgives_motion_that_flicker_counts():
    rng = np.random.default_rng(0)
    frame = rng.random((32, 32, 3)).astype(np.float32)
    moved = np.roll(frame, (1, -2), axis=(0, 1))
    assert lv.flicker(frame, moved) > 20
    assert lv.warp_error(frame, moved) == pytest.approx(0.0, abs=1e-4)
    assert lv.warp_error(frame, rng.random((32, 32, 3)).astype(np.float32)) > 20


def test_a_jump_at_a_boundary_scores_worse_than_smooth_motion(clip):
    classifier = reference_classifier()
    smooth = lv.score(_data_video(), CAPTION, classifier, clip)
    jumped = _data_video()
    jumped.chunks[1] = np.roll(jumped.chunks[1], 10, axis=2)  # the shape leaps sideways where chunk 1 starts
    jump = lv.score(jumped, CAPTION, classifier, clip)
    assert jump["boundary_warp_error"] > smooth["boundary_warp_error"]
    assert smooth["boundary_warp_error"] == pytest.approx(smooth["inside_warp_error"], rel=0.5)
    assert set(smooth) == set(lv.METRICS)
    assert 0 <= smooth["caption_agreement"] <= 1 and smooth["clip_score"] >= 0


def test_clip_score_goes_through_torchmetrics_with_the_open_clip_model(clip):
    from torchmetrics.functional.multimodal import clip_score

    chunk = _data_video().chunks[0]
    image = torch.from_numpy((chunk[0] * 255).round().astype(np.uint8)).permute(2, 0, 1)
    model, processor = clip
    with torch.no_grad():
        img = model.get_image_features(processor(images=[image])["pixel_values"])
        txt = model.get_text_features(processor(text=[CAPTION])["input_ids"])
    expected = max(100 * float(torch.nn.functional.cosine_similarity(img, txt)), 0.0)
    assert float(clip_score(image, CAPTION, model_name_or_path=lambda: clip)) == pytest.approx(expected, rel=1e-4)


def test_summaries_report_the_seed_spread():
    videos = [{"seed": s, "prompt": p, "caption_agreement": a} for s, p, a in
              [(0, "x", 1.0), (0, "y", 0.5), (1, "x", 0.0), (1, "y", 0.5)]]
    summary = lv.summarise(videos)["caption_agreement"]
    assert summary["mean"] == 0.5 and summary["seed_means"] == [0.75, 0.25]
    assert summary["seed_std"] == pytest.approx(np.std([0.75, 0.25], ddof=1))


def test_generate_collects_each_chunks_new_frames():
    pipe = StreamingT2VPipeline.from_base(copy.deepcopy(tp.shapes_video()), num_cam_blocks=1)
    pipe.set_progress_bar_config(disable=True)
    video = lv.generate(pipe, CAPTION, seed=0, num_chunks=3, num_inference_steps=1, height=32, width=32,
                        conditioning="replace")
    assert [c.shape for c in video.chunks] == [(16, 32, 32, 3), (8, 32, 32, 3), (8, 32, 32, 3)]
    assert len(video.peak_memory_MB) == len(video.chunk_s) == 3


@pytest.mark.parametrize("argv, match", [
    (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
    (["--chunks", "0"], "--chunks must be >= 1"),
    (["--device", "cuda:7"], "CUDA device"),
])
def test_the_long_video_command_refuses_bad_arguments(tmp_path, capsys, argv, match):
    assert main(["long-video", "--out", str(tmp_path / "r.json"), *argv]) == 2
    assert match in capsys.readouterr().err
