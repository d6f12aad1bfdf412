"""The shipped shapes-streaming pipeline and open_clip shapes model load offline and run."""

import pytest
import torch

from accel.pipelines import reference_names, reference_pipeline
from accel.pipelines.streaming_t2v import load_image_encoder
from accel.pipelines.streaming_t2v.shapes import ShapesStreamingT2VPipeline, shapes_clip_spec


@pytest.fixture(scope="module")
def pipe():
    pipe = reference_pipeline("shapes-streaming")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shapes_streaming_is_listed_and_loads_the_shipped_base_and_clip(pipe):
    assert "shapes-streaming" in reference_names()
    assert isinstance(pipe, ShapesStreamingT2VPipeline)
    assert pipe.apm is not None and pipe.image_encoder.embed_dim == pipe.apm.config.image_embed_dim
    shipped_base = reference_pipeline("shapes-video").transformer.state_dict()
    assert all(torch.equal(v, shipped_base[k]) for k, v in pipe.transformer.state_dict().items())


def test_shapes_clip_loads_through_accel_clip():
    assert load_image_encoder(shapes_clip_spec())(torch.rand(1, 3, 32, 32)).shape[-1] == 64


def test_shapes_streaming_generates_16_plus_8k_frames(pipe):
    frames = pipe("A red circle moving left.", num_chunks=2, num_inference_steps=1,
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 24, 32, 32, 3) and 0 <= frames.min() and frames.max() <= 1


@pytest.mark.parametrize("arguments, match", [
    ({"prompt": "a red dog moving left"}, "outside what this model knows"),
    ({"height": 64}, "height"),
    ({"negative_prompt": "blurry"}, "captions only"),
])
def test_shapes_streaming_refuses_what_the_shapes_model_cannot_do(pipe, arguments, match):
    call = {"prompt": "a red circle moving left", "num_chunks": 2, **arguments}
    with pytest.raises((ValueError, TypeError), match=match):
        pipe(**call)
