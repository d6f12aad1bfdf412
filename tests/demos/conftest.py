"""The demo launched as a user launches it (`python -m accel.demos.app`), in a subprocess on a free local port."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from accel.pipelines.shapes.reference import weights_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broken_pipeline_folder(root) -> str:
    """A folder that looks like a saved pipeline (its model_index.json) but whose weights are missing."""
    folder = os.path.join(root, "broken-model")
    os.makedirs(folder)
    shutil.copy(os.path.join(weights_dir("shapes-image"), "model_index.json"), folder)
    return folder


class LaunchedApp:
    def __init__(self, url: str, out: str, log: str, process: subprocess.Popen):
        self.url, self.out, self.log, self.process = url, out, log, process

    def log_text(self) -> str:
        return open(self.log).read()


@pytest.fixture(scope="session")
def demo_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, log = str(root / "out"), str(root / "app.log")
    port = _free_port()
    argv = [sys.executable, "-m", "accel.demos.app", "--port", str(port), "--out", out, "--max-chunks", "6",
            "--pipeline", broken_pipeline_folder(str(root))]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("GRADIO_TEMP_DIR", None)
    with open(log, "w") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=str(root))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"the demo did not start:\n{open(log).read()}")
            time.sleep(1)
    yield LaunchedApp(url, out, log, process)
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def settings(**changes) -> dict:
    """The /generate endpoint's arguments: a short shapes-video request unless changed."""
    base = {"prompt": "a red circle moving left", "model": "shapes-video", "mode": "plain", "cache": "cg_taylor",
            "attention": "none", "threshold": "0.1", "interval": 3, "pattern": "local_3d", "steps": 8, "seed": 0,
            "length": 9, "guidance": 4.0}
    return {**base, **changes}


def measurements(result) -> dict:
    """The Measurements output of a /generate result (outputs: video, video, image, image, summary, JSON, file)."""
    return result[5] if isinstance(result[5], dict) else json.loads(result[5])
