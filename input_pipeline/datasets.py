"""Datasets by name: the synthetic set, or a corpus built with `vlm data build` (tfds, ArrayRecord).

A built dataset is named as tfds names it, `NAME[/CONFIG][:VERSION]` (latest
version by default), and found in `data.data_dir`. Its records hold encoded
media; `ClipDecoder` turns one into {"video": uint8 [T, R, R, 3], "caption":
str, "frame_mask": bool [T]}, and `DecodedStream` does so for every position
of a record stream, replacing a record that fails to decode by the next one
of the stream that does (see its docstring), so batches keep their shape and
stay a pure function of the stream position.
"""

from __future__ import annotations

import functools
import os
import re

import grain
import numpy as np
from etils import epath

from input_pipeline import video
from input_pipeline.sources import DEFAULTS, default_data_dir, setting  # noqa: F401  (re-exported)

SYNTHETIC = "synthetic"
# Written by the builder beside the shards: every caption of a split, one per line.
CAPTIONS_FILE = "captions-{split}.txt"
SYNTHETIC_SPLITS = ("train", "heldout")
# Eval split of a built dataset when data.eval_split is "": the first of these it has.
DEFAULT_EVAL_SPLITS = ("validation", "test", "val", "heldout")
# Consecutive stream records that may fail before the pipeline gives up: far more than bad
# luck, so it means (nearly) every record is bad, e.g. a codec this machine cannot decode.
MAX_CONSECUTIVE_FAILURES = 64

_NAME = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)(/(?P<config>[\w.-]+))?(:(?P<version>\d+\.\d+\.\d+))?$")


class DatasetError(ValueError):
    """A dataset that cannot be found or read as configured; one line with the fix."""


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split("."))


def dataset_path(name: str, data_dir: str) -> epath.Path:
    """data_dir/NAME[/CONFIG]/VERSION of a built dataset (the latest version if none is given)."""
    match = _NAME.match(name)
    if not match:
        raise DatasetError(
            f"data.name={name!r} is neither {SYNTHETIC!r} nor a dataset name (lower-case NAME[/CONFIG][:VERSION])"
        )
    data_dir = data_dir or default_data_dir()
    folder = epath.Path(data_dir) / match["name"]
    if match["config"]:
        folder = folder / match["config"]
    if match["version"]:
        candidates = [folder / match["version"]]
    else:
        versions = [p for p in folder.glob("*") if re.fullmatch(r"\d+\.\d+\.\d+", p.name)] if folder.exists() else []
        candidates = sorted(versions, key=lambda p: _version_key(p.name), reverse=True)
    for path in candidates:
        if (path / "dataset_info.json").exists():
            return path
    raise DatasetError(
        f"dataset {name!r} not found in data_dir {data_dir} (no {folder}/<version>/dataset_info.json); build it with"
        f" `vlm data build --manifest=MANIFEST --data_dir={data_dir} --name={match['name']}`, or point"
        " --config.data.data_dir at the folder it was built in"
    )


@functools.lru_cache(maxsize=64)
def _builder(path: str):
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(path)


def builder(name: str, data_dir: str):
    """The read-only tfds builder of a built dataset."""
    return _builder(os.fspath(dataset_path(name, data_dir)))


def split_names(name: str, data_dir: str) -> list[str]:
    if name == SYNTHETIC:
        return list(SYNTHETIC_SPLITS)
    return list(builder(name, data_dir).info.splits.keys())


def _split_base(split: str) -> str:
    return split.split("[", 1)[0].split("+", 1)[0]


def check_split(name: str, data_dir: str, split: str, key: str) -> None:
    """Raises DatasetError unless `split` (tfds syntax, e.g. "train[:90%]") names splits of the dataset."""
    known = split_names(name, data_dir)
    for part in split.split("+"):
        if _split_base(part) not in known:
            raise DatasetError(
                f"{key}={split!r}: dataset {name!r} has no split {_split_base(part)!r}; its splits: {', '.join(known)}"
                + (" (slices like train[:90%] are fine)" if name != SYNTHETIC else "")
            )


def eval_split(data_config) -> str:
    """data.eval_split, or the dataset's usual held-out split when it is ""."""
    if setting(data_config, "eval_split"):
        return setting(data_config, "eval_split")
    if data_config.name == SYNTHETIC:
        return "heldout"
    known = split_names(data_config.name, data_config.data_dir)
    for split in DEFAULT_EVAL_SPLITS:
        if split in known:
            return split
    raise DatasetError(
        f"dataset {data_config.name!r} has no validation or test split (splits: {', '.join(known)}); set"
        " --config.data.eval_split, e.g. 'train[:256]' (and --config.data.train_split='train[256:]'), or give"
        ' manifest rows "split": "validation"'
    )


def records(name: str, split: str, data_dir: str) -> grain.sources.RandomAccessDataSource:
    """Random-access records (dicts of numpy values and bytes) of a built dataset's split."""
    return builder(name, data_dir).as_data_source(split=split)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def captions(name: str, split: str, data_dir: str, limit: int) -> list[str]:
    """Up to `limit` captions of a built dataset's split (for tokenizer training)."""
    return captions_in(os.fspath(dataset_path(name, data_dir)), split, limit)


