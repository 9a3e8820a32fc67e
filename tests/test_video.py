"""PyAV decoding: frames at times match a plain decode, seeking, sampling, resize/crop/flip, rotation, short clips, bad input."""

import io

import av
import numpy as np
import pytest

from input_pipeline import testing, video


def _reference(data: bytes, times) -> tuple[np.ndarray, int]:
    """Every frame decoded in order (no seeking, no skipping), then the one on screen at each time, as displayed."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [(f.pts, f.to_ndarray(format="rgb24"), f.rotation) for f in container.decode(stream)]
        start, time_base = stream.start_time or 0, float(stream.time_base)
    picked = []
    for t in times:
        shown = [f for f in frames if f[0] <= start + np.floor(t / time_base + 1e-6)] or frames[:1]
        _, pixels, rotation = shown[-1]
        picked.append(np.rot90(pixels, k=round(rotation / 90) % 4))
    return np.stack(picked), len(frames)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """{name: bytes} of small clips: codecs, containers, odd sizes, frame rates, keyframe spacing, rotation."""
    folder = tmp_path_factory.mktemp("clips")
    specs = {
        "h264_90x66_12fps": dict(width=90, height=66, fps=12, seconds=2.0),
        "h264_gop5_30fps": dict(width=64, height=48, fps=30, seconds=2.0, keyframe_interval=5 / 30),
        "mpeg4_80x44_25fps": dict(width=80, height=44, fps=25, seconds=1.6, codec="mpeg4"),
        "vp9_66x90_webm": dict(width=66, height=90, fps=12, seconds=1.0, codec="libvpx-vp9"),
        "h264_rotated_90": dict(width=48, height=64, fps=25, seconds=1.0, rotation=90),
        "h264_3_frames": dict(width=32, height=32, fps=10, seconds=0.3),
        # Variable frame rate: frames 20 ms to 250 ms apart.
        "h264_vfr": dict(width=64, height=48, fps=25, frame_times=list(np.cumsum(
            np.r_[0, np.random.default_rng(0).choice([0.02, 0.04, 0.1, 0.25], 29)]))),
    }
    clips = {}
    for name, spec in specs.items():
        ext = ".webm" if "vp9" in name else ".mp4"
        path = testing.write_video(str(folder / (name + ext)), seed=len(clips), **spec)
        clips[name] = open(path, "rb").read()
    return clips


@pytest.mark.parametrize(
    "name",
    ["h264_90x66_12fps", "h264_gop5_30fps", "mpeg4_80x44_25fps", "vp9_66x90_webm", "h264_rotated_90", "h264_vfr"],
)
def test_frames_at_times_match_a_full_decode(clips, name):
    data = clips[name]
    info = video.probe(data)
    rng = np.random.default_rng(0)
    # Unsorted, repeated, before the first frame and at the very end.
    times = np.concatenate([rng.uniform(0, info.duration, 10), [-0.5, 0.0, info.duration - 1e-3], [0.4, 0.4]])
    expected, _ = _reference(data, times)
    got = video.decode_frames(data, times)
    assert got.dtype == np.uint8 and got.shape == (len(times), info.height, info.width, 3)
    np.testing.assert_array_equal(got, expected)


def test_only_needed_frames_are_decoded(clips):
    data = clips["h264_gop5_30fps"]  # 60 frames, a keyframe every 5
    times = [1.51, 1.9]
    with video.VideoReader(data) as reader:
        arrays, _ = reader.frames_at(times, lambda frame: frame.to_ndarray(format="rgb24"))
        decoded = reader.frames_decoded
    np.testing.assert_array_equal(np.stack(arrays), _reference(data, times)[0])
    # Two GOPs (seeked to, not decoded from the start), minus frames nothing references.
    assert decoded <= 12


def test_probe_reads_metadata(clips):
    info = video.probe(clips["h264_90x66_12fps"])
    assert (info.codec, info.width, info.height, info.num_frames, info.fps, info.is_image) == (
        "h264", 90, 66, 24, 12.0, False)
    assert info.duration == pytest.approx(2.0)
    webm = video.probe(clips["vp9_66x90_webm"])  # no frame count in the header: counted from packets
    assert (webm.codec, webm.num_frames, webm.width, webm.height) == ("vp9", 12, 66, 90)
    assert webm.duration == pytest.approx(1.0, abs=0.1)
    rotated = video.probe(clips["h264_rotated_90"])  # stored 48x64, shown 64x48
    assert (rotated.width, rotated.height, rotated.rotation) == (64, 48, 90)


def test_sample_times():
    rng = np.random.default_rng(0)
    times = video.sample_times(4, start=1.0, end=3.0, mode="segments", rng=rng)
    assert all(1.0 + 0.5 * i <= t < 1.0 + 0.5 * (i + 1) for i, t in enumerate(times))
    np.testing.assert_allclose(video.sample_times(4, start=1.0, end=3.0, mode="segments"), [1.25, 1.75, 2.25, 2.75])
    np.testing.assert_allclose(video.sample_times(4, start=1.0, end=3.0, mode="uniform", rng=rng),
                               [1.25, 1.75, 2.25, 2.75])
    window = video.sample_times(4, start=0.0, end=10.0, mode="fps", rng=rng, fps=2.0)
    np.testing.assert_allclose(np.diff(window), 0.5)
    assert 0.0 <= window[0] and window[-1] < 10.0
    centred = video.sample_times(4, start=0.0, end=10.0, mode="fps", fps=2.0)
    assert centred[0] == pytest.approx(10.0 - centred[-1], abs=1e-5)
    too_long = video.sample_times(4, start=0.0, end=1.0, mode="fps", rng=rng, fps=2.0)
    np.testing.assert_allclose(too_long, [0.0, 0.5, 1.0, 1.5])  # past the end: the last frame, or padding
    with pytest.raises(ValueError, match="unknown sampling"):
        video.sample_times(4, start=0, end=1, mode="random")


def test_clip_is_resized_by_shorter_side_and_cropped(clips):
    data = clips["h264_90x66_12fps"]
    clip, mask = video.decode_clip(data, num_frames=4, resolution=32)
    assert clip.shape == (4, 32, 32, 3) and clip.dtype == np.uint8 and mask.all()
    # Eval: the middles of 4 segments, shorter side 66 → 32 (90 → 44), centre crop.
    with av.open(io.BytesIO(data)) as container:
        frames = list(container.decode(video=0))
    for i, t in enumerate([0.25, 0.75, 1.25, 1.75]):
        frame = [f for f in frames if f.time <= t + 1e-6][-1]
        small = frame.reformat(width=44, height=32, format="rgb24", interpolation="BILINEAR").to_ndarray()
        np.testing.assert_array_equal(clip[i], small[:, 6:38])
    # Training: the same rng gives the same clip; crops and flips vary between draws.
    draw = lambda seed: video.decode_clip(data, num_frames=4, resolution=32, rng=np.random.default_rng(seed),
                                          crop="random", flip=True)[0]
    np.testing.assert_array_equal(draw(1), draw(1))
    assert len({draw(seed).tobytes() for seed in range(6)}) > 1


def test_rotated_video_is_shown_upright(clips):
    data = clips["h264_rotated_90"]
    expected, _ = _reference(data, [0.5])
    clip, _ = video.decode_clip(data, num_frames=1, resolution=48, sampling="uniform", start=0.45, end=0.55)
    assert expected.shape == (1, 48, 64, 3)  # shown landscape
    with av.open(io.BytesIO(data)) as container:
        stored = [f for f in container.decode(video=0) if f.time <= 0.5][-1]
    scaled = np.rot90(stored.reformat(width=48, height=64, format="rgb24").to_ndarray(), k=1)
    np.testing.assert_array_equal(clip[0], scaled[:, 8:56])


def test_short_clips_repeat_or_pad(clips, tmp_path):
    data = clips["h264_3_frames"]  # 3 frames, 8 wanted
    repeated, mask = video.decode_clip(data, num_frames=8, resolution=16)
    assert mask.all() and len({frame.tobytes() for frame in repeated}) == 3
    padded, mask = video.decode_clip(data, num_frames=8, resolution=16, short_clips="pad")
    assert mask.tolist() == [True] * 3 + [False] * 5
    assert len({frame.tobytes() for frame in padded[:3]}) == 3 and not padded[3:].any()
    image = open(testing.write_image(str(tmp_path / "still.png"), width=40, height=30), "rb").read()
    clip, mask = video.decode_clip(image, num_frames=4, resolution=16)
    assert mask.all() and all(np.array_equal(frame, clip[0]) for frame in clip)
    clip, mask = video.decode_clip(image, num_frames=4, resolution=16, short_clips="pad")
    assert mask.tolist() == [True, False, False, False] and not clip[1:].any()


def test_images_decode_exactly(tmp_path):
    png = open(testing.write_image(str(tmp_path / "a.png"), width=45, height=33, seed=3), "rb").read()
    info = video.probe(png)
    assert (info.is_image, info.width, info.height, info.num_frames) == (True, 45, 33, 1)
    np.testing.assert_array_equal(video.decode_frames(png, [0.0])[0], testing.frame_pixels(3, 45, 33, 3))
    jpeg = open(testing.write_image(str(tmp_path / "b.jpg"), width=45, height=33), "rb").read()
    assert video.probe(jpeg).codec == "mjpeg" and video.decode_frames(jpeg, [0.0, 9.0]).shape == (2, 33, 45, 3)


def test_bad_input_raises_decode_error(clips, tmp_path):
    good = clips["h264_90x66_12fps"]
    # A file cut in half: the header (moov first) is intact, the frames after the cut are gone.
    truncated = good[: len(good) // 2]
    assert video.probe(truncated).num_frames == 24
    video.decode_frames(truncated, [0.1])  # what is there still decodes
    with pytest.raises(video.DecodeError, match="truncated|corrupt"):
        video.decode_clip(truncated, num_frames=4, resolution=16)
    for data, match in [(b"", "empty"), (b"\x00not a video" * 50, "not a readable"), (good[:200], "not a readable|no video")]:
        with pytest.raises(video.DecodeError, match=match):
            video.decode_clip(data, num_frames=2, resolution=16)
    # A valid container whose frames are all zeros: nothing decodes.
    at = good.index(b"mdat") + 4
    zeroed = good[:at] + bytes(len(good) - at)
    with pytest.raises(video.DecodeError, match="first frame does not decode"):
        video.probe(zeroed)  # what the build checks
    with pytest.raises(video.DecodeError, match="corrupt"):
        video.decode_clip(zeroed, num_frames=2, resolution=16)
