"""tfds builders: a corpus of real encoded videos and images reads back, manifests, bad inputs, re-encoding, tfds build, Beam."""

import io
import json
import os

import av
import numpy as np
import pytest

from input_pipeline import datasets, testing, video
from input_pipeline.builders import manifest, media, video_captions


def _direct_decode(path: str, times) -> np.ndarray:
    """The frames on screen at `times`, decoding the file itself from its start with PyAV."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [(f.time, f.to_ndarray(format="rgb24"), f.rotation) for f in container.decode(stream)]
    picked = []
    for t in times:
        _, pixels, rotation = ([f for f in frames if f[0] <= t + 1e-9] or frames[:1])[-1]
        picked.append(np.rot90(pixels, k=round(rotation / 90) % 4))
    return np.stack(picked)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """20 videos (4 codecs/containers, 7 sizes and rates, 1-3 s, one rotated) + 4 images, built."""
    folder = str(tmp_path_factory.mktemp("corpus"))
    rows = testing.write_corpus(folder, num_videos=20, num_images=4, validation=4)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    summary = video_captions.build(os.path.join(folder, "manifest.jsonl"), data_dir, "varied")
    return folder, rows, data_dir, summary


def test_built_dataset_reads_back_and_decodes_like_the_files(corpus):
    folder, rows, data_dir, summary = corpus
    assert summary.examples == {"train": 20, "validation": 4} and summary.num_skipped == 0
    records = [r for split in ("train", "validation") for r in datasets.records("varied", split, data_dir)]
    by_id = {r["id"].decode(): r for r in records}
    assert len(by_id) == 24
    codecs = set()
    for row in rows:
        name = row.get("video") or row["image"]
        record, path = by_id[name], os.path.join(folder, name)
        assert record["video"] == open(path, "rb").read()  # stored as it is
        info = video.probe(record["video"])
        codecs.add(info.codec)
        assert [c.decode() for c in record["captions"]] == row.get("captions", [row.get("caption")])
        assert bool(record["is_image"]) == ("image" in row)
        assert (record["width"], record["height"], record["num_frames"]) == (info.width, info.height, info.num_frames)
        assert record["fps"] == pytest.approx(info.fps) and record["duration"] == pytest.approx(info.duration)
        assert record["start"] == 0 and record["end"] == pytest.approx(info.duration)
        # Frames decoded at given times from the stored bytes match a decode of the file itself.
        times = np.random.default_rng(len(codecs)).uniform(0, max(info.duration, 0.1), 5)
        np.testing.assert_array_equal(video.decode_frames(record["video"], times), _direct_decode(path, times))
    assert codecs == {"h264", "mpeg4", "vp9", "png", "mjpeg"}
    assert {r["rotation"] for r in records} == {0, 90}
    with open(os.path.join(summary.path, "captions-validation.txt")) as f:
        assert sorted(f.read().splitlines()) == sorted(r["caption"] for r in rows if r.get("split") == "validation")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"video": "a.mp4"}\n', r"m\.jsonl:1: no caption"),
        ('\n{"video": "a.mp4", "image": "b.png", "caption": "x"}\n', r"m\.jsonl:2: give exactly one of"),
        ('{"video": "a.mp4", "caption": "x"\n', r"m\.jsonl:1: not valid JSON"),
        ('{"video": "a.mp4", "caption": "x", "start": 5, "end": 2}\n', r'"end" \(2.0\) must be after'),
        ('{"video": "a.mp4", "captions": []}\n', "non-empty list"),
        ('{"video": "a.mp4", "caption": "x", "split": "val idation"}\n', '"split" must be a name'),
        ('{"image": "a.png", "caption": "x", "start": 1}\n', "videos only"),
        ("", "no rows"),
    ],
)
def test_manifest_errors_name_the_line_and_the_fix(tmp_path, text, message):
    path = _write(tmp_path / "m.jsonl", text)
    with pytest.raises(manifest.ManifestError, match=message) as error:
        manifest.read_manifest(path)
    assert "\n" not in str(error.value)


def test_csv_manifests_and_rows_of_one_clip_merge(tmp_path):
    path = _write(
        tmp_path / "m.csv",
        'video,caption,captions,start,end,split\n'
        'clips/a.mp4,a dog runs,,,,\n'
        'clips/a.mp4,"a  puppy\n   runs",,,,\n'
        'clips/a.mp4,,"[""a cat"", ""two cats""]",1.5,3,validation\n'
        '/abs/b.mp4,a bird,,,,\n',
    )
    entries = manifest.read_manifest(path)
    assert [(e.id, e.captions, e.split, e.start, e.end) for e in entries] == [
        ("clips/a.mp4", ("a dog runs", "a puppy runs"), "train", 0.0, 0.0),
        ("clips/a.mp4#1.5-3", ("a cat", "two cats"), "validation", 1.5, 3.0),
        ("/abs/b.mp4", ("a bird",), "train", 0.0, 0.0),
    ]
    assert entries[0].path == str(tmp_path / "clips" / "a.mp4") and entries[2].path == "/abs/b.mp4"
    with pytest.raises(manifest.ManifestError, match='must name a "video" or "image" column'):
        manifest.read_manifest(_write(tmp_path / "bad.csv", "path,caption\na.mp4,x\n"))


def test_missing_files_fail_the_build_listing_them(tmp_path):
    testing.write_video(str(tmp_path / "here.mp4"), seconds=0.2)
    lines = [{"video": "here.mp4", "caption": "x"}, {"video": "gone1.mp4", "caption": "y"},
             {"video": "sub/gone2.webm", "caption": "z"}]
    path = _write(tmp_path / "m.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(manifest.ManifestError) as error:
        video_captions.build(path, str(tmp_path / "tfds"), "missing")
    message = str(error.value)
    assert "2 of the 3 media files" in message and "gone1.mp4" in message and "sub/gone2.webm" in message
    assert "\n" not in message and not (tmp_path / "tfds" / "missing").exists()


def test_unreadable_inputs_are_skipped_and_reported(tmp_path):
    testing.write_video(str(tmp_path / "good.mp4"), seconds=0.4)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "noise.webm").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "notes.txt").write_text("not a video at all")
    lines = [{"video": name, "caption": name} for name in ("good.mp4", "empty.mp4", "noise.webm", "notes.txt")]
    lines.append({"video": "good.mp4", "caption": "after its end", "start": 3.0})
    path = _write(tmp_path / "m.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    summary = video_captions.build(path, str(tmp_path / "tfds"), "partly_bad")
    assert summary.examples == {"train": 1} and summary.num_skipped == 4
    reasons = {item["id"]: item["reason"] for item in summary.skipped["train"]["inputs"]}
    assert set(reasons) == {"empty.mp4", "noise.webm", "notes.txt", "good.mp4#3-0"}
    assert "empty" in reasons["empty.mp4"] and "after the video's end" in reasons["good.mp4#3-0"]
    text = "\n".join(summary.lines())
    assert "skipped 4 unreadable input(s)" in text and "noise.webm" in text
    with open(os.path.join(summary.path, "metadata.json")) as f:
        assert json.load(f)["skipped_inputs"]["train"]["count"] == 4
    with pytest.raises(FileExistsError, match="--overwrite"):
        video_captions.build(path, str(tmp_path / "tfds"), "partly_bad")
    assert video_captions.build(path, str(tmp_path / "tfds"), "partly_bad", overwrite=True).examples == {"train": 1}


def test_reencoding_bounds_size_rate_and_length(tmp_path):
    testing.write_video(str(tmp_path / "big.mp4"), width=96, height=64, fps=30, seconds=3.0, rotation=90)
    testing.write_image(str(tmp_path / "big.png"), width=90, height=60)
    testing.truncate(testing.write_video(str(tmp_path / "cut.mp4"), width=40, height=40, fps=15, seconds=1.2,
                                         codec="mpeg4"))
    lines = [
        {"video": "big.mp4", "caption": "whole"},
        {"video": "big.mp4", "caption": "middle", "start": 1.0, "end": 2.5},
        {"image": "big.png", "caption": "still"},
        {"video": "cut.mp4", "caption": "re-encoding decodes it all, so the build finds the damage"},
    ]
    path = _write(tmp_path / "m.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    options = media.EncodeOptions(max_short_side=32, max_fps=10, max_duration=1.0, keyframe_interval=0.5)
    summary = video_captions.build(path, str(tmp_path / "tfds"), "small", options)
    records = {r["id"].decode(): r for r in datasets.records("small", "train", str(tmp_path / "tfds"))}
    for key in ("big.mp4", "big.mp4#1-2.5"):
        record = records[key]
        info = video.probe(record["video"])
        # Shown 64x96 (rotated), shorter side 64 → 32; the rotation is applied, not kept as metadata.
        assert (info.codec, info.width, info.height, info.rotation, info.fps) == ("h264", 32, 48, 0, 10.0)
        assert info.num_frames == 10 and record["duration"] == pytest.approx(1.0)
        assert (record["start"], record["end"]) == (0.0, pytest.approx(1.0))
        with av.open(io.BytesIO(record["video"])) as container:
            stream = container.streams.video[0]
            keyframes = [float(p.pts * stream.time_base) for p in container.demux(stream) if p.is_keyframe]
        assert keyframes[0] == 0 and max(np.diff(keyframes)) <= 0.5 + 1e-6  # at least every 0.5 s
    image = video.probe(records["big.png"]["video"])
    assert (image.codec, image.width, image.height) == ("mjpeg", 48, 32)
    assert summary.num_skipped == 1 and "truncated" in summary.skipped["train"]["inputs"][0]["reason"]


def test_tfds_build_command_builds_the_builder(corpus, tmp_path):
    """`tfds build input_pipeline/builders/video_captions.py --manual_dir=...`, through the tfds CLI's build code.

    (The `tfds` entry point itself imports TensorFlow for another command; its build command does not.)
    """
    simple_parsing = pytest.importorskip("simple_parsing")
    from tensorflow_datasets.scripts.cli import build

    folder = corpus[0]
    script = os.path.join(os.path.dirname(video_captions.__file__), "video_captions.py")
    args = simple_parsing.parse(build.Args, args=[script, f"--manual_dir={folder}", f"--data_dir={tmp_path}",
                                                  "--config=original"])
    args.execute()
    ids = {r["id"] for r in datasets.records("video_captions/original", "train", str(tmp_path))}
    assert ids == {r["id"] for r in datasets.records("varied", "train", corpus[2])}


def test_beam_build_matches_the_local_build(corpus, tmp_path):
    pytest.importorskip("apache_beam")
    folder, _, data_dir, _ = corpus
    summary = video_captions.build(os.path.join(folder, "manifest.jsonl"), str(tmp_path), "varied_beam",
                                   beam_pipeline_options="runner=DirectRunner,direct_num_workers=1")
    assert summary.examples == {"train": 20, "validation": 4}
    for split in ("train", "validation"):
        local = {r["id"]: (r["video"], list(r["captions"])) for r in datasets.records("varied", split, data_dir)}
        beam = {r["id"]: (r["video"], list(r["captions"])) for r in datasets.records("varied_beam", split,
                                                                                       str(tmp_path))}
        assert beam == local