def captions_in(path: str, split: str, limit: int) -> list[str]:
    """Up to `limit` captions of `split` of the built dataset at `path` (DATA_DIR/NAME/VERSION).

    From its captions-<split>.txt when the build wrote one (slices like "train[:90%]" read the
    whole split's file), else from the records' "captions" (all of each record's).
    """
    text_file = epath.Path(path) / CAPTIONS_FILE.format(split=_split_base(split))
    if text_file.exists():
        with text_file.open("r", encoding="utf-8") as lines:
            return [line.rstrip("\n") for _, line in zip(range(limit), lines) if line.strip()]
    source = _builder(os.fspath(path)).as_data_source(split=split)
    texts = []
    for index in range(len(source)):
        if len(texts) >= limit:
            break
        texts.extend(_text(c) for c in source[index]["captions"])
    return texts[:limit]


class ClipDecoder:
    """A built dataset's record → {"video": uint8 [T, R, R, 3], "caption": str, "frame_mask": bool [T]}.

    Training (an rng given): sampled times per `data.sampling`, random crop (`data.train_crop`),
    optional flip, one of the record's captions at random. Evaluation (rng None): deterministic
    times, centre crop, the first caption. Raises video.DecodeError for undecodable media.
    """

    def __init__(self, data_config):
        self.num_frames = data_config.num_frames
        self.resolution = data_config.resolution
        self.sampling = setting(data_config, "sampling")
        self.fps = setting(data_config, "sample_fps")
        self.crop = setting(data_config, "train_crop")
        self.flip = setting(data_config, "train_flip")
        self.short_clips = setting(data_config, "short_clips")
        self.threads = setting(data_config, "decode_threads")

    def __call__(self, record: dict, rng: np.random.Generator | None) -> dict:
        clip, mask = video.decode_clip(
            record["video"],
            num_frames=self.num_frames,
            resolution=self.resolution,
            sampling=self.sampling,
            rng=rng,
            start=float(record["start"]),
            end=float(record["end"]),
            fps=self.fps,
            crop=self.crop if rng is not None else "center",
            flip=self.flip and rng is not None,
            short_clips=self.short_clips,
            threads=self.threads,
        )
        texts = record["captions"]
        if len(texts) == 0:
            raise video.DecodeError("record has no caption")
        choice = int(rng.integers(len(texts))) if rng is not None else 0
        return {"video": clip, "caption": _text(texts[choice]), "frame_mask": mask}

    def blank(self) -> dict:
        """An all-padding example (eval batches' padding rows)."""
        shape = (self.num_frames, self.resolution, self.resolution, 3)
        return {"video": np.zeros(shape, np.uint8), "caption": "", "frame_mask": np.zeros(self.num_frames, bool)}


class DecodedStream(grain.MapDataset):
    """Position i of a record stream, decoded: a dict with "skipped" = 1 if record i itself failed.

    A record that fails to decode (truncated, unknown codec, no frames, or any other error
    while reading or decoding it) is replaced by the
    next record of the same stream that decodes, decoded with position i's randomness; the
    failure counts once, at the failing record's own position (a later failing record met
    while looking for a substitute is counted at its own position). So within an epoch the
    count equals the number of bad records read, batch shapes never change, and an example is
    a pure function of (seed, position): resuming and re-sharding stay exact. A run of
    MAX_CONSECUTIVE_FAILURES failures raises instead (nearly every record is bad).
    `seed` and `stream_id` seed the per-position rng (training); `training=False`: no
    randomness.
    """

    def __init__(self, parent: grain.MapDataset, decoder: ClipDecoder, seed: int, stream_id: int = 0,
                 training: bool = True):
        super().__init__(parent)
        self._decoder, self._seed, self._stream_id, self._training = decoder, seed, stream_id, training

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"DecodedStream(stream={self._stream_id})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index = int(index)
        rng = np.random.default_rng([self._seed, self._stream_id, index]) if self._training else None
        first_error = None
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            position = (index + attempt) % len(self._parent)
            try:
                example = self._decoder(self._parent[position], rng)
            except Exception as e:  # noqa: BLE001 - one bad record must never stop training
                first_error = first_error or e
                if rng is not None:  # the substitute draws afresh, but still from this position's seed
                    rng = np.random.default_rng([self._seed, self._stream_id, index, attempt + 1])
                continue
            example["skipped"] = np.int32(attempt > 0)
            return example
        raise RuntimeError(
            f"{MAX_CONSECUTIVE_FAILURES} consecutive records failed to decode from stream position {index}"
            f" (first: {type(first_error).__name__}: {first_error}); is the dataset readable with this"
            " machine's PyAV/FFmpeg codecs?"
        )


class WithExtras(grain.transforms.Map):
    """Synthetic examples with the built datasets' extra keys, for mixtures."""

    def map(self, example: dict) -> dict:
        num_frames = example["video"].shape[0]
        return {**example, "frame_mask": np.ones(num_frames, bool), "skipped": np.int32(0)}
