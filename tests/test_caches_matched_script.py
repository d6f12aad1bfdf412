"""benchmarks/caches_matched_gpu.py: its knob search, and its --tiny run on the CPU end to end."""

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "caches_matched_gpu.py")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("caches_matched_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("method, counts", [
    ("first_block_cache", lambda c: max(2, min(20, round(20 - 40 * c.threshold)))),  # steep, linear
    ("taylorseer", lambda c: 4 + -(-16 // c.cache_interval)),  # one step in N after 4 warm-up steps
])
def test_the_search_finds_the_knob_closest_to_each_target(script, monkeypatch, method, counts):
    monkeypatch.setattr(script, "computed_steps", lambda b, config, inputs: counts(config))
    bench = SimpleNamespace(steps=20, inputs={}, probe={})
    best, tried = script.search(bench, method, [0.4, 0.6], trials=8)
    for target, knob in best.items():
        assert abs(tried[knob] - round(20 * target)) <= 1
        assert abs(tried[knob] - round(20 * target)) == min(abs(c - round(20 * target)) for c in tried.values())


def test_cg_taylor_takes_the_target_fraction_itself(script, monkeypatch):
    monkeypatch.setattr(script, "computed_steps", lambda b, config, inputs: round(20 * config.schedule))
    best, tried = script.search(SimpleNamespace(steps=20, inputs={}, probe={}), "cg_taylor", [0.4, 0.6], trials=8)
    assert best == {0.4: 0.4, 0.6: 0.6} and tried == {0.4: 8, 0.6: 12}


def test_tiny_run_records_results_and_methods_that_do_not_engage(tmp_path):
    out = tmp_path / "tiny.json"
    subprocess.run([sys.executable, SCRIPT, "--tiny", "--methods", "cg_taylor,sea_cache", "--out", str(out)],
                   check=True, capture_output=True)
    res = json.loads(out.read_text())
    wan, flux = res["models"]["wan"], res["models"]["flux"]
    assert wan["baseline"]["computed"] == 20 and wan["baseline"]["fraction"] == 1.0
    assert wan["methods"]["cg_taylor"]["0.4"]["computed"] == 8  # schedule=0.4 of 20 steps
    assert 0 < wan["methods"]["cg_taylor"]["0.4"]["rel_l2_vs_baseline"] < 1
    assert "0.6" in wan["methods"]["sea_cache"]
    assert "does not engage" in flux["methods"]["sea_cache"]["error"]  # SeaCache has no FLUX adapter: runs every step
