"""The demo end to end through gradio_client, against the app launched in a subprocess (see conftest)."""

import os
import time
import urllib.error
import urllib.request

import imageio.v2 as imageio
import numpy as np
import pytest
from conftest import measurements, settings
from gradio_client import Client
from gradio_client.exceptions import AppError


@pytest.fixture(scope="module")
def client(demo_app):
    return Client(demo_app.url, verbose=False)


def generate(client, **changes):
    return client.predict(**settings(**changes), api_name="/generate")


def frames(path: str) -> np.ndarray:
    return np.stack(imageio.mimread(path, memtest=False))


def download(result) -> str:
    file = result[6]
    return file["value"] if isinstance(file, dict) else file


def test_image_request(client):
    result = generate(client, model="shapes-image", prompt="a red circle", steps=10)
    m = measurements(result)
    assert os.path.isfile(result[2]) and os.path.isfile(result[3])  # accelerated and unaccelerated images
    assert imageio.imread(result[2]).shape == (256, 256, 3)  # 32 px shown enlarged
    assert m["steps_steps"] == 10 and m["steps_computed"] + m["steps_predicted"] == 10
    assert m["speedup"] > 0 and m["latency_s"] > 0 and m["model"] == "shapes-image"
    again = generate(client, model="shapes-image", prompt="a red circle", steps=10, cache="first_block_cache")
    assert measurements(again)["unaccelerated_from_cache"]  # same settings: the unaccelerated run is reused
    assert measurements(again)["unaccelerated_latency_s"] == m["unaccelerated_latency_s"]


def test_video_request(client):
    result = generate(client)
    m = measurements(result)
    accelerated, unaccelerated = frames(download(result)), frames(result[1])
    assert accelerated.shape == unaccelerated.shape == (9, 256, 256, 3)
    assert m["steps_computed"] + m["steps_predicted"] == 8 and isinstance(m["psnr_db"], float)
    assert "x" in result[4] and "PSNR" in result[4]  # the summary line


def test_long_video_request_streams_its_chunks(client, demo_app):
    result = generate(client, model="shapes-long-video", mode="long video by chunks", prompt="a blue square moving up",
                      steps=4, length=3)
    m = measurements(result)
    assert m["mode"] == "long video by chunks" and m["steps_steps"] == 3 * 4
    assert frames(download(result)).shape[0] == 3 * 4  # three chunks of four frames
    chunk_files = [f for _, _, files in os.walk(demo_app.out) for f in files if f.startswith("chunk-")]
    assert len(chunk_files) >= 3


@pytest.mark.parametrize("changes, message", [
    ({"prompt": "  "}, "Enter a prompt"),
    ({"prompt": "a red dragon moving left"}, "outside what this model knows"),
    ({"length": 0}, "less than minimum value 1"),  # the page's own slider range
    ({"length": 1000}, "greater than maximum value 257"),
    ({"model": "shapes-long-video", "mode": "long video by chunks", "length": 7}, "chunks must be a whole number"),
    ({"model": "shapes-image", "mode": "long video by chunks", "prompt": "a red circle"}, "offers 'plain' as mode"),
    ({"threshold": "-1"}, "threshold"),
    ({"threshold": "fast"}, "threshold must be a number"),
    ({"attention": "linear_attention_kernels"}, "not 'linear_attention_kernels'"),
    ({"model": "broken-model", "prompt": "a red circle"}, "cannot load broken-model"),
])
def test_bad_request_answered_with_its_message(client, changes, message):
    with pytest.raises(AppError, match=message):
        generate(client, **changes)


def test_app_keeps_serving_after_bad_requests(client):
    with pytest.raises(AppError):
        generate(client, model="broken-model", prompt="a red circle")
    assert measurements(generate(client, steps=4))["steps_steps"] == 4


def test_concurrent_requests_with_different_methods_match_their_runs_alone(demo_app):
    requests = [settings(cache="cg_taylor", threshold="0.2", seed=3), settings(cache="taylorseer", interval=2, seed=3)]
    alone = [Client(demo_app.url, verbose=False).predict(**r, api_name="/generate") for r in requests]
    clients = [Client(demo_app.url, verbose=False) for _ in requests]
    jobs = [c.submit(**r, api_name="/generate") for c, r in zip(clients, requests)]
    together = [job.result(timeout=600) for job in jobs]
    for one, both in zip(alone, together):
        np.testing.assert_array_equal(frames(download(one)), frames(download(both)))
        keys = ("method", "steps_computed", "steps_predicted", "psnr_db")
        assert {k: measurements(one)[k] for k in keys} == {k: measurements(both)[k] for k in keys}
    assert measurements(together[0])["method"] != measurements(together[1])["method"]


def test_stop_cancels_a_running_request(demo_app):
    client = Client(demo_app.url, verbose=False)
    slow = settings(model="shapes-long-video", mode="long video by chunks", prompt="a green cross moving down",
                    steps=60, length=6, seed=11)  # about half a minute on 2 CPU cores
    job = client.submit(**slow, api_name="/generate")
    deadline = time.time() + 120
    while slow["prompt"] not in demo_app.log_text():  # the worker logs each request as it starts
        assert time.time() < deadline, "the request never started"
        time.sleep(0.2)
    time.sleep(1)
    stopped_at = time.time()
    assert client.predict(api_name="/stop") == "Stopped."
    job.result(timeout=60)
    assert time.time() - stopped_at < 10
    # The worker stopped and released the model: the next request on the same model runs at once.
    quick = settings(model="shapes-long-video", mode="long video by chunks", steps=2, length=1)
    assert measurements(Client(demo_app.url, verbose=False).predict(**quick, api_name="/generate"))["steps_steps"] == 2
    assert "stopped" in demo_app.log_text()


def test_serves_only_its_own_outputs(demo_app):
    readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    for path in (os.path.abspath(readme), "/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{demo_app.url}gradio_api/file={path}")
        assert refused.value.code in (403, 404)
    assert "Running on local URL:  http://127.0.0.1:" in demo_app.log_text()
