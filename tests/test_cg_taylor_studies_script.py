"""benchmarks/cg_taylor_studies.py: its derived tables recomputed from the committed raw results match the figures
written in the results files."""

import importlib.util
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cg_taylor_studies.py")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("cg_taylor_studies", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_derived_tables_are_those_of_the_results_files(script):
    tables = [script.held_out_table(script.load("pareto_shapes_cpu_image_order_reach.json")),
              script.chosen_against_others(script.load("pareto_shapes_cpu_image_order_reach.json")),
              script.warmup_table()]
    with open(os.path.join(script.RESULTS, "pareto_shapes_cpu_image_order_reach.md")) as f:
        order_reach = f.read()
    with open(os.path.join(script.RESULTS, "pareto_shapes_cpu_warmup.md")) as f:
        warmup = f.read()
    for line in tables[0] + tables[1]:
        assert line in order_reach, line
    for line in tables[2]:
        assert line in warmup, line
    assert "| order 2, damping 0.7, order_reach 0.5 (the new default) | 23.99 (+0.04 / -0.02) |" in tables[0][-1]


def test_the_spacing_tables_are_those_of_the_results_file(script):
    runs = script.load("pareto_shapes_cpu_image_spacing.json")
    video = script.load("pareto_shapes_cpu_video_spacing.json")["seeds01_spacing_1.25"]
    tables = [script.spacing_table(runs), script.spacing_held_out(runs["seeds0123_spacing_1.25"]),
              script.spacing_held_out(video, "seed 0 / seed 1"), script.spacing_against_others(runs),
              script.spacing_video_against_others()]
    with open(os.path.join(script.RESULTS, "pareto_shapes_cpu_image_spacing.md")) as f:
        text = f.read()
    for line in (line for table in tables for line in table):
        assert line in text, line
    assert "| 0.40 | 29.13 | 30.76 | +1.38 / +1.88 |" in tables[1]


def test_the_long_video_tables_are_those_of_the_results_file(script):
    runs = script.load(script.LONG_VIDEO)
    tables = [script.long_video_table(runs), *(script.long_video_against_others(runs, key)
                                               for key in ("residual_warmup2", "residual_warmup4"))]
    with open(os.path.join(script.RESULTS, "pareto_shapes_cpu_long_video.md")) as f:
        text = f.read()
    for line in (line for table in tables for line in table):
        assert line in text, line
    assert "| 0.40 | 24.79 | 23.38 | 24.25 |  | cg_taylor |" in "\n".join(tables[1])
