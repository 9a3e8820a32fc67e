"""Manifests: which media files make a corpus, with their captions, clip bounds and splits.

JSONL, one object per line:
    {"video": "clips/0001.mp4", "caption": "a dog runs on a beach"}
    {"video": "long/0002.mp4", "captions": ["a man cooks", "someone fries an egg"], "start": 12.5, "end": 20.0}
    {"image": "images/cat.jpg", "caption": "a cat on a sofa", "split": "validation"}
or CSV with the same column names (a `captions` cell may be a JSON list).

  video | image   path of the media; relative paths resolve against the manifest's folder
  caption(s)      one caption, or a non-empty list of them
  start, end      optional clip bounds in seconds (videos only)
  split           optional, default "train"; letters, digits and _ (e.g. validation, test)

Rows naming the same media, clip and split are merged into one example holding
all their captions (MSR-VTT-style one-caption-per-row files). Other keys are
ignored. Any problem raises `ManifestError`, one line naming the file, the
line and the fix.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from concurrent import futures

from etils import epath

DEFAULT_SPLIT = "train"
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class ManifestError(ValueError):
    """A manifest problem, as one line naming where it is and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One example to build: a media file (or a clip of it) and its captions."""

    path: str  # resolved: absolute, or a URL-like path (gs://...)
    id: str  # as written in the manifest, plus the clip bounds: unique within a split
    captions: tuple[str, ...]
    is_image: bool = False
    start: float = 0.0
    end: float = 0.0  # 0 = to the end
    split: str = DEFAULT_SPLIT


def _fail(where: str, message: str) -> None:
    raise ManifestError(f"{where}: {message}")


def _float(value, where: str, key: str) -> float:
    if value is None or value == "":
        return 0.0
    try:
        number = float(value)
    except (TypeError, ValueError):
        _fail(where, f'"{key}" must be a number of seconds, got {value!r}')
    if not number >= 0:  # also NaN
        _fail(where, f'"{key}" must be >= 0 seconds, got {value!r}')
    return number


def _captions(row: dict, where: str, from_csv: bool) -> tuple[str, ...]:
    if "caption" in row and row["caption"] not in (None, ""):
        value = row["caption"]
        captions = [value] if isinstance(value, str) else None
    elif "captions" in row and row["captions"] not in (None, ""):
        value = row["captions"]
        if from_csv and isinstance(value, str):
            if value.lstrip().startswith("["):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    _fail(where, '"captions" cell is not a JSON list of strings; write e.g. ["a dog", "a puppy"]')
            else:
                value = [value]
        captions = list(value) if isinstance(value, (list, tuple)) else None
    else:
        _fail(where, 'no caption; give "caption": "..." or "captions": ["...", ...]')
    if not captions or not all(isinstance(c, str) for c in captions):
        _fail(where, '"caption" must be a string and "captions" a non-empty list of strings')
    captions = [" ".join(c.split()) for c in captions]  # one line each, single spaces
    if not all(captions):
        _fail(where, "a caption is empty")
    return tuple(captions)


def _entry(row: dict, where: str, folder: str, from_csv: bool) -> Entry:
    has_video = row.get("video") not in (None, "")
    has_image = row.get("image") not in (None, "")
    if has_video == has_image:
        _fail(where, 'give exactly one of "video" and "image" (the media path)')
    media = row["video"] if has_video else row["image"]
    if not isinstance(media, str):
        _fail(where, f"the media path must be a string, got {media!r}")
    captions = _captions(row, where, from_csv)
    start, end = _float(row.get("start"), where, "start"), _float(row.get("end"), where, "end")
    if has_image and (start or end):
        _fail(where, '"start"/"end" apply to videos only; remove them from image rows')
    if end and end <= start:
        _fail(where, f'"end" ({end}) must be after "start" ({start})')
    split = row.get("split") or DEFAULT_SPLIT
    if not isinstance(split, str) or not _SPLIT_NAME.match(split) or split == "all":
        _fail(where, f'"split" must be a name of letters, digits and _ (not "all"), got {split!r}')
    path = media if ("://" in media or os.path.isabs(media)) else os.path.join(folder, media)
    clip = f"#{start:g}-{end:g}" if (start or end) else ""
    return Entry(os.path.normpath(path) if "://" not in path else path, media + clip, captions, has_image,
                 start, end, split)


def _rows(path: str):
    """(where, row, from_csv) for every row of a JSONL or CSV manifest."""
    text = epath.Path(path).read_text(encoding="utf-8-sig")
    if path.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or not {"video", "image"} & set(reader.fieldnames):
            raise ManifestError(
                f"{path}: the CSV header must name a \"video\" or \"image\" column and \"caption\" or \"captions\""
                f" (found: {', '.join(reader.fieldnames or []) or 'nothing'})"
            )
        for row in reader:
            yield f"{path}:{reader.line_num}", {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()}, True
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: each line must be a JSON object like {{\"video\": ..., \"caption\": ...}}")
        yield where, row, False


def read_manifest(path: str) -> list[Entry]:
    """The manifest's entries (duplicates merged), in file order. Raises ManifestError."""
    path = os.fspath(path)
    if not path.endswith((".jsonl", ".json", ".csv")):
        raise ManifestError(f"{path}: a manifest is a .jsonl (one JSON object per line) or a .csv file")
    if not epath.Path(path).exists():
        raise ManifestError(f"manifest not found: {path}")
    folder = os.path.dirname(path) if "://" not in path else path.rsplit("/", 1)[0]
    merged: dict[tuple, Entry] = {}
    for where, row, from_csv in _rows(path):
        entry = _entry(row, where, folder, from_csv)
        key = (entry.path, entry.start, entry.end, entry.split)
        if key in merged:
            entry = dataclasses.replace(merged[key], captions=merged[key].captions + entry.captions)
        merged[key] = entry
    if not merged:
        raise ManifestError(f"{path}: no rows; add one line per media file, e.g. {{\"video\": \"a.mp4\", \"caption\": \"...\"}}")
    return list(merged.values())


def check_files_exist(entries: list[Entry], manifest: str, threads: int = 32) -> None:
    """Raises ManifestError listing every media file the manifest names that does not exist."""
    paths = sorted({entry.path for entry in entries})
    with futures.ThreadPoolExecutor(min(threads, max(len(paths), 1))) as pool:
        exists = list(pool.map(lambda p: epath.Path(p).exists(), paths))
    missing = [p for p, ok in zip(paths, exists) if not ok]
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise ManifestError(
            f"{manifest}: {len(missing)} of the {len(paths)} media files it names do not exist: {shown}"
            " (relative paths resolve against the manifest's folder; fix the paths or remove those rows)"
        )
