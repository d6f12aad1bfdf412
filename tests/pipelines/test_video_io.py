"""StreamingMp4Writer: the file appears under its name only when complete; an interruption leaves nothing."""

import os

import imageio
import numpy as np
import pytest

from accel.pipelines.video_io import StreamingMp4Writer


def _chunk(frames=4, value=0.5):
    return np.full((1, frames, 16, 16, 3), value, dtype=np.float32)


def test_frames_go_to_a_partial_file_renamed_on_close(tmp_path):
    path = tmp_path / "video.mp4"
    writer = StreamingMp4Writer(path, fps=8)
    writer.append(_chunk())
    writer.append(_chunk(value=0.25))
    assert not path.exists()  # the encoder may hold the frames until close; never under the final name
    assert writer.close() == str(path)
    assert path.exists() and not os.path.exists(writer.tmp)
    assert imageio.v3.imread(path).shape[0] == 8


def test_an_exception_inside_the_context_leaves_no_file(tmp_path):
    path = tmp_path / "video.mp4"
    with pytest.raises(KeyboardInterrupt):
        with StreamingMp4Writer(path, fps=8) as writer:
            writer.append(_chunk())
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_a_normal_exit_of_the_context_closes(tmp_path):
    with StreamingMp4Writer(tmp_path / "v.mp4", fps=8) as writer:
        writer.append(_chunk())
    assert os.listdir(tmp_path) == ["v.mp4"]
