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
ignored. A malformed row (no media, no caption key, bad JSON, bad bounds or
split) raises `ManifestError`, one line naming the file, the line and the fix.

A row that is well formed but cannot be built is skipped and reported by its
line (`Manifest.skipped`), the other rows still build:
  - a media path that resolves (symlinks followed) outside the manifest's
    folder, unless `allow_outside` (`vlm data build --allow_outside`);
  - an empty caption ("", whitespace, [] or an empty string in the list);
  - a line (a CSV record) that is not UTF-8 text.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import posixpath
import re
import stat
from concurrent import futures

from etils import epath

DEFAULT_SPLIT = "train"
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_UNDECODED_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, decoded with surrogateescape


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
    lines: tuple[int, ...] = ()  # the manifest lines (rows) it comes from


@dataclasses.dataclass(frozen=True)
class SkippedRow:
    """A manifest row that is not built, and why."""

    line: int
    id: str  # as Entry.id (non-UTF-8 bytes as \\xNN); "" if the row names no media
    split: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    path: str
    entries: list[Entry]  # duplicates merged, in file order
    skipped: list[SkippedRow]  # in file order


class _Skip(Exception):
    """A row to skip (reported with its line), not a malformed manifest."""


def _printable(text: str) -> str:
    """Text decoded with surrogateescape, its undecodable bytes written as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _not_utf8(text: str) -> str | None:
    """Why `text` (decoded with surrogateescape) is not UTF-8, or None if it is."""
    bad = _UNDECODED_BYTE.search(text)
    if bad is None:
        return None
    return (f"not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x} at column {bad.start() + 1}); save the"
            " manifest as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


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
    """The row's captions, whitespace folded. Raises _Skip if one is empty (or there are none)."""
    caption, captions = row.get("caption"), row.get("captions")
    if caption not in (None, ""):
        value = caption
        values = [value] if isinstance(value, str) else None
    elif captions not in (None, ""):
        value = captions
        if from_csv and isinstance(value, str):
            if value.lstrip().startswith("["):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    _fail(where, '"captions" cell is not a JSON list of strings; write e.g. ["a dog", "a puppy"]')
            else:
                value = [value]
        values = list(value) if isinstance(value, (list, tuple)) else None
    elif caption is None and captions is None:
        _fail(where, 'no caption; give "caption": "..." or "captions": ["...", ...]')
    else:
        values = []  # "" (a JSON value or an empty CSV cell)
    if values is None or not all(isinstance(c, str) for c in values):
        _fail(where, '"caption" must be a string and "captions" a list of strings')
    values = [" ".join(c.split()) for c in values]  # one line each, single spaces
    if not values:
        raise _Skip("empty caption; write a caption or remove the row")
    if not all(values):
        which = f" ({values.index('') + 1} of {len(values)})" if len(values) > 1 else ""
        raise _Skip(f"empty caption{which}; write a caption or remove the row")
    return tuple(values)


def _resolved(path: str) -> str:
    """`path` with symlinks resolved (local files), or with `..` folded (URL-like paths)."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.realpath(path)


def _check_inside(path: str, written: str, root: str) -> None:
    """Raises _Skip unless `path` (`written` in the manifest) resolves inside the resolved folder `root`."""
    real = _resolved(path)
    if not (real + "/").startswith(root.rstrip("/") + "/"):
        shown = f" (it resolves to {_printable(real)})" if real != written else ""
        raise _Skip(f"outside the manifest's folder {_printable(root)}{shown}; move it into that folder,"
                    " or pass --allow_outside to build files from anywhere")


def _entry(row: dict, where: str, folder: str, from_csv: bool) -> Entry:
    """The row's entry; ManifestError if it is malformed, _Skip if it is not to be built."""
    has_video = row.get("video") not in (None, "")
    has_image = row.get("image") not in (None, "")
    if has_video == has_image:
        _fail(where, 'give exactly one of "video" and "image" (the media path)')
    media = row["video"] if has_video else row["image"]
    if not isinstance(media, str):
        _fail(where, f"the media path must be a string, got {media!r}")
    start, end = _float(row.get("start"), where, "start"), _float(row.get("end"), where, "end")
    if has_image and (start or end):
        _fail(where, '"start"/"end" apply to videos only; remove them from image rows')
    if end and end <= start:
        _fail(where, f'"end" ({end}) must be after "start" ({start})')
    split = row.get("split") or DEFAULT_SPLIT
    if not isinstance(split, str) or not _SPLIT_NAME.match(split) or split == "all":
        _fail(where, f'"split" must be a name of letters, digits and _ (not "all"), got {split!r}')
    captions = _captions(row, where, from_csv)
    path = media if ("://" in media or os.path.isabs(media)) else os.path.join(folder, media)
    clip = f"#{start:g}-{end:g}" if (start or end) else ""
    return Entry(os.path.normpath(path) if "://" not in path else path, media + clip, captions, has_image,
                 start, end, split)


