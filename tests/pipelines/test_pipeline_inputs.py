"""Every pipeline's call conventions (diffusers') and its bad inputs: refused before any work, with a message that names
the argument; loaders refuse folders whose configs and weights disagree."""

import json
import math
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import tiny_pipelines as tp
from accel.pipelines import LongSanaVideoPipeline, reference_pipeline
from accel.pipelines.long_sana_video import CausalSanaVideoTransformer3DModel
from accel.pipelines.long_sana_video.pipeline import LONG_SANA_TIMESTEPS, few_step_timesteps
from accel.pipelines.shapes.long_video import ShapesLongVideoPipeline, long_video_transformer
from accel.pipelines.shapes.models import image_transformer, video_transformer
from accel.pipelines.shapes.pipelines import ShapesImagePipeline, ShapesVideoPipeline
from accel.pipelines.shapes.text import build_text_encoder, build_tokenizer

PROMPT = {"image": "a red circle", "video": "a red circle moving left", "long": "a red circle moving left"}


def _ready(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes():
    torch.manual_seed(0)
    encoder, tokenizer, scheduler = build_text_encoder().eval(), build_tokenizer(), FlowMatchEulerDiscreteScheduler()
    config = dict(long_video_transformer(64).config, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                  num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32)
    return {
        "image": _ready(ShapesImagePipeline(image_transformer().eval(), scheduler)),
        "video": _ready(ShapesVideoPipeline(video_transformer(64).eval(), encoder, tokenizer, scheduler)),
        "long": _ready(ShapesLongVideoPipeline(CausalSanaVideoTransformer3DModel.from_config(config).eval(), encoder,
                                               tokenizer, scheduler)),
    }


@pytest.fixture(scope="module")
def sana():
    return tp.long_sana_video()


def _sana_kwargs(**kw):
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(1, 6, dtype=torch.long)
    return {**dict(prompt_embeds=torch.randn(1, 6, 16, generator=g), prompt_attention_mask=mask, negative_prompt=None,
                   chunk_frames=2, height=64, width=64, num_chunks=1), **kw}


def _assert_refused(pipe, kwargs, error, names):
    """The call raises `error` naming each of `names`, and no network of the pipeline ran before."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda module, args: calls.append(type(module).__name__))
             for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    try:
        with pytest.raises(error) as caught:
            pipe(**kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [], f"work was done before the error: {calls}"
    for name in names.split():
        assert name in str(caught.value), (name, str(caught.value))


# Bad inputs: (pipelines, keyword arguments, exception, words the message must hold) -------------------------------

GEN = torch.Generator().manual_seed(0)
COMMON = [
    (dict(num_inference_steps=0), ValueError, "num_inference_steps 0"),
    (dict(num_inference_steps=-1), ValueError, "num_inference_steps -1"),
    (dict(num_inference_steps=2.5), TypeError, "num_inference_steps 2.5"),
    (dict(num_inference_steps="2"), TypeError, "num_inference_steps"),
    (dict(guidance_scale=math.nan), ValueError, "guidance_scale nan"),
    (dict(guidance_scale=-2.0), ValueError, "guidance_scale -2.0"),
    (dict(guidance_scale="4"), TypeError, "guidance_scale"),
    (dict(output_type="jpg"), ValueError, "output_type 'jpg' latent"),
    (dict(return_dict="yes"), TypeError, "return_dict"),
    (dict(generator=0), TypeError, "generator manual_seed"),
    (dict(generator=[GEN, GEN]), ValueError, "generator 2"),
    (dict(callback_on_step_end="print"), TypeError, "callback_on_step_end"),
    (dict(callback_on_step_end_tensor_inputs=["noise_pred"]), ValueError, "callback_on_step_end_tensor_inputs noise_pred"),
    (dict(callback_on_step_end_tensor_inputs="latents"), TypeError, "callback_on_step_end_tensor_inputs"),
    (dict(prompt="a purple circle"), ValueError, "prompt colours"),
    (dict(prompt=""), ValueError, "prompt non-empty"),
    (dict(prompt=None), TypeError, "prompt None"),
    (dict(prompt=["a red circle", 3]), TypeError, "prompt"),
    (dict(height=64), ValueError, "height 64 32"),
    (dict(width=16), ValueError, "width 16 32"),
]
IMAGE = [
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt 0"),
    (dict(num_images_per_prompt=1.5), TypeError, "num_images_per_prompt"),
    (dict(latents=torch.randn(1, 3, 64, 64)), ValueError, "latents (1, 3, 32, 32) (1, 3, 64, 64)"),
    (dict(latents=np.zeros((1, 3, 32, 32))), TypeError, "latents"),
    (dict(prompt="a red circle moving left"), ValueError, "prompt <shape>'"),
]
VIDEO = [
    (dict(num_frames=0), ValueError, "num_frames 0"),
    (dict(num_frames=100), ValueError, "num_frames 100 64"),
    (dict(num_frames=8.0), TypeError, "num_frames"),
    (dict(num_videos_per_prompt=0), ValueError, "num_videos_per_prompt 0"),
    (dict(latents=torch.randn(1, 3, 5, 32, 32)), ValueError, "latents (1, 3, 17, 32, 32)"),
    (dict(prompt="a red circle"), ValueError, "prompt directions"),
]
LONG = [
    (dict(num_chunks=1.5), TypeError, "num_chunks 1.5"),
    (dict(num_chunks=0), ValueError, "num_chunks 0"),
    (dict(num_chunks=None), ValueError, "num_chunks num_frames"),
    (dict(num_frames=8), ValueError, "num_chunks num_frames"),
    (dict(num_chunks=5000), ValueError, "5000 chunks RoPE"),
    (dict(chunk_frames=8), ValueError, "chunk_frames 4"),
    (dict(keep_last_chunks=0), ValueError, "keep_last_chunks 0"),
    (dict(fps=0), ValueError, "fps 0"),
    (dict(return_frames="no"), TypeError, "return_frames"),
    (dict(return_frames=False), ValueError, "return_frames output_path"),
    (dict(callback_on_chunk_end=1), TypeError, "callback_on_chunk_end"),
    (dict(timesteps=[500.0, 900.0]), ValueError, "timesteps decreasing"),
    (dict(timesteps=[1000.0, 0.0]), ValueError, "timesteps memory"),
    (dict(timesteps=[]), ValueError, "timesteps"),
    (dict(negative_prompt="blurry"), ValueError, "negative_prompt"),
    (dict(output_path=""), ValueError, "output_path ''"),
]
CASES = ([("image", *c) for c in COMMON + IMAGE] + [("video", *c) for c in COMMON + VIDEO]
         + [("long", *c) for c in COMMON + LONG])


@pytest.mark.parametrize("kind, kw, error, names", CASES, ids=[f"{c[0]}-{list(c[1].items())[0]}"[:60] for c in CASES])
def test_bad_arguments_are_refused_before_any_work_naming_the_argument(pipes, kind, kw, error, names):
    kwargs = {"prompt": PROMPT[kind], "num_inference_steps": 1, **({"num_chunks": 1} if kind == "long" else {}), **kw}
    _assert_refused(pipes[kind], kwargs, error, names)


@pytest.mark.parametrize("where, names", [
    ("file/v.mp4", "output_path folder"),  # its parent is a file
    ("missing/v.mp4", "output_path folder"),
    ("v.gif", "output_path .mp4"),
    ("folder.mp4", "output_path written"),  # a directory
])
def test_unwritable_output_paths_are_refused_before_generating_and_nothing_is_written(pipes, tmp_path, where, names):
    (tmp_path / "file").write_text("")
    (tmp_path / "folder.mp4").mkdir()
    before = sorted(tmp_path.rglob("*"))
    kwargs = dict(prompt=PROMPT["long"], num_chunks=1, num_inference_steps=1, output_path=str(tmp_path / where))
    _assert_refused(pipes["long"], kwargs, ValueError, names)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("kw, error, names", [
    (dict(prompt="a kite"), ValueError, "prompt_embeds"),  # both
    (dict(prompt_embeds=None), ValueError, "prompt prompt_embeds"),  # neither
    (dict(prompt_embeds=torch.randn(1, 6, 8)), ValueError, "prompt_embeds 16"),
    (dict(prompt_attention_mask=None), ValueError, "prompt_attention_mask"),
    (dict(negative_prompt_embeds=torch.randn(1, 5, 16), negative_prompt_attention_mask=torch.ones(1, 5)),
     ValueError, "negative_prompt_embeds"),
    (dict(height=72), ValueError, "height 72 16"),
    (dict(height=0), ValueError, "height 0"),
    (dict(width=64.0), TypeError, "width"),
    (dict(chunk_frames=0), ValueError, "chunk_frames 0"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps 0"),
    (dict(max_sequence_length=0), ValueError, "max_sequence_length"),
])
def test_long_sana_video_bad_arguments_are_refused_before_any_work(sana, kw, error, names):
    _assert_refused(sana, _sana_kwargs(**kw), error, names)


def test_a_prompt_without_a_text_encoder_is_refused(sana):
    kwargs = {**_sana_kwargs(), "prompt": "a kite", "prompt_embeds": None, "prompt_attention_mask": None}
    _assert_refused(sana, kwargs, ValueError, "text encoder prompt_embeds")


# The call conventions ------------------------------------------------------------------------------------------------

def test_num_inference_steps_of_the_long_pipeline_default_to_the_released_schedule():
    assert few_step_timesteps(4) == LONG_SANA_TIMESTEPS
    assert few_step_timesteps(1) == (1000.0,) and len(few_step_timesteps(6)) == 6
    eight = few_step_timesteps(8)
    assert set(LONG_SANA_TIMESTEPS) <= set(eight) and list(eight) == sorted(eight, reverse=True)  # denser, same curve


def test_the_long_pipelines_run_num_inference_steps_and_call_back_each_step(pipes, sana):
    for pipe, kwargs, steps, expected in ((sana, _sana_kwargs(), None, LONG_SANA_TIMESTEPS),
                                          (sana, _sana_kwargs(), 2, few_step_timesteps(2)),
                                          (pipes["long"], dict(prompt=PROMPT["long"], num_chunks=2), 3, None)):
        seen = []

        def callback(p, step, t, tensors):
            seen.append((step, t, tuple(tensors)))
            return {}

        extra = {} if steps is None else {"num_inference_steps": steps}
        pipe(**kwargs, **extra, callback_on_step_end=callback, return_frames=True)
        chunks = kwargs["num_chunks"]
        per_chunk = len(expected) if expected else steps
        assert [s for s, _, _ in seen] == list(range(chunks * per_chunk))  # counted across chunks
        assert all(names == ("latents",) for _, _, names in seen)
        if expected:
            assert tuple(t for _, t, _ in seen) == expected


def test_callback_on_step_end_can_replace_the_long_pipelines_latents(pipes):
    out = pipes["long"](PROMPT["long"], num_chunks=1, num_inference_steps=2, output_type="pt",
                        callback_on_step_end=lambda p, i, t, k: {"latents": torch.zeros_like(k["latents"])})
    torch.testing.assert_close(out.frames, torch.full_like(out.frames, 0.5))


def test_long_video_output_types_and_return_dict(pipes):
    pipe = pipes["long"]
    run = lambda **kw: pipe(PROMPT["long"], num_chunks=2, num_inference_steps=1,  # noqa: E731
                            generator=torch.Generator().manual_seed(0), **kw)
    np_frames = run().frames
    assert np_frames.shape == (1, 8, 32, 32, 3)
    pt = run(output_type="pt").frames
    assert pt.shape == (1, 8, 3, 32, 32)
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), np_frames, atol=1e-6)
    pil = run(output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == 8 and isinstance(pil[0][0], PIL.Image.Image)
    latents = run(output_type="latent").frames
    assert latents.shape == (1, 3, 8, 32, 32)  # pixels are the shapes model's latents: [-1, 1]
    np.testing.assert_allclose((latents.permute(0, 2, 3, 4, 1).clamp(-1, 1).numpy() + 1) / 2, np_frames, atol=1e-6)
    (frames,) = run(return_dict=False)
    np.testing.assert_array_equal(frames, np_frames)


def test_shapes_pipelines_take_height_width_and_latent_output(pipes):
    image = pipes["image"](PROMPT["image"], num_inference_steps=1, height=32, width=32, output_type="latent").images
    assert image.shape == (1, 3, 32, 32) and image.min() < 0  # raw: [-1, 1]
    video = pipes["video"](PROMPT["video"], num_inference_steps=1, num_frames=5, output_type="latent").frames
    assert video.shape == (1, 3, 5, 32, 32)


def test_generator_lists_and_given_latents_of_the_right_size_are_taken(pipes):
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipes["image"](PROMPT["image"], num_images_per_prompt=2, num_inference_steps=1, generator=generators,
                         latents=None, output_type="pt").images
    assert out.shape == (2, 3, 32, 32)
    latents = torch.zeros(1, 3, 32, 32, dtype=torch.float64)  # another dtype: cast to the model's
    assert pipes["image"](PROMPT["image"], num_inference_steps=1, latents=latents, output_type="pt").images.shape[0] == 1


# Loading -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(pipes, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    for kind in ("image", "video"):
        pipes[kind].save_pretrained(root / kind)
    return root


def _edited(saved, tmp_path, kind: str, component: str, fields: dict):
    folder = tmp_path / kind
    shutil.copytree(saved / kind, folder)
    path = folder / component / "config.json"
    config = json.loads(path.read_text())
    for key, value in fields.items():
        config[key] = value
    if "num_layer" in fields:  # misspelt: the right name gone
        del config["num_layers"]
    path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kind, component, fields, error, names", [
    ("image", "transformer", dict(num_layers=8), ValueError, "missing transformer_blocks.6"),
    ("image", "transformer", dict(num_layers=4), ValueError, "not in the model transformer_blocks.4"),
    ("image", "transformer", dict(num_layer=6), ValueError, "num_layer misspelt"),  # num_layers renamed
    ("image", "transformer", dict(num_layers="6"), TypeError, "num_layers '6'"),
    ("video", "transformer", dict(num_layer=6), ValueError, "missing num_layer"),  # renamed; Wan's default: 40
    ("video", "text_encoder", dict(num_layers=3), ValueError, "missing encoder.block.2"),
])
def test_folders_whose_configs_disagree_with_their_weights_are_refused_at_load_time(saved, tmp_path, kind, component,
                                                                                   fields, error, names):
    cls = {"image": ShapesImagePipeline, "video": ShapesVideoPipeline}[kind]
    folder = _edited(saved, tmp_path, kind, component, fields)
    with pytest.raises(error) as caught:
        cls.from_pretrained(folder)
    for name in names.split():
        assert name in str(caught.value), (name, str(caught.value))


def test_dtype_names_load_that_dtype_and_unknown_ones_are_refused(saved):
    assert ShapesImagePipeline.from_pretrained(saved / "image", dtype="float16").transformer.dtype == torch.float16
    assert ShapesImagePipeline.from_pretrained(saved / "image", dtype="torch.bfloat16").transformer.dtype == torch.bfloat16
    assert reference_pipeline("shapes-image", dtype="float16").transformer.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype.*'half-ish'"):
        ShapesImagePipeline.from_pretrained(saved / "image", dtype="half-ish")
    with pytest.raises(ValueError, match="dtype.*int8"):
        reference_pipeline("shapes-image", dtype=torch.int8)
    with pytest.raises(TypeError, match="dtype.*16"):
        reference_pipeline("shapes-image", dtype=16)


def test_a_long_sana_video_folder_with_more_layers_in_its_config_than_its_weights_is_refused(sana, tmp_path):
    sana.save_pretrained(tmp_path / "pipe")
    config = tmp_path / "pipe" / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_layers": 4}))
    with pytest.raises(ValueError, match="missing from the weights.*transformer_blocks.3"):
        LongSanaVideoPipeline.from_pretrained(tmp_path / "pipe", tokenizer=None, text_encoder=None)
