"""tensorflow-datasets builder for video-caption and image-caption corpora, written as ArrayRecord.

From a manifest (see `manifest.py`): one example per video clip or image,
holding the encoded bytes (as they are, or re-encoded within limits: see
`media.py`), the caption(s) and metadata. Images are one-frame videos.

    vlm data build --manifest=/data/webvid/manifest.jsonl --data_dir=/data/tfds --name=webvid
    vlm train --config=configs/dual_encoder.py:tiny --workdir=W --config.data.name=webvid --config.data.data_dir=/data/tfds

or with the tfds tool (needs TensorFlow installed for its entry point), the
manifest being `manifest.jsonl` or `manifest.csv` in the manual dir:

    tfds build input_pipeline/builders/video_captions.py --manual_dir=/data/webvid --data_dir=/data/tfds \
        [--config=original|256p]

A local build is one process. Re-encoding many files goes faster on Beam's
DirectRunner on all cores of one machine (`pip install apache-beam`):

    vlm data build ... --max_short_side=256 \
        --beam_pipeline_options="runner=DirectRunner,direct_num_workers=16,direct_running_mode=multi_processing"

For corpora too big for one machine, the same builder runs on a distributed
Beam runner (plus the runner's own extras, e.g. apache-beam[gcp]):

    vlm data build --manifest=gs://b/webvid/manifest.jsonl --data_dir=gs://b/tfds --name=webvid \
        --max_short_side=256 --beam_pipeline_options="runner=DataflowRunner,project=P,region=R,temp_location=gs://b/tmp"
    tfds build input_pipeline/builders/video_captions.py --manual_dir=... --data_dir=... \
        --beam_pipeline_options="runner=DataflowRunner,..."

Examples (tfds feature → value):
    video       bytes: the encoded video (mp4, webm, ...) or image (jpeg, png, ...)
    captions    list of str (at least one)
    id          str: the media path as the manifest wrote it, plus "#start-end" for a clip
    is_image    bool
    start, end  float32 seconds: the clip within `video` (0 and its duration when re-encoded)
    duration, fps, num_frames, width, height, rotation (degrees, applied at decode), codec
Rows that cannot be built (an empty caption, a line that is not UTF-8, a path
outside the manifest's folder without --allow_outside: see manifest.py) and
inputs that do not become examples (not a regular file, too large, not
decodable, truncated: see media.py) are skipped and listed by manifest line in
the build summary and in the dataset's metadata.json ("skipped_inputs"); a
manifest naming missing files fails the build, listing them. Beside the shards,
captions-<split>.txt holds every caption (one per line) for tokenizer training
(local builds).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from input_pipeline.builders import manifest as manifest_lib
from input_pipeline.datasets import CAPTIONS_FILE
from input_pipeline.builders import media

DATASET_VERSION = "1.0.0"
MANIFEST_NAMES = ("manifest.jsonl", "manifest.csv")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclasses.dataclass
class VideoCaptionsConfig(tfds.core.BuilderConfig):
    """Re-encoding limits (see media.EncodeOptions); all 0 = store the files as they are."""

    max_short_side: int = 0
    max_fps: float = 0.0
    max_duration: float = 0.0
    keyframe_interval: float = 1.0
    crf: int = 23
    reencode_all: bool = False

    def options(self) -> media.EncodeOptions:
        return media.EncodeOptions(self.max_short_side, self.max_fps, self.max_duration, self.keyframe_interval,
                                   self.crf, self.reencode_all)


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "video": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "id": tfds.features.Text(),
            "is_image": tfds.features.Scalar(np.bool_),
            "start": tfds.features.Scalar(np.float32),
            "end": tfds.features.Scalar(np.float32),
            "duration": tfds.features.Scalar(np.float32),
            "fps": tfds.features.Scalar(np.float32),
            "num_frames": tfds.features.Scalar(np.int32),
            "width": tfds.features.Scalar(np.int32),
            "height": tfds.features.Scalar(np.int32),
            "rotation": tfds.features.Scalar(np.int32),
            "codec": tfds.features.Text(),
        }
    )


def _lines(lines) -> str:
    """Manifest line numbers as text: "line 3", "lines 3, 8"."""
    return f"line{'s' if len(lines) > 1 else ''} {', '.join(str(n) for n in lines)}"


def _example_or_failure(entry: manifest_lib.Entry, options: media.EncodeOptions):
    """(key, example, None) or (key, None, reason): one entry, in a Beam worker or locally."""
    try:
        return entry.id, media.make_example(entry, options), None
    except media.UnreadableInput as e:
        return entry.id, None, str(e)
    except Exception as e:  # noqa: BLE001 - one odd file must not stop a corpus build
        return entry.id, None, f"{type(e).__name__}: {e}"


class VideoCaptions(tfds.core.GeneratorBasedBuilder):
    """Video-caption (and image-caption) corpus from a manifest; see the module docstring."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Encoded media bytes, captions and metadata."}
    BUILDER_CONFIGS = [
        VideoCaptionsConfig(name="original", description="The media files' bytes as they are."),
        VideoCaptionsConfig(
            name="256p",
            description="Re-encoded: shorter side <= 256, <= 30 fps, <= 60 s, H.264 with a keyframe every second.",
            max_short_side=256,
            max_fps=30.0,
            max_duration=60.0,
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put a manifest.jsonl (or manifest.csv) in the manual dir; each row names a video or image (paths relative"
        ' to the manifest\'s folder) and its caption(s): {"video": "a.mp4", "caption": "..."}.'
    )

    def __init__(self, *, manifest: str | None = None, options: media.EncodeOptions | None = None,
                 allow_outside: bool = False, file_format=None, **kwargs):
        """`manifest`: its path (else manifest.jsonl/.csv in the manual dir); `options`: re-encoding
        limits (else the builder config's); `allow_outside`: build media files outside the manifest's
        folder too. ArrayRecord unless `file_format` says otherwise."""
        self._manifest = manifest
        self._options = options
        self._allow_outside = allow_outside
        # split → [{"lines", "id", "reason"}] of skipped rows and inputs
        self.report: dict[str, list[dict]] = {}
        self._captions: dict[str, list[str]] = {}
        super().__init__(file_format=file_format or "array_record", **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds' own lookup needs the `importlib_resources` backport on Python >= 3.9 for a builder
        # inside a package; this file is the answer it would find.
        return epath.Path(__file__)

    @property
    def options(self) -> media.EncodeOptions:
        if self._options is not None:
            return self._options
        config = self.builder_config
        return config.options() if isinstance(config, VideoCaptionsConfig) else media.EncodeOptions()

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=_features(),
            metadata=tfds.core.MetadataDict(),
        )

    def _manifest_path(self, dl_manager) -> str:
        if self._manifest:
            return os.fspath(self._manifest)
        folder = dl_manager.manual_dir
        for name in MANIFEST_NAMES:
            if (folder / name).exists():
                return os.fspath(folder / name)
        raise manifest_lib.ManifestError(
            f"no {' or '.join(MANIFEST_NAMES)} in the manual dir {folder}; pass --manual_dir=FOLDER_WITH_MANIFEST"
        )

    def _generate_splits(self, dl_manager, download_config):
        # Beam is used when the caller asked for it (a runner or pipeline options).
        self._use_beam = download_config.beam_runner is not None or download_config.beam_options is not None
        return super()._generate_splits(dl_manager, download_config)

    def _split_generators(self, dl_manager):
        path = self._manifest_path(dl_manager)
        manifest = manifest_lib.read_manifest(path, self._allow_outside)
        manifest_lib.check_files_exist(manifest.entries, path)
        self.options.validate()
        self.report = {}
        for row in manifest.skipped:
            self.report.setdefault(row.split, []).append({"lines": [row.line], "id": row.id, "reason": row.reason})
        self._num_skipped_rows = {split: len(rows) for split, rows in self.report.items()}
        by_split: dict[str, list] = {}
        for entry in manifest.entries:
            by_split.setdefault(entry.split, []).append(entry)
        self._num_entries = {split: len(rows) for split, rows in by_split.items()}
        self.info.metadata.update({"manifest": path, "encode_options": dataclasses.asdict(self.options)})
        return {split: self._generate_examples(rows, split) for split, rows in sorted(by_split.items())}

    def _generate_examples(self, entries, split):
        options = self.options
        if getattr(self, "_use_beam", False):
            beam = tfds.core.lazy_imports.apache_beam

            def keep(result):
                key, example, failure = result
                if failure is not None:
                    beam.metrics.Metrics.counter("vlm", "skipped_inputs").inc()
                    logging.warning("skipped %s: %s", key, failure)
                    return []
                return [(key, example)]

            return beam.Create(entries) | beam.Map(_example_or_failure, options) | beam.FlatMap(keep)
        return self._generate_locally(entries, split, options)

    def _generate_locally(self, entries, split, options):
        skipped = self.report.setdefault(split, [])
        captions = self._captions.setdefault(split, [])
        for entry in entries:
            key, example, failure = _example_or_failure(entry, options)
            if failure is not None:
                logging.warning("skipped %s %s: %s", _lines(entry.lines), key, failure)
                skipped.append({"lines": list(entry.lines), "id": key, "reason": failure})
                continue
            captions.extend(example["captions"])
            yield key, example

    def _download_and_prepare(self, dl_manager, download_config=None):
        result = super()._download_and_prepare(dl_manager, download_config)
        # Rows skipped by the manifest (listed) and inputs that did not become examples: listed
        # (local build) or counted (Beam: the workers' logs list them). Saved in metadata.json.
        skipped = {}
        for split in sorted(set(self._num_entries) | set(self._num_skipped_rows)):
            built = self.info.splits[split].num_examples if split in self.info.splits else 0
            count = self._num_skipped_rows.get(split, 0) + self._num_entries.get(split, 0) - built
            listed = sorted(self.report.get(split, []), key=lambda item: item["lines"])
            skipped[split] = {"count": count, "inputs": listed}
        self.info.metadata["skipped_inputs"] = skipped
        # Every caption of a split, one per line, beside the shards: tokenizer training reads
        # these instead of whole records (local builds; Beam builds have none, and it reads records).
        for split, captions in self._captions.items():
            (epath.Path(self.data_dir) / CAPTIONS_FILE.format(split=split)).write_text(
                "".join(caption + "\n" for caption in captions), encoding="utf-8"
            )
        return result


def named_builder_class(name: str) -> type[VideoCaptions]:
    """A VideoCaptions builder named `name` (its data goes to data_dir/name/VERSION), not registered."""
    if not _NAME.match(name):
        raise ValueError(f"--name={name!r}: use lower-case letters, digits and _ (starting with a letter), e.g. my_videos")
    camel = "".join(part.capitalize() for part in name.split("_"))

    def body(namespace):
        namespace.update(name=name, BUILDER_CONFIGS=[], __module__=__name__, __doc__=VideoCaptions.__doc__)

    return types.new_class(camel, (VideoCaptions,), {"skip_registration": True}, body)


@dataclasses.dataclass
class BuildSummary:
    name: str
    path: str  # data_dir/name/version
    examples: dict[str, int]
    bytes: dict[str, int]
    skipped: dict[str, dict]  # split → {"count", "inputs": [{"lines", "id", "reason"}]}

    @property
    def num_skipped(self) -> int:
        return sum(s["count"] for s in self.skipped.values())

    def lines(self) -> list[str]:
        splits = ", ".join(f"{split} {n} ({self.bytes[split] / 2**20:.1f} MiB)" for split, n in self.examples.items())
        lines = [f"built {self.name} in {self.path}: {splits}"]
        if self.num_skipped:
            lines.append(f"skipped {self.num_skipped} input(s), by manifest line:")
            for split, info in self.skipped.items():
                for item in info["inputs"]:
                    lines.append(f"  [{split}] {_lines(item['lines'])} {item['id']}: {item['reason']}")
                unlisted = info["count"] - len(info["inputs"])
                if unlisted > 0:
                    lines.append(f"  [{split}] {unlisted} (built on Beam: the workers' logs name them)")
        return lines


def build(
    manifest: str,
    data_dir: str,
    name: str,
    options: media.EncodeOptions | None = None,
    *,
    overwrite: bool = False,
    beam_pipeline_options: str | None = None,
    num_shards: int | None = None,
    allow_outside: bool = False,
) -> BuildSummary:
    """Builds dataset `name` from `manifest` into data_dir/name/VERSION; returns what was built.

    `beam_pipeline_options` ("runner=DirectRunner,direct_num_workers=2", ...): build on Apache
    Beam. An existing build of the same name and version is kept unless `overwrite`.
    `allow_outside`: media paths may lead outside the manifest's folder.
    """
    options = options or media.EncodeOptions()
    options.validate()
    # The manifest is checked before tfds starts (its errors are then the only output).
    manifest_lib.check_files_exist(manifest_lib.read_manifest(manifest, allow_outside).entries, manifest)
    make = functools.partial(named_builder_class(name), data_dir=data_dir, manifest=manifest, options=options,
                             allow_outside=allow_outside)
    builder = make()
    if builder.is_prepared() and overwrite:
        builder.data_path.rmtree()
        builder = make()
    elif builder.is_prepared():
        raise FileExistsError(f"{builder.data_path} already exists; pass --overwrite to rebuild it or pick another --name")
    config = tfds.download.DownloadConfig(num_shards=num_shards)
    if beam_pipeline_options:
        beam = tfds.core.lazy_imports.apache_beam
        config.beam_options = beam.options.pipeline_options.PipelineOptions(
            flags=[f"--{option.strip()}" for option in beam_pipeline_options.split(",") if option.strip()]
        )
    builder.download_and_prepare(download_config=config)
    info = builder.info
    return BuildSummary(
        name=name,
        path=os.fspath(builder.data_path),
        examples={split: info.splits[split].num_examples for split in info.splits},
        bytes={split: info.splits[split].num_bytes for split in info.splits},
        skipped=dict(info.metadata.get("skipped_inputs", {})),
    )
