"""tfds builders: a corpus of real encoded videos and images reads back, manifests, bad inputs, re-encoding, tfds build, Beam."""

import io
import json
import os
import re

import av
import numpy as np
import pytest

from input_pipeline import datasets, testing, video
from input_pipeline.builders import manifest, media, video_captions
from tests.helpers import run_vlm


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
        ('{"video": "a.mp4", "captions": "x"}\n', "a list of strings"),
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
    entries = manifest.read_manifest(path, allow_outside=True).entries
    assert [(e.id, e.captions, e.split, e.start, e.end, e.lines) for e in entries] == [
        ("clips/a.mp4", ("a dog runs", "a puppy runs"), "train", 0.0, 0.0, (2, 3)),
        ("clips/a.mp4#1.5-3", ("a cat", "two cats"), "validation", 1.5, 3.0, (5,)),
        ("/abs/b.mp4", ("a bird",), "train", 0.0, 0.0, (6,)),
    ]
    assert entries[0].path == str(tmp_path / "clips" / "a.mp4") and entries[2].path == "/abs/b.mp4"
    # Without allow_outside the absolute path outside the manifest's folder is a skipped row.
    read = manifest.read_manifest(path)
    assert len(read.entries) == 2 and [(s.line, s.id) for s in read.skipped] == [(6, "/abs/b.mp4")]
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
    reasons = {item["id"]: (item["lines"], item["reason"]) for item in summary.skipped["train"]["inputs"]}
    assert set(reasons) == {"empty.mp4", "noise.webm", "notes.txt", "good.mp4#3-0"}
    assert reasons["empty.mp4"] == ([2], "empty input (0 bytes)")
    assert reasons["good.mp4#3-0"] == ([5], "clip starts at 3s, after the video's end (0.400s)")
    text = "\n".join(summary.lines())
    assert "skipped 4 input(s), by manifest line:" in text and "  [train] line 3 noise.webm: " in text
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


# ----- rows that cannot be built: skipped and reported by manifest line, the good rows still build -----

CUT_AT = 20_000  # bytes: a download that stopped at 20 kB


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory):
    """folder/ (the manifest's): good.mp4, cut.mp4 (faststart, truncated at 20 kB), link.mp4 → outside,
    a FIFO, a sub-folder, a sparse file over the size cap; outside/x.mp4 beside it."""
    root = tmp_path_factory.mktemp("bad_media")
    folder, outside = root / "folder", root / "outside"
    folder.mkdir(), outside.mkdir()
    testing.write_video(str(folder / "good.mp4"), seconds=0.4)
    testing.write_video(str(outside / "x.mp4"), seconds=0.4)
    cut = testing.write_video(str(folder / "cut.mp4"), width=96, height=64, seconds=2.0, options={"crf": "5"})
    testing.truncate(cut, CUT_AT / os.path.getsize(cut))
    os.symlink("../outside/x.mp4", folder / "link.mp4")
    os.mkfifo(folder / "fifo.mp4")
    (folder / "sub.mp4").mkdir()
    with open(folder / "huge.mp4", "wb") as f:
        f.truncate(media.MAX_FILE_BYTES + 1)  # sparse: no disk used
    return folder, outside


def test_truncated_faststart_mp4_would_pass_the_old_probe_but_not_training(bad_media):
    """The case the build-time decode check is for: the header is intact, training cannot decode it."""
    data = (bad_media[0] / "cut.mp4").read_bytes()
    assert len(data) <= CUT_AT and video.probe(data).num_frames == 50
    with pytest.raises(video.DecodeError, match="truncated"):
        video.decode_clip(data, num_frames=8, resolution=16)


def _jsonl(row) -> bytes:
    return row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n"


