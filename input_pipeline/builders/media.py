"""One manifest entry → one stored example: the media bytes (optionally re-encoded) and metadata.

Only a regular file of at most MAX_FILE_BYTES is read (not a device, a FIFO or a
folder). Without limits the file's bytes are stored as they are, after a decode
check: the frames training can ask for decode (below). With any of
`max_short_side`, `max_fps`, `max_duration` (or `reencode_all`) the clip is re-encoded to H.264 mp4
(CRF `crf`, a keyframe every `keyframe_interval` seconds so that training seeks
instead of decoding whole GOPs, rotation applied, moov atom first), cut to its
[start, end) bounds; images larger than `max_short_side` are re-encoded to JPEG.

The decode check (`check_decodes`) decodes, with the reader training uses, the
frames evaluation samples at the configs' default frame count (PROBE_NUM_FRAMES)
and the clip's last frame, so that a truncated file is skipped and reported at
build time rather than skipped on every read in training.
"""

from __future__ import annotations

import dataclasses
import fractions
import io
import math
import os
import stat
import tempfile

import av
import numpy as np
from etils import epath

from input_pipeline import video
from input_pipeline.builders.manifest import Entry


# Largest media file a build reads (a stored example holds the whole file).
MAX_FILE_BYTES = 4 * 2**30
# Frames per clip the decode check samples: the configs' default data.num_frames.
PROBE_NUM_FRAMES = 8
_PROBE_RESOLUTION = 16  # the check converts frames to RGB at this size: the decode is what is checked
_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


class UnreadableInput(ValueError):
    """An input file that cannot become an example; the build skips and reports it."""


def _too_big(size: int) -> UnreadableInput:
    return UnreadableInput(f"{size} bytes, over the {MAX_FILE_BYTES / 2**30:g} GiB limit of one media file"
                           f" (media.MAX_FILE_BYTES); cut it into clips or re-encode it smaller first")


def read_media(path: str) -> bytes:
    """The bytes of a regular file of at most MAX_FILE_BYTES; UnreadableInput otherwise."""
    try:
        if "://" in path:  # object stores hold files only
            with epath.Path(path).open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        else:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (no effect on regular files).
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            try:
                status = os.fstat(fd)  # of what was opened: no race with a swapped path
                if not stat.S_ISREG(status.st_mode):
                    kind = next((name for test, name in _FILE_KINDS if test(status.st_mode)), "not a file")
                    raise UnreadableInput(f"not a regular file ({kind}); list media files only")
                if status.st_size > MAX_FILE_BYTES:
                    raise _too_big(status.st_size)
                with open(fd, "rb", closefd=False) as f:
                    data = f.read(MAX_FILE_BYTES + 1)
            finally:
                os.close(fd)
    except OSError as e:
        raise UnreadableInput(f"cannot read ({type(e).__name__}: {e})") from None
    if len(data) > MAX_FILE_BYTES:
        raise _too_big(len(data))
    return data


def check_decodes(data: bytes, start: float, end: float) -> None:
    """Raises video.DecodeError unless the clip [start, end)'s evaluation frames (PROBE_NUM_FRAMES of
    them, as `video.decode_clip` samples them) and its last frame decode with training's reader."""
    times = video.sample_times(PROBE_NUM_FRAMES, start=start, end=end)  # [T], rng None: evaluation's
    last = max(end - 1e-3, start)  # what decode_clip shows for a time at the clip's end
    video.decode_frames(data, [*times, last], resolution=_PROBE_RESOLUTION)


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    max_short_side: int = 0  # pixels; 0 = keep
    max_fps: float = 0.0  # 0 = keep
    max_duration: float = 0.0  # seconds from the clip's start; 0 = keep
    keyframe_interval: float = 1.0  # seconds, when re-encoding
    crf: int = 23  # x264 quality, when re-encoding (lower = better, larger)
    reencode_all: bool = False  # re-encode videos within the limits too (e.g. for the keyframe spacing)

    @property
    def reencode(self) -> bool:
        return bool(self.max_short_side or self.max_fps or self.max_duration or self.reencode_all)

    def validate(self) -> None:
        for name in ("max_short_side", "max_fps", "max_duration", "keyframe_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = no limit), got {getattr(self, name)}")
        if self.max_short_side and self.max_short_side < 16:
            raise ValueError(f"max_short_side must be >= 16 pixels (or 0 = keep), got {self.max_short_side}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")


def _scaled(width: int, height: int, max_short_side: int, even: bool) -> tuple[int, int]:
    scale = min(1.0, max_short_side / min(width, height)) if max_short_side else 1.0
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    if even:  # yuv420p needs even sizes
        w, h = max(2, w - w % 2), max(2, h - h % 2)
    return w, h


