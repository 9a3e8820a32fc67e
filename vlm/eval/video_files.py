"""Writing sample videos (mp4 and gif) with PyAV, and tiling several clips into one grid."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np


def grid(videos: np.ndarray, columns: int = 4) -> np.ndarray:
    """uint8 [N, T, H, W, 3] → one clip [T, rows·H, columns·W, 3] (missing cells black)."""
    n, t, h, w, c = videos.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    out = np.zeros((t, rows * h, columns * w, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, columns)
        out[:, r * h:(r + 1) * h, q * w:(q + 1) * w] = videos[i]
    return out


def write(path: str, frames: np.ndarray, fps: float = 8.0, scale: int = 1) -> str:
    """Writes uint8 [T, H, W, 3] as mp4 (H.264) or gif, by `path`'s extension; `scale` repeats pixels
    (tiny clips are unreadable at 32 px). H.264 needs even sizes: frames are padded by one pixel if not."""
    frames = np.asarray(frames, np.uint8)
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    gif = str(path).endswith(".gif")
    if not gif and (frames.shape[1] % 2 or frames.shape[2] % 2):
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("gif" if gif else "libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb8" if gif else "yuv420p"
        if not gif:
            stream.options = {"preset": "veryfast", "crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)
