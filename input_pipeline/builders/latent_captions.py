"""Writing a latent dataset (`vlm data encode`): clips encoded by a VAE, in chunks, then one tfds dataset.

Two phases, so that any number of processes write the same dataset as one, and a restart resumes:

1. `encode_chunks`: each split's clips (as the eval pipeline decodes them: deterministic frames,
   centre crop; the synthetic set's own clips) are cut into chunks of `chunk_size`; process p of P
   encodes chunks p, p + P, ... with the `encode` function it is given (the VAE on its local
   devices) and writes each chunk atomically (.tmp, then rename) as one .npz in a work folder named
   by the plan's fingerprint. Finished chunks are skipped, so a restarted job redoes only what
   was missing; a changed plan (another VAE, clip shape, ...) uses another folder.
2. `write_dataset` (process 0, after every process is done): reads the chunks in order and writes
   DATA_DIR/NAME/VERSION with a tfds GeneratorBasedBuilder (ArrayRecord, records in source order),
   plus `latent_info.json` (shape, per-channel statistics of the stats split, VAE step and hash,
   source; see input_pipeline/latents.py) and captions-<split>.txt (tokenizer training).

A clip that fails to decode is left out (listed in latent_info.json's "skipped"). Nothing here
imports JAX: `encode` comes from the caller (vlm.tasks.autoencoding.encoder_fn).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import types
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from input_pipeline import datasets, latents, synthetic
from input_pipeline.datasets import CAPTIONS_FILE

DATASET_VERSION = "1.0.0"
WORK_FOLDER = "_encode_work"  # DATA_DIR/NAME/_encode_work/<fingerprint>/<split>/chunk-NNNNNN.npz
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")

# encode(uint8 video [b, T, H, W, 3]) → (posterior mean, posterior std), float32 [b, t, h, w, c] each.
Encode = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class ClipSource:
    """The clips of one split of the source, as evaluation decodes them: example(i) → {"video" uint8
    [T, R, R, 3], "captions" [str], "id" str}; raises for a record that does not decode."""

    def __init__(self, data_config, split: str, max_examples: int = 0):
        from input_pipeline import pipeline

        self.name, self.split = data_config.name, split
        if self.name == datasets.SYNTHETIC:
            size = data_config.train_size if split == "train" else data_config.eval_size
            self._records = synthetic.SyntheticVideoCaptions(
                split, num_examples=size, num_frames=data_config.num_frames, resolution=data_config.resolution,
                seed=pipeline.DATASET_SEED, max_objects=data_config.max_objects)
            self._decoder = None
        else:
            self._records = datasets.records(self.name, split, data_config.data_dir)
            self._decoder = datasets.ClipDecoder(data_config)
        self.size = len(self._records) if not max_examples else min(max_examples, len(self._records))

    def __len__(self) -> int:
        return self.size

    def example(self, index: int) -> dict:
        record = self._records[index]
        if self._decoder is None:  # synthetic
            return {"video": record["video"], "captions": [record["caption"]], "id": f"{self.split}/{index}"}
        clip = self._decoder(record, None)["video"]
        return {"video": clip, "captions": [datasets._text(c) for c in record["captions"]],
                "id": datasets._text(record["id"])}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What is written: the dataset, its source and the VAE; the fingerprint names the work folder."""

    out_name: str
    data_dir: str
    splits: dict  # split → number of source clips to encode
    shape: tuple  # latent [t, h, w, c]
    stored: str  # "posterior" (mean and std) or "sample" (one z = μ + σ·ε per clip)
    chunk_size: int
    seed: int  # of the draws when stored == "sample"
    stats_split: str
    vae: dict  # {"hash", "step", "workdir"}
    source: dict  # {"name", "data_dir", "num_frames", "resolution", ...}

    def __post_init__(self):
        if not self.out_name or set(self.out_name) - _NAME_CHARS or not self.out_name[0].isalpha():
            raise ValueError(f"--out_name={self.out_name!r}: use lower-case letters, digits and _ (starting with a "
                             f"letter), e.g. synthetic_latents")
        if self.stored not in latents.STORED:
            raise ValueError(f"--latents={self.stored!r}: choose one of {', '.join(latents.STORED)}")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk_size={self.chunk_size} must be ≥ 1")
        if self.stats_split not in self.splits:
            raise ValueError(f"the statistics split {self.stats_split!r} is not among the encoded splits "
                             f"{', '.join(self.splits)}")

    @property
    def fingerprint(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "data_dir"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def folder(self) -> epath.Path:
        return epath.Path(self.data_dir or datasets.default_data_dir()) / self.out_name

    def work_dir(self, split: str) -> epath.Path:
        return self.folder / WORK_FOLDER / self.fingerprint / split

    def num_chunks(self, split: str) -> int:
        return math.ceil(self.splits[split] / self.chunk_size)

    def chunk_path(self, split: str, chunk: int) -> epath.Path:
        return self.work_dir(split) / f"chunk-{chunk:06d}.npz"


def _write_atomically(path: epath.Path, arrays: dict) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def _encode_chunk(plan: Plan, source: ClipSource, split: str, chunk: int, encode: Encode, batch_size: int) -> dict:
    """The arrays of one chunk: its clips encoded in batches of `batch_size` (the last one padded)."""
    split_id = list(plan.splits).index(split)
    rows = range(chunk * plan.chunk_size, min((chunk + 1) * plan.chunk_size, plan.splits[split]))
    examples, skipped = [], []
    for index in rows:
        try:
            examples.append((index, source.example(index)))
        except Exception as e:  # noqa: BLE001 - one bad clip must not stop the encode
            skipped.append({"index": index, "reason": f"{type(e).__name__}: {e}"})
    means, stds = [], []
    for start in range(0, len(examples), batch_size):
        videos = np.stack([ex["video"] for _, ex in examples[start:start + batch_size]])
        real = len(videos)
        if real < batch_size:  # one compiled shape: pad with copies of the last clip
            videos = np.concatenate([videos, np.repeat(videos[-1:], batch_size - real, axis=0)])
        mean, std = encode(videos)
        means.append(mean[:real])
        stds.append(std[:real])
    shape = (0, *plan.shape)
    mean = np.concatenate(means) if means else np.zeros(shape, np.float32)
    std = np.concatenate(stds) if stds else np.zeros(shape, np.float32)
    index = np.array([i for i, _ in examples], np.int64)
    if plan.stored == "sample":  # one draw per clip, from its own seed: independent of batches and processes
        noise = [np.random.default_rng([plan.seed, split_id, int(i)]).standard_normal(plan.shape, np.float32)
                 for i in index]
        mean = mean + std * (np.stack(noise) if noise else 0.0)
    arrays = {"latent": mean.astype(np.float32), "index": index,
              "id": np.array([ex["id"] for _, ex in examples], dtype=str).reshape(-1),
              "captions": np.array([json.dumps(ex["captions"]) for _, ex in examples], dtype=str).reshape(-1),
              "skipped": np.array(json.dumps(skipped))}
    if plan.stored == "posterior":
        arrays["latent_std"] = std.astype(np.float32)
    return arrays


def encode_chunks(plan: Plan, data_config, encode: Encode, *, process_index: int = 0, process_count: int = 1,
                  batch_size: int = 8, log: Callable[[str], None] = print) -> int:
    """Phase 1 on one process: encodes and writes its chunks that are not written yet; returns how many it wrote."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    written = 0
    for split, count in plan.splits.items():
        source = ClipSource(data_config, split, count)
        plan.work_dir(split).mkdir(parents=True, exist_ok=True)
        mine = range(process_index, plan.num_chunks(split), process_count)
        for chunk in mine:
            path = plan.chunk_path(split, chunk)
            if path.exists():  # finished before a restart
                continue
            _write_atomically(path, _encode_chunk(plan, source, split, chunk, encode, batch_size))
            written += 1
            log(f"{split}: chunk {chunk + 1}/{plan.num_chunks(split)} written")
    return written


def missing_chunks(plan: Plan) -> list[str]:
    return [f"{split}/{c}" for split in plan.splits for c in range(plan.num_chunks(split))
            if not plan.chunk_path(split, c).exists()]


def _chunks(plan: Plan, split: str):
    for c in range(plan.num_chunks(split)):
        with np.load(io.BytesIO(plan.chunk_path(split, c).read_bytes())) as data:
            yield {k: data[k] for k in data.files}


def channel_statistics(plan: Plan, split: str) -> tuple[list[float], list[float], int]:
    """(mean [c], std [c], count of clips) over `split` of z: the stored values, or z ~ N(μ, σ²) in
    expectation when the posterior is stored (E[z] = E[μ], E[z²] = E[μ² + σ²]); float64 sums."""
    c = plan.shape[-1]
    total, squares, values, clips = np.zeros(c), np.zeros(c), 0, 0
    for chunk in _chunks(plan, split):
        z = chunk["latent"].astype(np.float64).reshape(-1, c)
        total += z.sum(0)
        squares += np.square(z).sum(0)
        if plan.stored == "posterior":
            squares += np.square(chunk["latent_std"].astype(np.float64)).reshape(-1, c).sum(0)
        values += z.shape[0]
        clips += len(chunk["index"])
    if not values:
        raise ValueError(f"split {split!r} has no encoded clips: no statistics")
    mean = total / values
    std = np.sqrt(np.maximum(squares / values - np.square(mean), 1e-12))
    return mean.tolist(), std.tolist(), clips


class LatentCaptions(tfds.core.GeneratorBasedBuilder):
    """A latent dataset written from the chunks of a `Plan` (see the module docstring)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "VAE latents (posterior mean and std, or one draw) with captions."}

    def __init__(self, *, plan: Plan, **kwargs):
        self._plan = plan
        super().__init__(file_format="array_record", **kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)  # as video_captions.py: no importlib_resources lookup

    def _info(self) -> tfds.core.DatasetInfo:
        shape = tuple(self._plan.shape)
        features = {"latent": tfds.features.Tensor(shape=shape, dtype=np.float32),
                    "captions": tfds.features.Sequence(tfds.features.Text()),
                    "id": tfds.features.Text(),
                    "index": tfds.features.Scalar(np.int64)}
        if self._plan.stored == "posterior":
            features["latent_std"] = tfds.features.Tensor(shape=shape, dtype=np.float32)
        return tfds.core.DatasetInfo(builder=self, description=__doc__.split("\n\n")[0],
                                     features=tfds.features.FeaturesDict(features), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self._plan.splits}

    def _generate_examples(self, split):
        for chunk in _chunks(self._plan, split):
            for row, index in enumerate(chunk["index"]):
                example = {"latent": chunk["latent"][row], "captions": json.loads(str(chunk["captions"][row])),
                           "id": str(chunk["id"][row]), "index": int(index)}
                if self._plan.stored == "posterior":
                    example["latent_std"] = chunk["latent_std"][row]
                yield int(index), example  # disable_shuffling: records in key (= source) order


