"""Small media files written with PyAV, for tests, benchmarks and trying the builders out.

    write_video("a.mp4", width=90, height=66, fps=12, seconds=2)         # H.264 in mp4
    write_video("b.webm", ..., codec="libvpx-vp9")                        # VP9 in webm
    write_image("c.png", width=40, height=30)
    write_corpus(folder, num_videos=20, num_images=4)                     # media + manifest.jsonl

Frames show a gradient and a bright bar that moves one step per frame, with
seeded noise so that encoders work for it; everything is deterministic.
"""

from __future__ import annotations

import json
import os

import av
import numpy as np

_CONTAINERS = {"libx264": ".mp4", "mpeg4": ".mp4", "libvpx-vp9": ".webm", "libvpx": ".webm", "mjpeg": ".avi"}


def frame_pixels(index: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 [height, width, 3]: frame `index` of a test clip."""
    rng = np.random.default_rng([seed, index])
    x = np.linspace(0, 160, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 96, height, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(x + y + np.float32(seed % 7 * 10), (height, width, 3)).copy()
    pixels[..., 1] = 255 - pixels[..., 1]
    bar = (index * max(width // 12, 1)) % width
    pixels[:, bar : bar + max(width // 10, 2), :] = (250, 230, 40)
    pixels += rng.normal(0, 6, pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_video(
    path: str,
    *,
    width: int = 64,
    height: int = 48,
    fps: float = 25,
    seconds: float = 1.0,
    codec: str = "libx264",
    keyframe_interval: float | None = None,
    rotation: int = 0,
    seed: int = 0,
    options: dict | None = None,
    frame_times: list[float] | None = None,
) -> str:
    """Writes a test clip; `keyframe_interval` seconds (None: the encoder's default); returns `path`.

    `rotation`: display-matrix rotation metadata (degrees counter-clockwise), as phones write it.
    `frame_times`: seconds of each frame, for a variable frame rate (then `seconds` is ignored).
    """
    from fractions import Fraction

    rate = Fraction(fps).limit_denominator(1001)
    num_frames = len(frame_times) if frame_times is not None else max(1, round(seconds * fps))
    container_options = {"movflags": "faststart"} if path.endswith((".mp4", ".mov")) else {}
    with av.open(path, "w", options=container_options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if keyframe_interval is not None:
            stream.codec_context.gop_size = max(1, round(keyframe_interval * fps))
        defaults = {"libx264": {"preset": "veryfast"}, "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"}}
        stream.options = {**defaults.get(codec, {}), **(options or {})}
        if rotation:
            stream.set_display_rotation(rotation)
        if frame_times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_pixels(index, width, height, seed), format="rgb24")
            if frame_times is not None:
                frame.pts, frame.time_base = round(frame_times[index] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_image(path: str, *, width: int = 48, height: int = 36, seed: int = 0) -> str:
    """A PNG (.png) or JPEG (.jpg/.jpeg) still; returns `path`."""
    codec, pix_fmt = ("png", "rgb24") if path.endswith(".png") else ("mjpeg", "yuvj420p")
    with av.open(path, "w", format="image2pipe") as container:
        stream = container.add_stream(codec)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        frame = av.VideoFrame.from_ndarray(frame_pixels(seed, width, height, seed), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncate(path: str, fraction: float = 0.5) -> str:
    """Cuts the file to `fraction` of its bytes (a download that stopped half way)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return path


# (width, height, fps, seconds, codec, rotation): varied sizes, rates, lengths and codecs.
VARIED_VIDEOS = (
    (90, 66, 12, 2.0, "libx264", 0),
    (64, 48, 25, 1.0, "libx264", 0),
    (48, 64, 30, 1.5, "libx264", 90),
    (80, 44, 25, 3.0, "mpeg4", 0),
    (66, 90, 12, 1.0, "libvpx-vp9", 0),
    (96, 54, 30, 2.5, "libx264", 0),
    (40, 40, 15, 1.2, "mpeg4", 0),
)


def write_corpus(
    folder: str,
    *,
    num_videos: int = 20,
    num_images: int = 4,
    validation: int = 4,
    truncated: int = 0,
    garbage: int = 0,
    seed: int = 0,
) -> list[dict]:
    """Media files of VARIED_VIDEOS' kinds, images, and folder/manifest.jsonl; returns its rows.

    The last `validation` videos go to the "validation" split. `truncated` extra videos are cut
    in half after writing (the header is intact, so they build; training cannot decode them) and
    `garbage` extra files hold random bytes (the build reports and skips them).
    """
    os.makedirs(os.path.join(folder, "media"), exist_ok=True)
    rows = []
    for i in range(num_videos + truncated):
        width, height, fps, seconds, codec, rotation = VARIED_VIDEOS[i % len(VARIED_VIDEOS)]
        name = f"media/video_{i:03d}{_CONTAINERS[codec]}"
        write_video(os.path.join(folder, name), width=width, height=height, fps=fps, seconds=seconds, codec=codec,
                    rotation=rotation, seed=seed + i)
        if i >= num_videos:
            truncate(os.path.join(folder, name), 0.5)
        split = "validation" if num_videos - validation <= i < num_videos else "train"
        rows.append({"video": name, "caption": f"clip {i} of a bar moving right", "split": split})
    for i in range(num_images):
        name = f"media/image_{i:03d}.{'png' if i % 2 else 'jpg'}"
        write_image(os.path.join(folder, name), width=48 + 8 * i, height=36 + 6 * i, seed=seed + 100 + i)
        rows.append({"image": name, "captions": [f"still image {i}", f"picture number {i}"]})
    rng = np.random.default_rng(seed)
    for i in range(garbage):
        name = f"media/broken_{i:03d}.mp4"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
        rows.append({"video": name, "caption": f"broken file {i}"})
    with open(os.path.join(folder, "manifest.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows
