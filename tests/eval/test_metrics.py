import json

import numpy as np
import open_clip
import pytest
import torch

from accel.eval.harness import metrics


def _images(n=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


class _RandomFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                        torch.nn.Flatten())

    def forward(self, images):
        return self.conv(images.float() / 255)


def _extractor():
    return metrics.FeatureExtractor(_RandomFeatures().eval(), "test")


def test_psnr_is_inf_for_identical_images_and_finite_otherwise():
    x = _images()
    assert metrics.fidelity(x, x) == {"psnr": float("inf"), "ssim": pytest.approx(1.0)}
    noisy = np.clip(x.astype(int) + np.random.default_rng(1).integers(-20, 20, x.shape), 0, 255).astype(np.uint8)
    f = metrics.fidelity(noisy, x)
    assert 15 < f["psnr"] < 40 and f["ssim"] < 1


def test_psnr_pools_the_error_so_one_identical_sample_does_not_make_it_inf():
    x, other = _images(2), _images(2, seed=3)
    mixed = np.stack([x[0], other[1]])  # the first identical to the baseline, the second not
    assert metrics.fidelity(mixed, x)["psnr"] == pytest.approx(metrics.fidelity(other[1:], x[1:])["psnr"] + 10 * np.log10(2))


def test_fid_and_kid_are_left_out_below_their_sample_counts_with_the_reason():
    extractor = _extractor()  # 8 feature dimensions
    with pytest.raises(metrics.Unavailable, match="more samples a side than the test's 8 feature dimensions; this run has 8"):
        metrics.fid(_images(8), _images(8, seed=1), extractor)
    assert metrics.fid(_images(9), _images(9, seed=1), extractor)["fid_n"] == 9
    with pytest.raises(metrics.Unavailable, match="at least 10 samples a side; this run has 9"):
        metrics.kid(_images(9), _images(20, seed=1), extractor)
    kid = metrics.kid(_images(10), _images(10, seed=1), extractor)
    assert kid["kid_n"] == 10 and kid["kid_std"] > 0  # subsets of half the samples differ: a spread


def test_fid_and_kid_compare_sets_without_a_seed_in_common():
    samples, reference = _images(6), _images(6, seed=1)
    odd, even = metrics.independent_halves(samples, reference)
    assert np.array_equal(odd, samples[1::2]) and np.array_equal(even, reference[0::2])


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    x = np.concatenate([_images(32, s) for s in range(4)])
    extractor = _extractor()
    assert abs(metrics.fid(x, x, extractor)["fid"]) < 1e-3
    fids = []
    for sigma in (10, 40, 120):
        noisy = np.clip(x.astype(float) + np.random.default_rng(2).normal(0, sigma, x.shape), 0, 255).astype(np.uint8)
        fids.append(metrics.fid(noisy, x, extractor)["fid"])
    assert 0 < fids[0] < fids[1] < fids[2]


def test_fid_and_kid_are_computed_on_one_thread_whatever_the_process_has(monkeypatch):
    """A plain run and each process of `accelerate launch` have different thread counts; BLAS's rounding follows them."""
    seen, eigvals = [], torch.linalg.eigvals
    monkeypatch.setattr(torch.linalg, "eigvals", lambda m: (seen.append(torch.get_num_threads()), eigvals(m))[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        metrics.fid(_images(16), _images(16, seed=1), _extractor())
        assert seen == [1] and torch.get_num_threads() == 2  # and the caller's count is back
    finally:
        torch.set_num_threads(threads)


def test_clip_score_is_in_range(tmp_path):
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp_path / "accel-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    model = open_clip.create_model("accel-tiny-clip", pretrained=None).eval()
    score = metrics.clip_score_with(model, open_clip.get_tokenizer("accel-tiny-clip"), _images(4), ["a cat"] * 4)
    assert 0 <= score <= 100


def test_flicker_measures_frame_to_frame_change():
    still = np.repeat(_images(2)[:, None], 5, axis=1)
    assert metrics.temporal_flicker(still)["flicker"] == 0
    moving = still.copy()
    moving[:, 1::2] = 255 - moving[:, 1::2]
    assert metrics.temporal_flicker(moving)["flicker"] > 50


def test_metrics_without_weights_say_why(monkeypatch, tmp_path):
    monkeypatch.delenv("ACCEL_CLIP", raising=False)
    monkeypatch.delenv("ACCEL_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    for call in (lambda: metrics.clip_score(_images(2), ["x", "y"]), lambda: metrics.feature_extractor("some/model"),
                 lambda: metrics.lpips(_images(2), _images(2))):
        with pytest.raises(metrics.Unavailable, match="need"):
            call()
