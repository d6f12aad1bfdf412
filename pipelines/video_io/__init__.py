"""Writing a video as it is generated: frames appended chunk by chunk into `path + ".partial.mp4"` with imageio,
renamed to `path` only when complete, so an interrupted run never leaves a truncated file under the final name."""

from __future__ import annotations

import os

import numpy as np


class StreamingMp4Writer:
    """`append` each finished chunk ((B, T, H, W, 3) floats in [0, 1]; the first video of the batch is written),
    then `close` (renames into place, returns the path) or, after an interruption, `abort` (deletes the partial file).
    As a context manager, an exception aborts and a normal exit closes."""

    def __init__(self, path: str | os.PathLike, fps: int):
        import imageio  # imported here: only callers that write a video need it

        self.path = os.fspath(path)
        self.tmp = f"{self.path}.partial.mp4"
        self.writer = imageio.get_writer(self.tmp, fps=fps, macro_block_size=1)
        self.done = False

    def append(self, frames: np.ndarray) -> None:
        for frame in frames[0]:
            self.writer.append_data((frame * 255).round().clip(0, 255).astype(np.uint8))

    def close(self) -> str:
        self.writer.close()
        os.replace(self.tmp, self.path)
        self.done = True
        return self.path

    def abort(self) -> None:
        """Stop the encoder (it writes the file only then) and delete what it wrote."""
        if not self.done:
            self.writer.close()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)

    def __enter__(self) -> "StreamingMp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.done:
            self.close()
        elif exc_type is not None:
            self.abort()
