"""Decode and sample frames from encoded video (or image) bytes with PyAV.

Time is in seconds on the video stream's own clock, 0 at its first frame. The
frame "at" time t is the one on screen at t: the last frame whose presentation
time is <= t (the first frame for t before it).

Only the frames needed are decoded. The packets are demuxed first (cheap: no
decoding) up to the last target, which gives every frame's presentation time;
decoding then starts at the keyframe before the first needed frame, jumps ahead
to the keyframe before a later needed frame when the frames in between are not
needed, skips frames nothing references (skip_frame=NONREF) and stops after the
last needed frame. Only the chosen frames are converted to RGB, by swscale
straight to the output size (one scaler reused for the whole clip). The result
equals a plain decode of every frame, bit for bit.

Frame sampling (`sample_times`), for T frames of the clip [start, end):
  segments  T equal segments; one random time in each in training (Frozen in
            Time, X-Pool), the middle of each otherwise.
  uniform   the middle of each of T equal segments, in training too.
  fps       T times 1/fps apart in a random window in training (video
            diffusion), the centred window otherwise.

`decode_clip` turns bytes into uint8 [T, H, W, 3]: sample, decode, apply the
rotation metadata, resize the shorter side to `resolution`, crop a square
(random or centre), optionally flip. Clips with fewer frames than T repeat
frames ("repeat", the default) or keep each distinct frame once and pad with
black frames ("pad"); `frame_mask` [T] is False for padding.

Failures (not a video, unknown codec, no frames, truncated or corrupt data
before a needed frame) raise `DecodeError`.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import math
from collections.abc import Callable, Sequence

import av
import numpy as np

SAMPLING_MODES = ("segments", "uniform", "fps")
SHORT_CLIP_MODES = ("repeat", "pad")
CROP_MODES = ("center", "random")

# Demuxers that read a single still image (PyAV names them <codec>_pipe).
_IMAGE_FORMAT_SUFFIX = "_pipe"


class DecodeError(ValueError):
    """Encoded media that cannot be decoded (not a video, unknown codec, no frames, truncated)."""


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """What the container header (and the first frame) say about a video or image."""

    codec: str
    width: int  # as displayed, i.e. after the rotation
    height: int
    num_frames: int
    fps: float  # average frame rate; 0 for an image
    duration: float  # seconds of the video stream; 0 for an image
    rotation: int  # degrees counter-clockwise the stored frames are turned for display: 0, 90, 180 or 270
    is_image: bool


def _open(data: bytes) -> av.container.InputContainer:
    if not data:
        raise DecodeError("empty input (0 bytes)")
    try:
        return av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise DecodeError(f"not a readable video or image ({_reason(e)})") from None


def _reason(error: BaseException) -> str:
    """'InvalidDataError: Invalid data found when processing input', without PyAV's errno and call name."""
    text = getattr(error, "strerror", None) or str(error).split(": '", 1)[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _normalised_rotation(degrees: float) -> int:
    return int(round(degrees / 90.0)) % 4 * 90


class VideoReader:
    """One open video: its header information and frames at given times.

    `threads` is the decoder's thread count (1: decode in the calling thread;
    0: as many as FFmpeg likes). In Grain workers, 1 per worker is the
    predictable choice: the workers are the parallelism.
    """

    def __init__(self, data: bytes, threads: int = 1):
        self._data, self._threads = data, threads
        self._open()
        stream = self._stream
        self.codec = stream.codec_context.name
        name = self._container.format.name
        self.is_image = name.endswith(_IMAGE_FORMAT_SUFFIX) or name == "image2"
        self._time_base = stream.time_base
        self._start_pts = stream.start_time if stream.start_time is not None else 0
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        self.fps = float(rate) if rate and not self.is_image else 0.0
        self._first = None
        self._at_start = True  # nothing demuxed since opening or rewinding
        self.frames_decoded = 0  # frames that came out of the decoder (tests, benchmarks)

    def _open(self) -> None:
        self._container = _open(self._data)
        streams = self._container.streams.video
        if not streams:
            self.close()
            raise DecodeError("no video stream")
        self._stream = streams[0]
        context = self._stream.codec_context
        if context is None:  # (a codec FFmpeg knows but cannot decode fails at the first packet)
            self.close()
            raise DecodeError("no decoder for this codec")
        context.thread_count = self._threads
        context.thread_type = "AUTO" if self._threads != 1 else "SLICE"

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- header information -----

    def header_num_frames(self) -> int:
        return int(self._stream.frames or 0)

    def header_duration(self) -> float:
        """The video stream's duration from the header (0 when the header does not say)."""
        stream = self._stream
        if stream.duration and self._time_base:
            return float(stream.duration * self._time_base)
        return 0.0

    def count_packets(self) -> tuple[int, float]:
        """(frames, duration in seconds) by demuxing every packet (no decoding); rewinds afterwards."""
        count, first, last_end = 0, None, None
        self._at_start = False
        for packet in self._container.demux(self._stream):
            if packet.size == 0 or packet.pts is None:
                continue
            count += 1
            first = packet.pts if first is None else min(first, packet.pts)
            end = packet.pts + (packet.duration or 0)
            last_end = end if last_end is None else max(last_end, end)
        self._rewind()
        duration = float((last_end - first) * self._time_base) if count and self._time_base else 0.0
        return count, duration

    def info(self, count_frames: bool = True) -> MediaInfo:
        """Header information and the first frame's size and rotation.

        When the header gives no frame count or duration (mkv/webm), they are counted
        from the packets if `count_frames` (no decoding), else left at 0.
        """
        first = self.first_frame()
        rotation = _normalised_rotation(first.rotation)
        width, height = first.width, first.height
        if rotation in (90, 270):
            width, height = height, width
        if self.is_image:
            return MediaInfo(self.codec, width, height, 1, 0.0, 0.0, rotation, True)
        num_frames, duration = self.header_num_frames(), self.header_duration()
        if (not num_frames or not duration) and count_frames:
            counted_frames, counted_duration = self.count_packets()
            num_frames = num_frames or counted_frames
            duration = duration or counted_duration
        if not duration and num_frames and self.fps:
            duration = num_frames / self.fps
        fps = self.fps or (num_frames / duration if duration else 0.0)
        return MediaInfo(self.codec, width, height, max(num_frames, 1), fps, duration, rotation, False)

    def first_frame(self) -> av.VideoFrame:
        """The first frame (decoded once); a video is rewound to its start afterwards."""
        if self._first is None:
            self._at_start = False
            try:
                self._first = next(iter(self._container.decode(self._stream)), None)
            except (av.FFmpegError, ValueError, OSError) as e:
                raise DecodeError(f"first frame does not decode ({_reason(e)})") from None
            if self._first is None:
                raise DecodeError("no frames")
            if not self.is_image:
                self._rewind()
        return self._first

    def _rewind(self) -> None:
        try:
            self._container.seek(self._start_pts, stream=self._stream, backward=True, any_frame=False)
        except av.FFmpegError:  # a demuxer that cannot seek: open the bytes again
            self._container.close()
            self._open()
        self._at_start = True

    # ----- frames at times -----

    def _pts(self, seconds: float) -> int:
        return self._start_pts + int(math.floor(seconds / float(self._time_base) + 1e-6))

    def _packets_until(self, last_target: int) -> tuple[list[av.Packet], bool]:
        """Packets in decode order, up to the first one decoded after `last_target` (or the end).

        Returns (packets, reached_end). Demuxing only reads the container: it is cheap
        next to decoding.
        """
        packets, after = [], 0
        for packet in self._container.demux(self._stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            packets.append(packet)
            # pts >= dts and dts only grows: once packets decode after the last target, no
            # later packet shows at or before it. (Two such packets, for slack.)
            if packet.dts is not None and packet.dts > last_target:
                after += 1
                if after == 2:
                    return packets, False
        return packets, True

    def frames_at(
        self, times: Sequence[float], convert: Callable[[av.VideoFrame], np.ndarray]
    ) -> tuple[list[np.ndarray], list[int]]:
        """The frames on screen at `times` (seconds), as `convert(frame)`, and each one's pts.

        A frame picked for several times is converted once (the same array is returned).
        Raises DecodeError if the data ends, or turns out corrupt, before a needed frame.

        The plan, from the packets' presentation times (demuxed first, no decoding): the
        frame for time t is the packet with the largest pts <= t. Decoding starts at the
        keyframe before the first needed packet; a later needed packet whose keyframe lies
        beyond the packets sent so far is reached by draining the decoder and jumping to
        that keyframe. Packets that are not needed are sent with skip_frame=NONREF, so
        frames no other frame references (most B-frames) are not decoded at all; once the
        last needed packet is sent, the decoder is drained instead of decoding further.
        """
        if self.is_image:
            array = convert(self.first_frame())
            return [array] * len(times), [0] * len(times)
        if not self._at_start:
            self._rewind()
        self._at_start = False
        targets = [self._pts(max(float(t), 0.0)) for t in times]
        try:
            packets, reached_end = self._packets_until(max(targets))
        except (av.FFmpegError, ValueError, OSError) as e:
            raise DecodeError(f"corrupt container ({_reason(e)})") from None
        if not packets:
            raise DecodeError("no frames (no video packets)")
        if any(packet.pts is None for packet in packets):
            return self._frames_at_sequentially(times, targets, convert)

        # The frame for each target: index (decode order) of the packet with the largest pts <= it.
        by_pts = sorted(range(len(packets)), key=lambda i: packets[i].pts)
        sorted_pts = [packets[i].pts for i in by_pts]
        wanted = []
        for target in targets:
            j = bisect.bisect_right(sorted_pts, target) - 1
            wanted.append(by_pts[max(j, 0)])
        if reached_end:
            last_pts = sorted_pts[-1]
            missing = self.header_num_frames() - len(packets)
            late = max(targets) - last_pts
            tolerance = self._pts(2.5 / self.fps if self.fps else 0.5) - self._start_pts
            if late > tolerance and (missing > 0 or not self.header_num_frames()):
                last = float((last_pts - self._start_pts) * self._time_base)
                raise DecodeError(
                    f"data ends at {last:.3f}s, before the frame at {max(times):.3f}s"
                    f" ({len(packets)} of {self.header_num_frames() or '?'} frames; truncated?)"
                )

        # Keyframe to start from, for each packet: the last keyframe at or before it in
        # decode order; for a leading picture (shown before its keyframe: open GOP), the one
        # before that, since it references the previous GOP.
        keyframes = [i for i, packet in enumerate(packets) if packet.is_keyframe] or [0]

        def start_of(i: int) -> int:
            k = bisect.bisect_right(keyframes, i) - 1
            if k < 0:
                return 0
            if packets[i].pts < packets[keyframes[k]].pts and k > 0:
                k -= 1
            return keyframes[k]

        needed = sorted(set(wanted))
        needed_pts = {packets[i].pts for i in needed}
        arrays: dict[int, np.ndarray] = {}
        context = self._stream.codec_context

        def take(frames):
            for frame in frames:
                self.frames_decoded += 1
                if frame.pts in needed_pts and frame.pts not in arrays:
                    arrays[frame.pts] = convert(frame)

        def run(skip: str) -> None:
            position = -1  # last packet sent
            for i in needed:
                if packets[i].pts in arrays:
                    continue
                first = start_of(i)
                if first > position:
                    if position >= 0:
                        take(context.decode(None))  # drain, then start afresh at the keyframe
                        context.flush_buffers()
                    position = first - 1
                for j in range(position + 1, i + 1):
                    context.skip_frame = "DEFAULT" if packets[j].pts in needed_pts else skip
                    take(context.decode(packets[j]))
                position = max(position, i)
            context.skip_frame = "DEFAULT"
            take(context.decode(None))

        try:
            if not context.is_open:  # open it decoding everything: some decoders read skip_frame once
                context.skip_frame = "DEFAULT"
                context.open(strict=False)
            run("NONREF")
            if any(packets[i].pts not in arrays for i in needed):
                # A decoder that skipped a frame it was asked for: once more, skipping nothing.
                context.flush_buffers()
                run("DEFAULT")
        except (av.FFmpegError, ValueError, OSError) as e:
            raise DecodeError(f"corrupt data ({_reason(e)})") from None
        missing = [packets[i].pts for i in needed if packets[i].pts not in arrays]
        if missing:
            raise DecodeError(f"{len(missing)} needed frame(s) did not decode (corrupt data?)")
        return [arrays[packets[i].pts] for i in wanted], [packets[i].pts for i in wanted]

    def _frames_at_sequentially(self, times, targets, convert):
        """Fallback for streams without packet timestamps: decode from the start, in order."""
        self._rewind()
        self._at_start = False
        frames: list[tuple[int, av.VideoFrame]] = []
        try:
            for n, frame in enumerate(self._container.decode(self._stream)):
                self.frames_decoded += 1
                pts = frame.pts if frame.pts is not None else n
                frames.append((pts, frame))
                if pts > max(targets):
                    break
        except (av.FFmpegError, ValueError, OSError) as e:
            raise DecodeError(f"corrupt data ({_reason(e)})") from None
        if not frames:
            raise DecodeError("no frames decoded")
        pts_list = [pts for pts, _ in frames]
        cache: dict[int, np.ndarray] = {}
        arrays, keys = [], []
        for target in targets:
            j = max(bisect.bisect_right(pts_list, target) - 1, 0)
            if j not in cache:
                cache[j] = convert(frames[j][1])
            arrays.append(cache[j])
            keys.append(pts_list[j])
        return arrays, keys


def sample_times(
    num_frames: int,
    *,
    start: float,
    end: float,
    mode: str = "segments",
    rng: np.random.Generator | None = None,
    fps: float = 0.0,
) -> np.ndarray:
    """T times (seconds, float64 [T]) in the clip [start, end); `rng` None = deterministic (eval).

    For "fps", times past `end` (a clip shorter than T/fps) are kept as they are: the
    frame at them is the clip's last one.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; choose one of {', '.join(SAMPLING_MODES)}")
    length = max(end - start, 0.0)
    index = np.arange(num_frames, dtype=np.float64)
    if mode == "fps":
        if fps <= 0:
            raise ValueError(f"sampling 'fps' needs fps > 0, got {fps}")
        span = (num_frames - 1) / fps
        room = max(length - span - 1e-6, 0.0)  # window starts keeping the last time inside the clip
        offset = rng.uniform(0.0, room) if (rng is not None and room > 0) else room / 2
        return start + offset + index / fps
    segment = length / num_frames
    if mode == "segments" and rng is not None:
        return start + (index + rng.uniform(0.0, 1.0, num_frames)) * segment
    return start + (index + 0.5) * segment


@dataclasses.dataclass(frozen=True)
class Resize:
    """Shorter side to `resolution`, then a square crop; None resolution = native size, no crop."""

    resolution: int | None
    crop: str = "center"  # or "random"
    flip: bool = False  # random horizontal flip (half the clips)
    interpolation: str = "BILINEAR"


class _FrameConverter:
    """av.VideoFrame → uint8 [H, W, 3] as displayed, resized and cropped; one scaler for the clip."""

    def __init__(self, resize: Resize, rng: np.random.Generator | None):
        self.resize = resize
        self.rng = rng
        self.rotation = 0
        self._reformatter = av.video.reformatter.VideoReformatter()
        self._geometry = None  # (scaled stored w, h, crop x0, y0, flip) from the first frame

    def _plan(self, frame: av.VideoFrame):
        self.rotation = _normalised_rotation(frame.rotation)
        stored_w, stored_h = frame.width, frame.height
        turned = self.rotation in (90, 270)
        shown_w, shown_h = (stored_h, stored_w) if turned else (stored_w, stored_h)
        r = self.resize.resolution
        if r is None:
            return stored_w, stored_h, None, False
        scale = r / min(shown_w, shown_h)
        new_w, new_h = max(r, round(shown_w * scale)), max(r, round(shown_h * scale))
        if self.resize.crop == "random" and self.rng is not None:
            x0, y0 = int(self.rng.integers(0, new_w - r + 1)), int(self.rng.integers(0, new_h - r + 1))
        else:
            x0, y0 = (new_w - r) // 2, (new_h - r) // 2
        flip = bool(self.resize.flip and self.rng is not None and self.rng.random() < 0.5)
        scaled = (new_h, new_w) if turned else (new_w, new_h)
        return scaled[0], scaled[1], (x0, y0), flip

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if self._geometry is None:
            self._geometry = self._plan(frame)
        width, height, crop, flip = self._geometry
        rgb = self._reformatter.reformat(
            frame, width=width, height=height, format="rgb24", interpolation=self.resize.interpolation
        ).to_ndarray()
        if self.rotation:
            rgb = np.rot90(rgb, k=self.rotation // 90)
        if crop is not None:
            r = self.resize.resolution
            x0, y0 = crop
            rgb = rgb[y0 : y0 + r, x0 : x0 + r]
        if flip:
            rgb = rgb[:, ::-1]
        return np.ascontiguousarray(rgb)


def decode_frames(
    data: bytes, times: Sequence[float], resolution: int | None = None, threads: int = 1
) -> np.ndarray:
    """uint8 [len(times), H, W, 3]: the frames on screen at `times`, as displayed (rotation applied).

    resolution None: native size; else shorter side to `resolution` and a centre crop.
    """
    with VideoReader(data, threads=threads) as reader:
        converter = _FrameConverter(Resize(resolution), rng=None)
        arrays, _ = reader.frames_at(times, converter)
    return np.stack(arrays)


def decode_clip(
    data: bytes,
    *,
    num_frames: int,
    resolution: int,
    sampling: str = "segments",
    rng: np.random.Generator | None = None,
    start: float = 0.0,
    end: float | None = None,
    fps: float = 0.0,
    crop: str = "center",
    flip: bool = False,
    short_clips: str = "repeat",
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(video uint8 [T, R, R, 3], frame_mask bool [T]) for one clip of encoded bytes.

    `rng` drives every random choice (times, crop, flip); None = evaluation (middle
    times, centre crop, no flip). start/end: the clip within the stream, seconds
    (end None or past the stream: its end).
    """
    if short_clips not in SHORT_CLIP_MODES:
        raise ValueError(f"unknown short_clips {short_clips!r}; choose one of {', '.join(SHORT_CLIP_MODES)}")
    with VideoReader(data, threads=threads) as reader:
        duration = reader.header_duration()
        if not duration and not reader.is_image and not (end and end > 0):
            duration = reader.count_packets()[1]  # (mkv/webm headers may not say)
        clip_end = duration if end is None or end <= 0 or (duration and end > duration) else end
        clip_start = min(max(start, 0.0), max(clip_end - 1e-6, 0.0))
        times = sample_times(num_frames, start=clip_start, end=clip_end, mode=sampling, rng=rng, fps=fps)
        converter = _FrameConverter(Resize(resolution, crop, flip), rng)
        # A time past the clip's end (fps sampling) shows its last frame.
        shown = np.minimum(times, max(clip_end - 1e-3, clip_start))
        arrays, keys = reader.frames_at(shown, converter)
    mask = np.ones(num_frames, dtype=bool)
    if short_clips == "pad":
        # Each distinct frame once, in time order; the rest black with mask False. A time
        # past the clip's end (fps sampling) is padding too.
        kept, seen = [], set()
        for array, key, time in zip(arrays, keys, times):
            if key in seen or (time >= clip_end and not reader.is_image and kept):
                continue
            seen.add(key)
            kept.append(array)
        mask[len(kept) :] = False
        arrays = kept + [np.zeros_like(arrays[0])] * (num_frames - len(kept))
    return np.stack(arrays), mask


def probe(data: bytes, count_frames: bool = True) -> MediaInfo:
    """MediaInfo of encoded bytes; raises DecodeError when they hold no decodable video or image."""
    with VideoReader(data) as reader:
        return reader.info(count_frames=count_frames)