@pytest.mark.parametrize(
    "row, allow_outside, reason",
    [
        ({"video": "../outside/x.mp4"}, False,
         r"outside the manifest's folder {folder} \(it resolves to {outside}/x\.mp4\); move it into that folder,"
         r" or pass --allow_outside to build files from anywhere"),
        ({"video": "{outside}/x.mp4"}, False, r"outside the manifest's folder {folder}; move it into that folder"),
        ({"video": "link.mp4"}, False, r"outside the manifest's folder {folder} \(it resolves to {outside}/x\.mp4\)"),
        ({"video": "/dev/zero"}, False, r"outside the manifest's folder {folder};"),
        ({"video": "/dev/zero"}, True, r"not a regular file \(a character device\); list media files only"),
        ({"video": "fifo.mp4"}, False, r"not a regular file \(a FIFO\); list media files only"),
        ({"video": "sub.mp4"}, False, r"not a regular file \(a folder\); list media files only"),
        ({"video": "huge.mp4"}, False,
         r"4294967297 bytes, over the 4 GiB limit of one media file \(media\.MAX_FILE_BYTES\)"),
        ({"video": "cut.mp4"}, False,
         r"data ends at 0\.\d+s, before the frame at 1\.999s \(\d of 50 frames; truncated\?\)"),
        ({"video": "good.mp4", "caption": ""}, False, r"empty caption; write a caption or remove the row"),
        ({"video": "good.mp4", "caption": " \t "}, False, r"empty caption; write a caption or remove the row"),
        ({"video": "good.mp4", "captions": ["a dog", ""]}, False, r"empty caption \(2 of 2\); write a caption"),
        ({"video": "good.mp4", "captions": []}, False, r"empty caption; write a caption"),
        ('{"video": "good.mp4", "caption": "caf\xe9"}\n'.encode("latin-1"), False,
         r"not UTF-8 text \(byte 0xe9 at column 38\); save the manifest as UTF-8 \(e\.g\. iconv -f latin1 -t utf-8\)"),
    ],
)
def test_bad_rows_are_skipped_by_line_and_the_good_rows_build(bad_media, tmp_path, row, allow_outside, reason):
    folder, outside = bad_media
    if isinstance(row, dict):
        row = {k: v.format(outside=outside) if isinstance(v, str) else v for k, v in row.items()}
        row = row if "caption" in row or "captions" in row else {**row, "caption": "a bad row"}
    good = {"video": "good.mp4", "caption": "a good row", "start": 0.1}
    path = folder / f"m_{tmp_path.name}.jsonl"
    path.write_bytes(_jsonl(good) + _jsonl(row) + _jsonl({**good, "start": 0.2}))
    summary = video_captions.build(str(path), str(tmp_path), "bad_rows", allow_outside=allow_outside)
    assert summary.examples == {"train": 2} and summary.num_skipped == 1
    [item] = summary.skipped["train"]["inputs"]
    assert item["lines"] == [2]
    assert re.fullmatch(reason.format(folder=re.escape(str(folder)), outside=re.escape(str(outside))) + ".*",
                        item["reason"]), item["reason"]
    assert summary.lines()[1:] == ["skipped 1 input(s), by manifest line:",
                                   f"  [train] line 2 {item['id']}: {item['reason']}"]
    assert "\n" not in item["reason"]


def test_allow_outside_lets_outside_paths_in(bad_media, tmp_path):
    folder, outside = bad_media
    rows = [{"video": "../outside/x.mp4", "caption": "relative"}, {"video": f"{outside}/x.mp4", "caption": "absolute"},
            {"video": "link.mp4", "caption": "symlink"}]
    path = folder / "outside.jsonl"
    path.write_bytes(b"".join(_jsonl(row) for row in rows))
    with pytest.raises(manifest.ManifestError, match=r"none of its 3 rows can be built \(line 1: outside the"):
        video_captions.build(str(path), str(tmp_path), "outside")
    summary = video_captions.build(str(path), str(tmp_path), "outside", allow_outside=True)
    # The first two name the same file (merged into one example); the symlink is another path.
    assert summary.examples == {"train": 2} and summary.num_skipped == 0
    records = {r["id"].decode(): r for r in datasets.records("outside", "train", str(tmp_path))}
    assert [c.decode() for c in records["../outside/x.mp4"]["captions"]] == ["relative", "absolute"]
    assert records["link.mp4"]["video"] == (outside / "x.mp4").read_bytes()


