"""accel.eval.harness.sparse_quality on a tiny run of the shipped shapes-video model: one prompt, one seed, one step,
3 frames (grid (3, 8, 8): the preset falls back to dense, logged and recorded), a tile-order pattern that keeps half
the blocks; the JSON and markdown are written whole, and the dense control sits far above the sparse pattern."""

from __future__ import annotations

import json
import math
import os

import pytest

from accel.attention.sparse import SPARSE_PRESETS, _as_pattern, _bind_family
from accel.eval.harness import cli, sparse_quality


def test_tiny_run_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "q"
    rc = cli.main(["sparse-quality", "--out", str(out), "--prompts", "a red circle moving left", "--seeds", "0",
                   "--steps", "1", "--frames", "3", "--patterns", "dense", "preset",
                   "tiled_3d(tile=(1, 8, 8), window=(0, 0, 0))"])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["sparse_quality.json", "sparse_quality.md"]  # no temporary file left
    saved = json.loads((out / "sparse_quality.json").read_text())
    assert saved["grid"] == [3, 8, 8] and saved["layers"] == 6 and saved["heads"] == 3
    rows = {r["pattern"]: r for r in saved["patterns"]}
    assert rows["preset"]["resolved"].startswith("dense(block_size=128) (fallback")
    assert rows["preset"]["density"] == 1.0 and rows["dense"]["density"] == 1.0
    tiled = rows["tiled_3d(tile=(1, 8, 8), window=(0, 0, 0))"]
    assert tiled["density"] == 0.5  # 192 tokens in 2 blocks (frames 0-1, frame 2), each frame a tile seeing itself
    for row in rows.values():
        assert set(row["psnr"]) == {"mean", "std", "min", "max"} and len(row["per_video"]) == 1
    assert rows["dense"]["psnr"]["mean"] > tiled["psnr"]["mean"] + 5
    md = (out / "sparse_quality.md").read_text()
    assert "| pattern | resolved | block density | PSNR | SSIM |" in md and "`preset`" in md
    printed = capsys.readouterr()
    assert md.strip() in printed.out and "4/4 tiled_3d" in printed.err  # the table, and progress


def test_bad_options_refused_in_one_line_before_loading(tmp_path, capsys):
    assert cli.main(["sparse-quality", "--out", str(tmp_path / "a"), "--steps", "0"]) == 2
    assert "--steps and --frames must be >= 1" in capsys.readouterr().err
    assert cli.main(["sparse-quality", "--out", str(tmp_path / "b"), "--patterns", "dense", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--patterns 'bogus': unknown sparse attention pattern 'bogus'" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_density_of_hybrid_and_dynamic_patterns():
    grid, heads, layers = (17, 8, 8), 3, 6
    hyb = _as_pattern("hybrid")
    tiled = _as_pattern("tiled_3d").build(grid, heads, "cpu").density()
    assert sparse_quality.pattern_density(hyb, grid, heads, layers) == pytest.approx((4 * tiled + 2) / 6)
    dyn = _as_pattern("dynamic(budget=0.5)")
    assert sparse_quality.pattern_density(dyn, grid, heads, layers) == pytest.approx(math.ceil(0.5 * 9) / 9)
    preset = _bind_family(_as_pattern("preset"), "wan")
    assert sparse_quality.pattern_density(preset, grid, heads, layers) == 1.0  # 1,088 tokens: the preset runs dense
    assert SPARSE_PRESETS["wan"].tiles[0] == (2, 8, 8)
