"""The demo's request logic without a server: settings checks, the cached unaccelerated run, patches removed
whatever happens, Stop, the model menu, output pruning and the command line."""

import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from accel.demos.app.catalog import LONG, PLAIN, Catalog, DemoError
from accel.demos.app.cli import main
from accel.demos.app.generation import REQUESTS, Acceleration, Cancelled, Result, Runner, Settings, call_pipeline, timed_run
from accel.pipelines.shapes.reference import weights_dir


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    catalog = Catalog.build([], "cpu", torch.float32)
    return Runner(catalog, str(tmp_path_factory.mktemp("demo-out")), max_chunks=3)


def image(**changes) -> Settings:
    base = dict(model="shapes-image", mode=PLAIN, prompt="a red circle", steps=4, seed=0, guidance=4.0, length=1)
    return Settings(**{**base, **changes})


def result_of(runner: Runner, settings: Settings, acceleration: Acceleration) -> Result:
    *_, result = runner.stream(settings, acceleration, threading.Event())
    return result


@pytest.mark.parametrize("changes, message", [
    ({"prompt": " "}, "Enter a prompt"),
    ({"steps": 0}, "steps must be a whole number from 1"),
    ({"seed": -1}, "seed must be"),
    ({"guidance": float("nan")}, "guidance must be between"),
    ({"model": "shapes-long-video", "mode": LONG, "length": 4}, "chunks must be a whole number from 1 to 3"),
    ({"model": "shapes-video", "length": 300}, "frames must be"),
    ({"model": "nowhere"}, "unknown model 'nowhere'"),
    ({"mode": LONG}, "offers 'plain' as mode"),
])
def test_bad_settings_refused_before_any_work(runner, changes, message):
    with pytest.raises(DemoError, match=message):
        next(runner.stream(image(**changes), Acceleration(), threading.Event()))


@pytest.mark.parametrize("acceleration, message", [
    (Acceleration(cache="cg_taylor", threshold=-1.0), "cg_taylor"),
    (Acceleration(cache="mag_cache"), "offers"),  # MagCache ships ratios for FLUX only
    (Acceleration(attention="sparse_attention"), "offers"),
])
def test_bad_acceleration_refused(runner, acceleration, message):
    with pytest.raises(DemoError, match=message):
        next(runner.stream(image(), acceleration, threading.Event()))


def test_unaccelerated_run_is_computed_once_per_settings(runner):
    first = result_of(runner, image(seed=5), Acceleration(cache="cg_taylor"))
    again = result_of(runner, image(seed=5), Acceleration(cache="taylorseer", interval=2))
    other = result_of(runner, image(seed=6), Acceleration(cache="cg_taylor"))
    assert not first.measurements["unaccelerated_from_cache"]
    assert again.measurements["unaccelerated_from_cache"]
    assert not other.measurements["unaccelerated_from_cache"]
    assert again.measurements["method"] == "taylorseer(interval=2)"


def test_no_acceleration_gives_the_unaccelerated_output(runner):
    result = result_of(runner, image(seed=7), Acceleration())
    assert result.measurements["psnr_db"] == "inf" and result.measurements["method"] == "none"


def test_patches_are_removed_after_a_run_and_after_an_error(runner):
    pipe, _ = runner.catalog.pipeline("shapes-image", PLAIN)
    plain = call_pipeline(pipe, image(seed=8, steps=12), "image", threading.Event())
    configs = Acceleration(cache="cg_taylor", threshold=10.0).configs()  # predicts every step it may
    patched = timed_run(pipe, image(seed=8, steps=12), "image", configs, threading.Event(), "cpu")
    assert patched.steps["predicted"] > 0 and not np.array_equal(patched.pixels, plain)
    stopped = threading.Event()
    stopped.set()
    with pytest.raises(Cancelled):
        timed_run(pipe, image(seed=8, steps=12), "image", configs, stopped, "cpu")
    np.testing.assert_array_equal(call_pipeline(pipe, image(seed=8, steps=12), "image", threading.Event()), plain)


def test_stop_ends_the_request_and_releases_the_model(runner):
    stopped = threading.Event()
    stopped.set()
    with pytest.raises(Cancelled):
        list(runner.stream(image(seed=9), Acceleration(cache="cg_taylor"), stopped))
    _, lock = runner.catalog.pipeline("shapes-image", PLAIN)
    assert lock.acquire(blocking=False)
    lock.release()


def test_long_video_streams_its_chunks_then_the_result(runner):
    settings = Settings("shapes-long-video", LONG, "a blue square moving right", 2, 0, 4.0, 2)
    events = list(runner.stream(settings, Acceleration(cache="cg_taylor"), threading.Event()))
    chunks, result = events[:-1], events[-1]
    assert [c.index for c in chunks] == [0, 1] and all(os.path.isfile(c.path) for c in chunks)
    assert isinstance(result, Result) and os.path.isfile(result.accelerated)


def test_a_folder_that_fails_to_load_is_tried_again(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    shutil.copy(os.path.join(weights_dir("shapes-image"), "model_index.json"), folder)
    catalog = Catalog.build([str(folder)], "cpu", torch.float32)
    with pytest.raises(DemoError, match="cannot load my-model"):
        catalog.pipeline("my-model", PLAIN)
    shutil.copytree(weights_dir("shapes-image"), folder, dirs_exist_ok=True)  # the user fixes the folder
    pipe, _ = catalog.pipeline("my-model", PLAIN)
    assert pipe is catalog.pipeline("my-model", PLAIN)[0]  # loaded once, then kept


def test_model_menu_describes_each_model():
    catalog = Catalog.build([], "cpu", torch.float32)
    assert catalog.entries["shapes-image"].kind == "image"
    assert catalog.entries["shapes-long-video"].modes == (LONG,)
    assert catalog.entries["shapes-video"].defaults["num_frames"] > 1
    assert "mag_cache" not in catalog.entries["shapes-video"].caches


def test_old_outputs_are_deleted(tmp_path):
    runner = Runner(Catalog.build([], "cpu", torch.float32), str(tmp_path), keep_minutes=1)
    old, new = (tmp_path / REQUESTS / name for name in ("old", "new"))
    for folder in (old, new):
        folder.mkdir(parents=True)
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    runner._prune()
    assert not old.exists() and new.exists()


@pytest.mark.parametrize("argv, message", [
    (["--port", "0"], "must be > 0"),
    (["--max-chunks", "many"], "expected a int"),
    (["--dtype", "float8"], "invalid choice"),
])
def test_bad_command_line_exits_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_pipeline_option_needs_a_saved_pipeline(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--pipeline", str(tmp_path)])
    assert "no model_index.json" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a missing GPU")
def test_missing_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])
    assert "cuda" in capsys.readouterr().err.lower()
