"""StreamingT2VPipeline on tiny random-init bases: the base unchanged by untrained memories, chunking and frame
counts, streaming, save / load, bad input, and accel.patch."""

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import FirstBlockCacheConfig, WanPipeline

import accel
import tiny_models as tm
import tiny_pipelines as tp
from accel.pipelines import StreamingT2VPipeline
from accel.pipelines.streaming_t2v import AppearancePreservationModule, ConditionalAttentionModule, load_image_encoder

PROMPT = "a red circle moving left"
CLIP_ARCH = "accel-test-tiny-clip"


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory):
    """ACCEL_CLIP's value for a tiny open_clip model: its config beside a random-init checkpoint."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 8, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
    (folder / f"{CLIP_ARCH}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{CLIP_ARCH}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(CLIP_ARCH)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "clip.safetensors")
    return f"{CLIP_ARCH}:{folder / 'clip.safetensors'}"


@pytest.fixture(scope="module")
def encoder(clip_spec):
    return load_image_encoder(clip_spec)


@pytest.fixture(scope="module")
def base():
    """The tiny shapes-like base, never hooked: the streaming pipelines are built on copies of it."""
    return tp.shapes_video()


def _streaming(base, encoder=None, **kw) -> StreamingT2VPipeline:
    pipe = StreamingT2VPipeline.from_base(copy.deepcopy(base), num_cam_blocks=1, image_encoder=encoder, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(base, encoder):
    return _streaming(base, encoder)


def _run(pipe, **kw):
    kw = {"num_chunks": 3, "num_inference_steps": 2, "guidance_scale": 4.0, "height": 32, "width": 32,
          "generator": torch.Generator().manual_seed(0), **kw}
    return pipe(PROMPT, **kw)


def _base_video(base, frames: int = 16, steps: int = 2):
    return base(PROMPT, num_frames=frames, num_inference_steps=steps, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="latent").frames


def _perturbed(pipe_builder, cam: bool = False, apm: bool = False) -> StreamingT2VPipeline:
    pipe = pipe_builder()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        if cam:
            for fusion in pipe.cam.fusions:
                fusion.to_out.weight.copy_(torch.randn(fusion.to_out.weight.shape, generator=g))
        if apm:
            pipe.apm.alpha.fill_(2.0)
    return pipe


# The base, unchanged ------------------------------------------------------------------------------------------------

def test_untrained_cam_and_apm_leave_the_base_exactly_unchanged(base, pipe):
    calls = {"cam": 0, "apm": 0}
    hooks = [pipe.cam.blocks[0].register_forward_hook(lambda *_: calls.update(cam=calls["cam"] + 1)),
             pipe.apm.resampler.register_forward_hook(lambda *_: calls.update(apm=calls["apm"] + 1))]
    try:
        video = _run(pipe, output_type="latent").frames
    finally:
        for hook in hooks:
            hook.remove()
    reference = _base_video(base)
    assert video.shape == (1, 3, 32, 32, 32)
    assert torch.equal(video[:, :, :16], reference)  # chunk 0: the base's own generation
    for chunk in (1, 2):  # conditioned chunks, from the same noise: the base's frames 8..15 bit for bit
        assert torch.equal(video[:, :, 8 + 8 * chunk: 16 + 8 * chunk], reference[:, :, 8:])
    assert calls == {"cam": 2 * 2 * 2, "apm": 1}  # CAM in both branches of every step of chunks 1-2; the anchor once


@pytest.mark.parametrize("memory", ["cam", "apm"])
def test_a_trained_memory_changes_the_conditioned_chunks_only(base, encoder, memory):
    pipe = _perturbed(lambda: _streaming(base, encoder), **{memory: True})
    video = _run(pipe, num_chunks=2, output_type="latent").frames
    reference = _base_video(base)
    assert torch.equal(video[:, :, :16], reference)
    assert not torch.allclose(video[:, :, 16:], reference[:, :, 8:], atol=1e-3)


def test_temporal_cross_attention_mixes_over_time_at_each_token_position_only():
    cam = ConditionalAttentionModule(num_blocks=1, patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=4,
                                     in_channels=3, ffn_dim=8)
    fusion = cam.fusions[0]
    g = torch.Generator().manual_seed(0)
    hidden, features = torch.randn(1, 4 * 6, 8, generator=g), torch.randn(1, 2 * 6, 8, generator=g)  # 4 / 2 frames
    assert torch.equal(cam.fuse(0, hidden, features, context_frames=2), hidden)  # zero-initialised output
    torch.nn.init.normal_(fusion.to_out.weight, generator=g)
    changed = features.clone()
    changed[:, 6 + 3] += 1.0  # conditioning frame 1, token position 3
    moved = (cam.fuse(0, hidden, changed, 2) - cam.fuse(0, hidden, features, 2)).abs().sum(-1).view(4, 6)
    assert (moved[:, 3] > 0).all() and (moved[:, [0, 1, 2, 4, 5]] == 0).all()


def test_apm_context_is_the_text_exactly_until_alpha_moves():
    apm = AppearancePreservationModule(image_embed_dim=8, context_dim=6, text_tokens=5, num_layers=2)
    g = torch.Generator().manual_seed(0)
    text, tokens = torch.randn(2, 5, 6, generator=g), apm.image_tokens(torch.randn(2, 8, generator=g))
    assert tokens.shape == (2, 16, 6)
    assert torch.equal(apm.context(1, text, tokens), text)
    with torch.no_grad():
        apm.alpha[1] = 1.0
    assert torch.equal(apm.context(0, text, tokens), text) and not torch.equal(apm.context(1, text, tokens), text)


# Chunks, frames, streaming ------------------------------------------------------------------------------------------

def test_frame_counts_are_16_plus_8k(pipe):
    for chunks in (1, 2, 4):
        frames = _run(pipe, num_chunks=chunks, guidance_scale=1.0, num_inference_steps=1).frames
        assert frames.shape == (1, 16 + 8 * (chunks - 1), 32, 32, 3) and pipe.frame_count(chunks) == frames.shape[1]
    out = _run(pipe, num_chunks=None, num_frames=32, guidance_scale=1.0, num_inference_steps=1)
    assert out.num_chunks == 3 and out.frames.shape[1] == 32
    short = _run(pipe, num_chunks=3, chunk_frames=4, overlap_frames=1, num_inference_steps=1, use_apm=False)
    assert short.frames.shape[1] == 4 + 2 * 3


def test_chunks_stream_to_the_callback_and_an_mp4_renamed_into_place(pipe, tmp_path):
    import imageio

    path, seen = tmp_path / "v.mp4", []

    def on_chunk(p, chunk, frames):
        seen.append((chunk, frames.shape))
        assert not path.exists()  # only the finished video takes the name

    steps = []
    out = _run(pipe, output_path=str(path), return_frames=True, callback_on_chunk_end=on_chunk,
               callback_on_step_end=lambda p, i, t, tensors: steps.append(i) or tensors)
    assert seen == [(0, (1, 16, 32, 32, 3)), (1, (1, 8, 32, 32, 3)), (2, (1, 8, 32, 32, 3))]
    assert steps == list(range(3 * 2))  # counted across chunks
    assert out.path == str(path) and sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]
    with imageio.get_reader(path) as video:
        assert video.count_frames() == 32
    np.testing.assert_array_equal(out.frames, _run(pipe).frames)


def test_an_error_midway_leaves_no_file_and_the_base_unhooked(base, pipe, tmp_path):
    def boom(p, chunk, frames):
        if chunk == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(pipe, output_path=str(tmp_path / "v.mp4"), callback_on_chunk_end=boom)
    assert list(tmp_path.iterdir()) == []
    one = _run(pipe, num_chunks=1, output_type="latent").frames  # no conditioning left over from the failed call
    assert torch.equal(one, _base_video(base))


def test_output_types_and_return_dict(pipe):
    np_frames = _run(pipe, num_chunks=2, num_inference_steps=1).frames
    pt = _run(pipe, num_chunks=2, num_inference_steps=1, output_type="pt").frames
    pil = _run(pipe, num_chunks=2, num_inference_steps=1, output_type="pil").frames
    (tupled,) = _run(pipe, num_chunks=2, num_inference_steps=1, return_dict=False)
    assert pt.shape == (1, 24, 3, 32, 32) and np.array_equal(pt.permute(0, 1, 3, 4, 2).numpy(), np_frames)
    assert len(pil) == 1 and len(pil[0]) == 24 and pil[0][0].size == (32, 32)
    assert np.array_equal(tupled, np_frames)


def test_a_wan_base_with_its_vae_streams_1_plus_4_frames_per_latent():
    wan, kwargs = tp.wan()
    wan.set_progress_bar_config(disable=True)
    reference = wan(**{**kwargs, "num_frames": 13, "num_inference_steps": 2, "output_type": "latent",
                       "generator": torch.Generator().manual_seed(0)}).frames
    pipe = StreamingT2VPipeline.from_base(copy.deepcopy(wan), num_cam_blocks=2, image_embed_dim=8, text_tokens=6)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt_embeds=kwargs["prompt_embeds"], negative_prompt_embeds=kwargs["negative_prompt_embeds"],
                height=16, width=16, chunk_frames=4, overlap_frames=2, num_inference_steps=2, guidance_scale=5.0,
                use_apm=False)
    latents = pipe(**call, num_chunks=2, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    assert torch.equal(latents[:, :, :4], reference) and torch.equal(latents[:, :, 4:], reference[:, :, 2:])
    seen = []
    out = pipe(**call, num_frames=21, callback_on_chunk_end=lambda p, i, f: seen.append(f.shape[1]))
    assert out.num_chunks == 2 and seen == [13, 8] and out.frames.shape == (1, 21, 16, 16, 3)
    with pytest.raises(ValueError, match=r"1 \+ 4 \(L - 1\) for L = F \+ k \(F - O\) latent frames = 13, 21, 29"):
        pipe(**call, num_frames=20)


# Save / load --------------------------------------------------------------------------------------------------------

def test_save_and_load_round_trip(base, encoder, clip_spec, tmp_path, monkeypatch):
    pipe = _perturbed(lambda: _streaming(base, encoder), cam=True, apm=True)
    pipe.save_pretrained(tmp_path)
    for component in ("cam", "apm", "transformer"):
        assert (tmp_path / component / "diffusion_pytorch_model.safetensors").is_file()
    monkeypatch.setenv("ACCEL_CLIP", clip_spec)  # the image encoder is not saved: it comes from ACCEL_CLIP
    loaded = StreamingT2VPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("cam", "apm", "transformer"):
        expected = getattr(pipe, name).state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in getattr(loaded, name).state_dict().items())
    assert torch.equal(_run(loaded, output_type="latent").frames, _run(pipe, output_type="latent").frames)
    assert StreamingT2VPipeline.from_pretrained(tmp_path, image_encoder=encoder).image_encoder is encoder


# Bad input ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arguments, error, match", [
    ({"num_chunks": None, "num_frames": 20}, ValueError, r"num_frames must be F \+ k \(F - O\) = 16, 24, 32, 40"),
    ({"overlap_frames": 16}, ValueError, r"overlap_frames must be smaller than chunk_frames \(16\)"),
    ({"num_chunks": 0}, ValueError, "num_chunks must be an integer >= 1"),
    ({"num_chunks": 2.0}, TypeError, "num_chunks must be an integer"),
    ({"num_chunks": 2, "num_frames": 24}, ValueError, "exactly one of num_chunks and num_frames"),
    ({"height": 30}, ValueError, "height must be a multiple of 4"),
    ({"output_type": "mp4"}, ValueError, "output_type must be one of"),
    ({"use_apm": "yes"}, TypeError, "use_apm must be True or False"),
])
def test_bad_arguments_are_refused_before_any_work(pipe, tmp_path, arguments, error, match):
    with pytest.raises(error, match=match):
        _run(pipe, output_path=str(tmp_path / "v.mp4"), **arguments)
    assert list(tmp_path.iterdir()) == []


def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(pipe, tmp_path):
    steps = []
    with pytest.raises(ValueError, match="is not an existing directory"):
        _run(pipe, output_path=str(tmp_path / "missing" / "v.mp4"), callback_on_step_end=lambda *a: steps.append(1))
    with pytest.raises(ValueError, match="must name an .mp4 file"):
        _run(pipe, output_path=str(tmp_path / "v.gif"))
    assert steps == [] and list(tmp_path.iterdir()) == []


def test_apm_without_image_encoder_weights_names_accel_clip(base, clip_spec, tmp_path, monkeypatch):
    pipe = _streaming(base, image_embed_dim=8)  # an APM, no image encoder
    monkeypatch.delenv("ACCEL_CLIP", raising=False)
    with pytest.raises(ValueError, match=r"ACCEL_CLIP is not set.*ACCEL_CLIP=ARCH:PATH.*use_apm=False"):
        _run(pipe, num_chunks=2)
    for value, match in ((f"{CLIP_ARCH}:{tmp_path / 'missing.safetensors'}", "is not a file"),
                         ("no-colon", "must be ARCH:PATH"),
                         (f"no-such-arch:{clip_spec.split(':', 1)[1]}", "open_clip knows no architecture 'no-such-arch'")):
        monkeypatch.setenv("ACCEL_CLIP", value)
        with pytest.raises(ValueError, match=match):
            _run(pipe, num_chunks=2)
    monkeypatch.delenv("ACCEL_CLIP")
    assert _run(pipe, num_chunks=2, use_apm=False, num_inference_steps=1).frames.shape[1] == 24  # APM explicitly off
    monkeypatch.setenv("ACCEL_CLIP", clip_spec)
    assert _run(pipe, num_chunks=2, num_inference_steps=1).frames.shape[1] == 24
    assert pipe.image_encoder is not None and pipe.image_encoder.embed_dim == 8


def test_a_base_that_is_not_a_text_to_video_model_is_refused(pipe):
    from diffusers import DDIMScheduler, DiTPipeline, WanTransformer3DModel

    with pytest.raises(TypeError, match="must be a text-to-video model, a WanTransformer3DModel; got DiTTransformer2DModel"):
        StreamingT2VPipeline.from_base(DiTPipeline(transformer=tm.dit(), vae=None, scheduler=DDIMScheduler()))
    image_to_video = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                                           text_dim=16, ffn_dim=32, num_layers=1, image_dim=8, added_kv_proj_dim=24)
    with pytest.raises(TypeError, match="image-to-video"):
        StreamingT2VPipeline(transformer=image_to_video, scheduler=pipe.scheduler, cam=pipe.cam)
    swapped = copy.copy(pipe)
    swapped.transformer = tm.dit()
    with pytest.raises(TypeError, match="must be a text-to-video model"):
        _run(swapped)


# accel.patch --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, idle, skipping", [
    ("cg_taylor", {"threshold": 0.0}, {"threshold": 1e9, "warmup_steps": 1}),
    ("first_block_cache", {"threshold": 0.0}, {"threshold": 1e9}),
])
def test_composes_with_accel_patch_and_resets_per_chunk(base, encoder, method, idle, skipping):
    pipe = _streaming(base, encoder)
    plain = _run(pipe, num_inference_steps=6, output_type="latent").frames
    with accel.patch(pipe, method=method, **idle) as handle:  # a cache that skips nothing changes nothing
        assert torch.equal(_run(pipe, num_inference_steps=6, output_type="latent").frames, plain)
        assert handle.totals()["computed"] == handle.totals()["steps"] == 3 * 6
    with accel.patch(pipe, method=method, **skipping) as handle:
        cached = _run(pipe, num_inference_steps=6, output_type="latent").frames
        totals = handle.totals()
    assert totals["generations"] == 3 and totals["steps"] == 18 and totals["computed"] < 18
    assert not torch.equal(cached, plain)
    # Untrained memories: every chunk repeats chunk 0's calls, so with the cache state reset per chunk its decisions
    # and frames repeat too.
    assert torch.equal(cached[:, :, 16:24], cached[:, :, 8:16]) and torch.equal(cached[:, :, 24:], cached[:, :, 8:16])


def test_diffusers_own_cache_is_reset_per_chunk(base, encoder):
    pipe = _streaming(base, encoder)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    try:
        cached = _run(pipe, num_inference_steps=6, output_type="latent").frames
    finally:
        pipe.transformer.disable_cache()
    assert torch.equal(cached[:, :, 16:24], cached[:, :, 8:16]) and torch.equal(cached[:, :, 24:], cached[:, :, 8:16])


def test_hooks_go_under_the_caches_or_are_refused(base):
    patched = copy.deepcopy(base)
    with accel.patch(patched, method="cg_taylor"):
        with pytest.raises(RuntimeError, match="build the StreamingT2VPipeline on the plain transformer first"):
            StreamingT2VPipeline.from_base(patched)


# Replacement conditioning (the memory-free baseline) and training's conditioning ---------------------------------------

def test_replacement_pins_each_later_chunks_overlap_to_the_previous_chunks_last_frames(base, pipe):
    latents = []
    pipe("a red circle moving left", num_chunks=2, num_inference_steps=2, guidance_scale=4.0, height=32, width=32,
         generator=torch.Generator().manual_seed(0), conditioning="replace", output_type="latent",
         callback_on_step_end=lambda p, i, t, d: latents.append(d["latents"]) or {})
    video = _base_video(base)
    assert torch.equal(latents[1], video)  # chunk 0: the base's own generation, step by step
    assert torch.allclose(latents[3][:, :, :8], video[:, :, 8:], atol=1e-6)  # chunk 1's overlap: chunk 0's last frames


def test_replacement_runs_without_the_memories_and_refuses_apm(pipe):
    calls = []
    hook = pipe.cam.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        _run(pipe, num_chunks=2, conditioning="replace")
    finally:
        hook.remove()
    assert not calls
    with pytest.raises(ValueError, match="use_apm=True asks for APM"):
        _run(pipe, conditioning="replace", use_apm=True)
    with pytest.raises(ValueError, match="conditioning"):
        _run(pipe, conditioning="memories")


def test_conditioned_feeds_the_memories_inside_and_nothing_after(base, pipe):
    perturbed = _perturbed(lambda: _streaming(base), cam=True)
    x = torch.randn(1, 3, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    text = torch.zeros(1, 8, 16)
    t = torch.tensor([500.0])
    call = lambda: perturbed.transformer(perturbed._transformer_input(x), t, text, return_dict=False)[0]  # noqa: E731
    plain = call()
    with perturbed.conditioned(perturbed._transformer_input(x[:, :, :8])):
        conditioned = call()
    assert not torch.allclose(conditioned, plain, atol=1e-4)
    assert torch.equal(call(), plain)
