"""HMARPipeline on tiny random-init models (CPU): sampling without cache, masked refinement by schedule, the schedule
saved with the pipeline, outputs and the checks on schedules, scales and class labels."""

import json

import numpy as np
import pytest
import torch

from accel.pipelines import HMARPipeline
from accel.pipelines.hmar import HMAR_MASK_SCHEDULE, VAR_SCALES, HMARTransformer, VARTokenizer
from accel.pipelines.hmar.pipeline_hmar import check_mask_schedule

SCALES = (1, 2, 4)
REFINE = [[1], [1, 3], [2, 2, 12]]


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    transformer = HMARTransformer(num_classes=5, depth=2, width=32, num_heads=2, vocab_size=64, codebook_dim=8,
                                  scales=SCALES, branch_depth=1)
    tokenizer = VARTokenizer(vocab_size=64, codebook_dim=8, scales=SCALES, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                             norm_num_groups=4)
    pipe = HMARPipeline(transformer.double().eval(), tokenizer.double().eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, schedule, seed=0, **kw):
    return pipe([1, 3], mask_schedule=schedule, generator=torch.Generator().manual_seed(seed), output_type="pt", **kw)


def test_without_refinement_tokens_follow_the_per_scale_next_scale_logits(pipe):
    """With one step per scale and greedy filtering (top_k 1), every scale's tokens are the argmax of the next-scale
    branch on the reconstruction of the scales before it."""
    out = run(pipe, [[1], [4], [16]], top_k=1, guidance_scale=0.0)
    model, tok = pipe.transformer, pipe.tokenizer
    cond = model.embeddings.condition(torch.tensor([1, 3]))
    f_hats = tok.cumulative_reconstructions(out.token_indices)
    for k in range(len(SCALES)):
        scale_input = None if k == 0 else tok.scale_input(k, f_hats[k - 1])
        assert torch.equal(model.scale_logits(k, cond, scale_input).argmax(-1), out.token_indices[k])


def test_refinement_redraws_the_least_confident_tokens(pipe):
    plain, refined = run(pipe, [[1], [4], [16]]), run(pipe, REFINE)
    assert torch.equal(plain.token_indices[0], refined.token_indices[0])
    assert not all(torch.equal(a, b) for a, b in zip(plain.token_indices[1:], refined.token_indices[1:]))
    again = run(pipe, REFINE)
    assert all(torch.equal(a, b) for a, b in zip(refined.token_indices, again.token_indices))
    guided = run(pipe, REFINE, mask_guidance_scale=1.0)
    assert all(t.shape == (2, s * s) for t, s in zip(guided.token_indices, SCALES))


def test_outputs(pipe):
    pt = run(pipe, REFINE).images
    np_ = pipe([1, 3], mask_schedule=REFINE, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert pt.shape == (2, 3, 8, 8) and isinstance(np_, np.ndarray)
    np.testing.assert_allclose(np_, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    images, tokens = pipe(torch.tensor([4]), mask_schedule=REFINE, return_dict=False)
    assert len(images) == 1 and len(tokens) == 3
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    assert len(pipe([0, 1], mask_schedule=REFINE, generator=gens).images) == 2


@pytest.mark.parametrize("schedule, error", [
    ([[1], [1, 2], [16]], r"mask_schedule\[1\] = \[1, 2\] sums to 3, but scale 1 \(2x2\) has 4 tokens"),
    ([[1], [4]], "one list per scale"),
    ([[1], [4, 0], [16]], "positive ints"),
    ([[1], [], [16]], "non-empty"),
    (None, "pass mask_schedule"),
])
def test_bad_schedules(pipe, schedule, error):
    with pytest.raises(ValueError, match=error):
        pipe([1], mask_schedule=schedule)


def _tokens(out) -> list[torch.Tensor]:
    return out.token_indices


def test_the_schedule_travels_with_the_saved_pipeline_and_is_each_calls_default(pipe, tmp_path):
    HMARPipeline(pipe.transformer, pipe.tokenizer, mask_schedule=REFINE).save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "model_index.json"))["mask_schedule"] == REFINE
    loaded = HMARPipeline.from_pretrained(tmp_path, dtype=torch.float64)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.mask_schedule == REFINE
    saved = loaded([1, 3], generator=torch.Generator().manual_seed(0), output_type="pt")
    assert all(torch.equal(a, b) for a, b in zip(_tokens(saved), _tokens(run(pipe, REFINE))))
    plain = [[1], [4], [16]]  # a call's own schedule still wins
    assert all(torch.equal(a, b) for a, b in zip(_tokens(run(loaded, plain)), _tokens(run(pipe, plain))))


def test_a_folder_saved_before_the_schedule_was_kept_loads_without_one(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.load(open(tmp_path / "model_index.json"))
    del index["mask_schedule"]
    json.dump(index, open(tmp_path / "model_index.json", "w"))
    loaded = HMARPipeline.from_pretrained(tmp_path, dtype=torch.float64)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.mask_schedule is None
    with pytest.raises(ValueError, match="pass mask_schedule"):  # no default for these scales: said, not guessed
        loaded([1])
    assert len(run(loaded, REFINE).token_indices) == len(SCALES)


def test_a_bad_pipeline_schedule_is_refused_when_the_pipeline_is_made(pipe):
    with pytest.raises(ValueError, match=r"mask_schedule\[2\] = \[2, 2\] sums to 4, but scale 2 \(4x4\) has 16"):
        HMARPipeline(pipe.transformer, pipe.tokenizer, mask_schedule=[[1], [4], [2, 2]])
    edited = HMARPipeline(pipe.transformer, pipe.tokenizer, mask_schedule=REFINE)
    edited.register_to_config(mask_schedule=[[1], [4]])  # replaced afterwards: caught at the call
    with pytest.raises(ValueError, match="one list per scale"):
        edited([1])


def test_default_schedule_is_hmars_for_vars_scales():
    assert check_mask_schedule("t", None, VAR_SCALES) == HMAR_MASK_SCHEDULE
    assert [sum(c) for c in HMAR_MASK_SCHEDULE] == [s * s for s in VAR_SCALES]


@pytest.mark.parametrize("labels, error", [([7], "unknown class ids \\[7\\]"), (True, "class_labels")])
def test_bad_class_labels(pipe, labels, error):
    with pytest.raises((ValueError, TypeError), match=error):
        pipe(labels, mask_schedule=REFINE)


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="mask_guidance_scale"):
        pipe([1], mask_schedule=REFINE, mask_guidance_scale=-1.0)
    with pytest.raises(ValueError, match="output_type"):
        pipe([1], mask_schedule=REFINE, output_type="latent")
    tokenizer = VARTokenizer(vocab_size=64, codebook_dim=8, scales=(1, 2, 3, 4), ch=16, ch_mult=(1, 2),
                             num_res_blocks=1, norm_num_groups=4)
    with pytest.raises(ValueError, match="not the tokenizer's"):
        HMARPipeline(pipe.transformer, tokenizer)