def _encode_image(frame: av.VideoFrame, rotation: int, max_short_side: int) -> bytes:
    shown_w, shown_h = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
    w, h = _scaled(shown_w, shown_h, max_short_side, even=True)
    stored = (h, w) if rotation in (90, 270) else (w, h)
    rgb = frame.reformat(width=stored[0], height=stored[1], format="rgb24", interpolation="AREA").to_ndarray()
    rgb = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90)) if rotation else rgb
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="image2pipe") as container:
        stream = container.add_stream("mjpeg")
        stream.width, stream.height, stream.pix_fmt = w, h, "yuvj420p"
        stream.options = {"qmin": "1", "qmax": "3"}
        for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def transcode(data: bytes, info: video.MediaInfo, start: float, end: float, options: EncodeOptions) -> bytes:
    """The clip [start, end) of `data` as H.264 mp4 within the options' limits (rotation applied)."""
    end = min(end or info.duration, info.duration) if info.duration else end
    if options.max_duration:
        end = min(end, start + options.max_duration)
    fps = info.fps or 30.0
    out_fps = min(fps, options.max_fps) if options.max_fps else fps
    rate = fractions.Fraction(out_fps).limit_denominator(1001)
    w, h = _scaled(info.width, info.height, options.max_short_side, even=True)
    turned = info.rotation in (90, 270)
    stored = (h, w) if turned else (w, h)
    num_out = max(1, math.ceil((end - start) * out_fps - 1e-6))
    handle, path = tempfile.mkstemp(suffix=".mp4")
    os.close(handle)
    try:
        with video.VideoReader(data) as reader, av.open(path, "w", options={"movflags": "faststart"}) as out:
            stream = out.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.codec_context.gop_size = max(1, round(options.keyframe_interval * out_fps))
            stream.options = {"crf": str(options.crf), "preset": "veryfast"}
            reformatter = av.video.reformatter.VideoReformatter()

            def encode(frame: av.VideoFrame, index: int) -> None:
                if info.rotation:
                    rgb = reformatter.reformat(frame, width=stored[0], height=stored[1], format="rgb24",
                                               interpolation="AREA").to_ndarray()
                    rgb = np.ascontiguousarray(np.rot90(rgb, k=info.rotation // 90))
                    new = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                else:
                    new = reformatter.reformat(frame, width=w, height=h, format="yuv420p", interpolation="AREA")
                new.pts, new.time_base = index, 1 / rate
                for packet in stream.encode(new):
                    out.mux(packet)

            # Output frame k shows the input frame on screen at start + k / out_fps; the clip is
            # decoded once, in order.
            times = [start + k / out_fps for k in range(num_out)]
            converted = _FramePicker(reader, times)
            for index, frame in converted:
                encode(frame, index)
            for packet in stream.encode():
                out.mux(packet)
        return epath.Path(path).read_bytes()
    finally:
        os.unlink(path)


class _FramePicker:
    """(output index, frame on screen at times[index]) for sorted `times`, decoding once in order."""

    def __init__(self, reader: video.VideoReader, times: list[float]):
        self.reader, self.times = reader, times

    def __iter__(self):
        reader, times = self.reader, self.times
        targets = [reader._pts(t) for t in times]
        k, previous = 0, None
        # From the keyframe before the clip's start; a frame decoded before that start
        # is never shown, one after it is "previous" for the first targets at worst.
        reader._container.seek(targets[0], stream=reader._stream, backward=True, any_frame=False)
        try:
            for frame in reader._container.decode(reader._stream):
                pts = frame.pts if frame.pts is not None else (previous[0] + 1 if previous else 0)
                while k < len(targets) and pts > targets[k]:
                    yield k, (previous[1] if previous is not None else frame)
                    k += 1
                if k == len(targets):
                    return
                previous = (pts, frame)
        except (av.FFmpegError, ValueError, OSError) as e:
            raise video.DecodeError(f"corrupt data at {times[min(k, len(times) - 1)]:.2f}s ({video._reason(e)})") from None
        if previous is None:
            raise video.DecodeError("no frames")
        frame_time = 1 / reader.fps if reader.fps else 0.2
        if k < len(targets) and times[-1] - float((previous[0] - reader._start_pts) * reader._time_base) > 2.5 * frame_time:
            raise video.DecodeError(f"data ends before {times[-1]:.2f}s (truncated?)")
        while k < len(targets):
            yield k, previous[1]
            k += 1


def make_example(entry: Entry, options: EncodeOptions) -> dict:
    """The tfds example of a manifest entry; raises UnreadableInput (with the reason) if it cannot be one."""
    data = read_media(entry.path)
    try:
        info = video.probe(data)
        if entry.is_image and not info.is_image and info.num_frames > 1:
            raise UnreadableInput(f"listed as an image but is a video ({info.num_frames} frames)")
        is_image = entry.is_image or info.is_image
        start, end = entry.start, entry.end
        if not is_image and info.duration and start >= info.duration:
            raise UnreadableInput(f"clip starts at {start:g}s, after the video's end ({info.duration:.3f}s)")
        if is_image:
            if options.max_short_side and min(info.width, info.height) > options.max_short_side:
                with video.VideoReader(data) as reader:
                    data = _encode_image(reader.first_frame(), info.rotation, options.max_short_side)
                info = video.probe(data)
            start, end = 0.0, 0.0
        elif options.reencode:
            data = transcode(data, info, start, end, options)
            info = video.probe(data)
            start, end = 0.0, info.duration
        else:
            end = min(end, info.duration) if end else info.duration
        if not is_image:
            check_decodes(data, start, end)
    except video.DecodeError as e:
        raise UnreadableInput(str(e)) from None
    return {
        "video": data,
        "captions": list(entry.captions),
        "id": entry.id,
        "is_image": is_image,
        "start": np.float32(start),
        "end": np.float32(end),
        "duration": np.float32(info.duration),
        "fps": np.float32(info.fps),
        "num_frames": np.int32(info.num_frames),
        "width": np.int32(info.width),
        "height": np.int32(info.height),
        "rotation": np.int32(info.rotation),
        "codec": info.codec,
    }