def _rows(path: str):
    """(line number, row, from_csv, why the line is not UTF-8 or None) for every row of a manifest.

    The text is decoded with surrogateescape, so that a stray byte spoils its row only.
    """
    try:
        data = epath.Path(path).read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    text = data.decode("utf-8-sig", "surrogateescape")
    has_bad_bytes = _UNDECODED_BYTE.search(text) is not None  # (then each row is checked)
    if path.endswith(".csv"):
        # The physical lines the csv reader counts (a quoted cell may span lines).
        lines = io.StringIO(text, newline="").readlines() if has_bad_bytes else []
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader, [])
        except csv.Error as e:
            raise ManifestError(f"{path}:1: not a CSV header ({e})") from None
        if lines and _not_utf8(lines[0]):
            raise ManifestError(f"{path}:1 (the header): {_not_utf8(lines[0])}")
        if not {"video", "image"} & set(header):
            raise ManifestError(
                f"{path}: the CSV header must name a \"video\" or \"image\" column and \"caption\" or \"captions\""
                f" (found: {', '.join(header) or 'nothing'})"
            )
        previous = reader.line_num
        while True:
            try:
                cells = next(reader, None)
            except csv.Error as e:
                raise ManifestError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
            if cells is None:
                return
            first, previous = previous + 1, reader.line_num  # the record is lines first .. line_num
            if not cells:  # a blank line
                continue
            number, not_utf8 = first, None
            for n in range(first, reader.line_num + 1) if has_bad_bytes else ():
                if not_utf8 := _not_utf8(lines[n - 1]):
                    number = n
                    break
            row = {name: (cells[i].strip() if i < len(cells) else None) for i, name in enumerate(header)}
            yield number, row, True, not_utf8
    # Lines end at "\n" only (as editors count them): a JSON string may hold U+2028 and the like.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        not_utf8 = _not_utf8(line) if has_bad_bytes else None
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            reason = not_utf8 or f"not valid JSON ({e.msg}); each line must be one JSON object"
            raise ManifestError(f"{path}:{number}: {reason}") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{path}:{number}: each line must be a JSON object like {{\"video\": ..., \"caption\": ...}}")
        yield number, row, False, not_utf8


def read_manifest(path: str, allow_outside: bool = False) -> Manifest:
    """The manifest's entries (duplicates merged, in file order) and the rows it skips.

    Raises ManifestError for a malformed manifest (see the module docstring). A media path
    must resolve inside the manifest's folder (after following symlinks) unless `allow_outside`.
    """
    path = os.fspath(path)
    if not path.endswith((".jsonl", ".json", ".csv")):
        raise ManifestError(f"{path}: a manifest is a .jsonl (one JSON object per line) or a .csv file")
    if not epath.Path(path).exists():
        raise ManifestError(f"manifest not found: {path}")
    if "://" not in path and not stat.S_ISREG(os.stat(path).st_mode):
        raise ManifestError(f"{path}: not a regular file; a manifest is a .jsonl or .csv text file")
    folder = os.path.dirname(path) if "://" not in path else path.rsplit("/", 1)[0]
    root = _resolved(folder or ".")
    merged: dict[tuple, Entry] = {}
    skipped: list[SkippedRow] = []
    for number, row, from_csv, not_utf8 in _rows(path):
        media = row.get("video") or row.get("image")
        media, entry = (media if isinstance(media, str) else ""), None
        try:
            entry = _entry(row, f"{path}:{number}", folder, from_csv)
            if not_utf8:
                raise _Skip()
            if not allow_outside:
                _check_inside(entry.path, media, root)
        except _Skip as skip:
            split = row.get("split") or DEFAULT_SPLIT  # (valid: _Skip comes after its check)
            skipped.append(SkippedRow(number, _printable(entry.id if entry else media), split, not_utf8 or str(skip)))
            continue
        entry = dataclasses.replace(entry, lines=(number,))
        key = (entry.path, entry.start, entry.end, entry.split)
        if key in merged:
            entry = dataclasses.replace(merged[key], captions=merged[key].captions + entry.captions,
                                        lines=merged[key].lines + entry.lines)
        merged[key] = entry
    if not merged and not skipped:
        raise ManifestError(f"{path}: no rows; add one line per media file, e.g. {{\"video\": \"a.mp4\", \"caption\": \"...\"}}")
    if not merged:
        first = skipped[0]
        raise ManifestError(f"{path}: none of its {len(skipped)} rows can be built (line {first.line}: {first.reason})")
    return Manifest(path, list(merged.values()), skipped)


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
