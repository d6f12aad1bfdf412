"""The shapes pipelines' mechanics on random-init weights (the shipped weights are tested in test_reference)."""

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import accel
from accel.pipelines.shapes.models import image_transformer, video_transformer
from accel.pipelines.shapes.pipelines import ShapesImagePipeline, ShapesVideoPipeline
from accel.pipelines.shapes.text import build_text_encoder, build_tokenizer


@pytest.fixture(scope="module")
def image_pipe():
    torch.manual_seed(0)
    pipe = ShapesImagePipeline(image_transformer().eval(), FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def video_pipe():
    torch.manual_seed(0)
    pipe = ShapesVideoPipeline(video_transformer(64).eval(), build_text_encoder().eval(), build_tokenizer(),
                               FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, prompt, **kw):
    return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), **kw)


def test_image_output_types(image_pipe):
    pt = _run(image_pipe, ["a red circle", "a blue cross"], output_type="pt").images
    np_ = _run(image_pipe, ["a red circle", "a blue cross"], output_type="np").images
    pil = _run(image_pipe, "a red circle", output_type="pil").images
    assert pt.shape == (2, 3, 32, 32) and np_.shape == (2, 32, 32, 3) and pil[0].size == (32, 32)
    assert 0 <= np_.min() and np_.max() <= 1
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), np_, atol=1e-6)


def test_video_output_types(video_pipe):
    frames = _run(video_pipe, "a green square moving up", output_type="np").frames
    assert frames.shape == (1, 17, 32, 32, 3) and 0 <= frames.min() and frames.max() <= 1
    assert _run(video_pipe, "a green square moving up", output_type="pt").frames.shape == (1, 17, 3, 32, 32)


@pytest.mark.parametrize("bad", ["a purple circle", "a red circle moving sideways", "a red hexagon moving left"])
def test_captions_outside_the_vocabulary_are_refused_with_what_is_known(video_pipe, bad):
    with pytest.raises(ValueError, match="colours.*shapes"):
        _run(video_pipe, bad)


@pytest.mark.parametrize("bad", ["", "   ", []])
def test_empty_prompts_are_refused(video_pipe, bad):
    with pytest.raises(ValueError, match="non-empty"):
        _run(video_pipe, bad)


def test_image_pipeline_maps_video_style_captions_to_an_error(image_pipe):
    with pytest.raises(ValueError, match="a <colour> <shape>'"):
        _run(image_pipe, "a red circle moving left")


def _weights_in_fresh_memory(pipe):
    """Copies every loaded tensor out of the safetensors file it is mapped from.

    from_pretrained leaves weights as views into the memory-mapped file, at offsets that are not 64-byte aligned.
    MKL's CPU kernels round differently for unaligned operands on some instruction sets (a GEMV in the time
    embedder differed by 2.4e-7 with MKL_ENABLE_INSTRUCTIONS=SSE4_2, and the video by 1.7e-6 after 3 steps), so
    the same weights at another address need not give bitwise the same output. Fresh tensors are 64-byte aligned,
    as the original pipeline's are: then any difference left is the round trip's.
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in (*component.parameters(), *component.buffers()):
                tensor.data = tensor.data.clone()


def _public(config) -> dict:
    """The config's fields as JSON holds them (tuples come back as lists), without "_name_or_path" and the like."""
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers' or diffusers' config
    return json.loads(json.dumps({k: v for k, v in fields.items() if not k.startswith("_")}, default=str))


def test_save_and_reload_give_identical_outputs(image_pipe, video_pipe, tmp_path):
    for pipe, prompt, cls in ((image_pipe, "a cyan triangle", ShapesImagePipeline),
                              (video_pipe, "a cyan triangle moving down", ShapesVideoPipeline)):
        pipe.save_pretrained(tmp_path / cls.__name__)
        again = cls.from_pretrained(tmp_path / cls.__name__)
        again.set_progress_bar_config(disable=True)
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                assert _public(component.config) == _public(again.components[name].config), name
                reloaded = again.components[name].state_dict()
                assert all(torch.equal(t, reloaded[k]) for k, t in component.state_dict().items()), name
        a = _run(pipe, prompt, output_type="pt")[0]
        torch.testing.assert_close(_run(again, prompt, output_type="pt")[0], a, rtol=0, atol=1e-4)  # mapped weights
        _weights_in_fresh_memory(again)
        assert torch.equal(_run(again, prompt, output_type="pt")[0], a)