def test_non_utf8_csv_rows_are_skipped_by_the_line_of_the_byte(bad_media, tmp_path):
    folder = bad_media[0]
    path = folder / "latin1.csv"
    path.write_bytes(b'video,caption\ngood.mp4,fine\n\ngood.mp4,"two\nlines, caf\xe9"\n'
                     b'good.mp4,"\xff"\ngood.mp4,also fine\ncaf\xe9.mp4,x\n')
    read = manifest.read_manifest(str(path))
    assert [(e.lines, e.captions) for e in read.entries] == [((2, 7), ("fine", "also fine"))]
    assert [(s.line, s.id, s.reason.split(";")[0]) for s in read.skipped] == [
        (5, "good.mp4", "not UTF-8 text (byte 0xe9 at column 11)"),
        (6, "good.mp4", "not UTF-8 text (byte 0xff at column 11)"),
        (8, "caf\\xe9.mp4", "not UTF-8 text (byte 0xe9 at column 4)")]  # (the id printable)
    summary = video_captions.build(str(path), str(tmp_path), "latin1")
    assert summary.examples == {"train": 1}
    assert [i["lines"] for i in summary.skipped["train"]["inputs"]] == [[5], [6], [8]]
    assert summary.lines()[-1].startswith("  [train] line 8 caf\\xe9.mp4: not UTF-8 text")
    (folder / "header.csv").write_bytes(b"video,caption,l\xe9gende\ngood.mp4,x,y\n")
    with pytest.raises(manifest.ManifestError, match=r"header\.csv:1 \(the header\): not UTF-8 text \(byte 0xe9"):
        manifest.read_manifest(str(folder / "header.csv"))


def test_command_line_build_reports_skipped_rows_by_line(bad_media, tmp_path):
    folder, outside = bad_media
    rows = [{"video": "good.mp4", "caption": "kept"}, {"video": "../outside/x.mp4", "caption": "outside"},
            {"video": "good.mp4", "caption": "", "start": 0.1}, {"video": "cut.mp4", "caption": "cut"},
            {"video": "cut.mp4", "caption": "cut, again"}]
    path = folder / "cli.jsonl"
    path.write_bytes(b"".join(_jsonl(row) for row in rows))
    data_dir = str(tmp_path / "tfds")

    def build(*flags):
        done = run_vlm("data", "build", f"--manifest={path}", f"--data_dir={data_dir}", "--name=cli", *flags)
        assert done.returncode == 0, done.stderr[-3000:]
        out = done.stdout.splitlines()
        return out[next(i for i, line in enumerate(out) if line.startswith("built cli")):]

    lines = build()
    cut = next(line for line in lines if "cut.mp4" in line).split(": ", 1)[1]
    assert lines == [
        f"built cli in {data_dir}/cli/1.0.0: train 1 (0.0 MiB)",
        "skipped 3 input(s), by manifest line:",
        f"  [train] line 2 ../outside/x.mp4: outside the manifest's folder {folder} (it resolves to {outside}/x.mp4);"
        " move it into that folder, or pass --allow_outside to build files from anywhere",
        "  [train] line 3 good.mp4: empty caption; write a caption or remove the row",
        f"  [train] lines 4, 5 cut.mp4: {cut}",
        f"train on it with: --config.data.name=cli --config.data.data_dir={data_dir}",
    ]
    assert re.fullmatch(r"data ends at 0\.\d+s, before the frame at 1\.999s \(\d of 50 frames; truncated\?\)", cut)
    assert build("--allow_outside", "--overwrite")[:2] == [f"built cli in {data_dir}/cli/1.0.0: train 2 (0.0 MiB)",
                                                          "skipped 2 input(s), by manifest line:"]
    path.write_bytes(_jsonl(rows[1]) + _jsonl(rows[2]))
    failed = run_vlm("data", "build", f"--manifest={path}", f"--data_dir={data_dir}", "--name=none")
    assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [
        f"error: {path}: none of its 2 rows can be built (line 1: outside the manifest's folder {folder}"
        f" (it resolves to {outside}/x.mp4); move it into that folder, or pass --allow_outside to build files from"
        " anywhere)"]