def _builder_class(name: str) -> type[LatentCaptions]:
    camel = "".join(part.capitalize() for part in name.split("_"))
    return types.new_class(camel, (LatentCaptions,), {"skip_registration": True},
                           lambda ns: ns.update(name=name, __module__=__name__))


def check_writable(plan: Plan, overwrite: bool) -> None:
    """Raises FileExistsError before any encoding when the dataset exists and `overwrite` is False."""
    path = plan.folder / DATASET_VERSION
    if (path / "dataset_info.json").exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it or pick another --out_name")


def write_dataset(plan: Plan, *, overwrite: bool = False, keep_work: bool = False) -> dict:
    """Phase 2 (one process, after all chunks exist): the tfds dataset, latent_info.json and caption files.
    Returns the latent info."""
    missing = missing_chunks(plan)
    if missing:
        raise FileNotFoundError(f"{len(missing)} chunk(s) not encoded yet ({', '.join(missing[:3])}...); run the "
                                f"encode on every process first (the same command resumes)")
    make = lambda: _builder_class(plan.out_name)(plan=plan, data_dir=os.fspath(plan.folder.parent))
    builder = make()
    if builder.is_prepared():
        if not overwrite:
            raise FileExistsError(f"{builder.data_path} already exists; pass --overwrite to replace it")
        builder.data_path.rmtree()
        builder = make()
    builder.download_and_prepare()
    mean, std, count = channel_statistics(plan, plan.stats_split)
    skipped, captions = {}, {}
    for split in plan.splits:
        skipped[split], captions[split] = [], []
        for chunk in _chunks(plan, split):
            skipped[split] += json.loads(str(chunk["skipped"]))
            captions[split] += [c for row in chunk["captions"] for c in json.loads(str(row))]
    data_path = epath.Path(builder.data_path)
    for split, texts in captions.items():
        (data_path / CAPTIONS_FILE.format(split=split)).write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    info = {
        "shape": list(plan.shape), "mean": mean, "std": std, "stored": plan.stored, "stats_split": plan.stats_split,
        "stats_clips": count, "vae_hash": plan.vae["hash"], "vae_step": plan.vae["step"],
        "vae_workdir": plan.vae["workdir"], "source": plan.source, "seed": plan.seed,
        "splits": {split: builder.info.splits[split].num_examples for split in plan.splits},
        "skipped": skipped,
    }
    (data_path / latents.INFO_FILE).write_text(json.dumps(info, indent=1))
    if not keep_work:
        (plan.folder / WORK_FOLDER / plan.fingerprint).rmtree()
        if not any((plan.folder / WORK_FOLDER).iterdir()):
            (plan.folder / WORK_FOLDER).rmdir()
    return info