def test_callback_on_step_end_sees_and_can_replace_latents(image_pipe):
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append(i)
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = _run(image_pipe, "a red circle", output_type="pt", callback_on_step_end=callback).images
    assert seen == [0, 1, 2] and torch.allclose(out, torch.full_like(out, 0.5))


def test_accel_and_diffusers_caches_work_on_both(image_pipe, video_pipe):
    from diffusers.hooks import FirstBlockCacheConfig

    for pipe, prompt in ((image_pipe, "a red circle"), (video_pipe, "a red circle moving left")):
        base = _run(pipe, prompt, output_type="pt")[0]
        with accel.patch(pipe, threshold=0.0) as handle:
            assert torch.equal(_run(pipe, prompt, output_type="pt")[0], base)
            assert handle.stats()["per_context"].keys() == {"cond", "uncond"}
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # skips after the first step
        assert not torch.equal(_run(pipe, prompt, output_type="pt")[0], base)
        pipe.transformer.disable_cache()
        assert torch.equal(_run(pipe, prompt, output_type="pt")[0], base)


def test_direction_word_gaps_see_words_a_text_encoder_has_merged(video_pipe):
    from accel.pipelines.shapes.report import direction_word_gaps
    from accel.pipelines.shapes.text import VOCABULARY

    with torch.no_grad():
        fresh = direction_word_gaps(video_pipe)
        assert min(fresh.values()) > 0.05  # a random encoder keeps every word apart
        embeddings = video_pipe.text_encoder.get_input_embeddings().weight
        saved = embeddings.clone()
        embeddings[VOCABULARY.index("right")] = embeddings[VOCABULARY.index("left")]
        try:
            merged = direction_word_gaps(video_pipe)
        finally:
            embeddings.copy_(saved)
    assert merged["left_right"] < 1e-6 and merged["up_down"] == fresh["up_down"]


def _inputs_seen(pipe) -> list[torch.Tensor]:
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["hidden_states"]),
                                               with_kwargs=True)
    _run(pipe, "a red circle moving left", guidance_scale=1.0)
    return seen


def test_the_video_transformer_reads_where_each_pixel_is_beside_the_latents(video_pipe):
    pipe = ShapesVideoPipeline(**video_pipe.components)  # its own transformer hooks, not the shared fixture's
    pipe.set_progress_bar_config(disable=True)
    ramp = torch.linspace(-1, 1, 17), torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32)
    expected = torch.stack(torch.meshgrid(*ramp, indexing="ij")).unsqueeze(0)  # frame, row, column
    for hidden in _inputs_seen(pipe):
        assert hidden.shape == (1, 6, 17, 32, 32)
        torch.testing.assert_close(hidden[:, 3:], expected)


def test_a_video_transformer_with_fewer_position_channels_reads_the_first_of_them(video_pipe):
    from diffusers import WanTransformer3DModel

    for in_channels, error in ((3, None), (4, None), (5, None), (7, "position channels")):
        transformer = WanTransformer3DModel.from_config({**video_pipe.transformer.config, "in_channels": in_channels})
        pipe = ShapesVideoPipeline(**{**video_pipe.components, "transformer": transformer.eval()})
        pipe.set_progress_bar_config(disable=True)
        if error:
            with pytest.raises(ValueError, match=error):
                _inputs_seen(pipe)
        else:
            ramp = torch.linspace(-1, 1, 17), torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32)
            positions = torch.stack(torch.meshgrid(*ramp, indexing="ij")).unsqueeze(0)  # frame, row, column
            for hidden in _inputs_seen(pipe):
                assert hidden.shape == (1, in_channels, 17, 32, 32)
                torch.testing.assert_close(hidden[:, 3:], positions[:, : in_channels - 3])
