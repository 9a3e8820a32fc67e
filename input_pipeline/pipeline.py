"""Grain loaders: per-process sharding, tokenisation, batching, checkpointable state.

Train: one seeded, per-epoch shuffle of the train records, repeated forever,
defines a global stream; global batch k is stream positions [k*B, (k+1)*B) and
process p reads only its rows [p*b, (p+1)*b) of it. So the global batch (as
assembled by `vlm.sharding.global_batch`, rows in process order) is the same
whatever the number of processes: 2 hosts x 4 chips train exactly like 1 x 8,
and a run can resume on a different number of hosts. Within an epoch the
processes read disjoint records that together cover the split. Per-process
batches: {"video": uint8 [b, T, H, W, 3], "tokens": int32 [b, L]},
b = global_batch_size // process_count.
The iterator is a `grain.DatasetIterator`: `get_state()`/`set_state()` give the
exact position, and `grain.checkpoint.CheckpointSave/CheckpointRestore` store
it in an Orbax checkpoint (one JSON file per process).

Sources: `data.name` is "synthetic" or a dataset built with `vlm data build`
(tfds ArrayRecord; `datasets.py`); `data.sources` mixes several, with weights
and optional step ranges (an image-then-video curriculum), at the level of the
global stream: position i of the mixture is, by a fixed seeded pattern,
position j of one source's own shuffled, repeated stream, so the mixture is as
process-independent and resumable as a single source. Built datasets' records
are decoded in the stream (in the Grain worker processes when worker_count >
0): sampled, resized and cropped per `data.sampling`, `data.train_crop`, ...
(`video.py`); their batches add "frame_mask" bool [b, T] and the counter
"data/skipped" (int64 []): records this process has skipped so far because they
did not decode, each replaced by the next good record of its stream (see
`datasets.DecodedStream`). The counter is part of the iterator state.

Latent datasets (`vlm data encode`; `latents.py`) are read the same way, their
records decoded by `latents.LatentDecoder`: batches hold "latents" float32
[b, t, h, w, c] instead of "video" (and no "frame_mask"); a mixture is all
latent datasets or none.

Eval: the held-out split in order, once. Global batch k holds records
[k*B, (k+1)*B); process p's share of it is the p-th block of b records, so the
rows of the global array built from the per-process batches are in split
order. The last global batch is padded (mask False), so every batch has the
same shape and every process yields the same number of batches:
    {"video": uint8 [b, T, H, W, 3], "tokens": int32 [b, L],
     "caption": object [b] (str), "mask": bool [b]}
(+ "frame_mask" bool [b, T] for a built dataset, whose records that fail to
decode are left out: mask False).
"""

from __future__ import annotations

import fractions
import math
import sys

import grain
import numpy as np
from absl import flags

from input_pipeline import datasets, latents, synthetic, video
from input_pipeline.sources import DEFAULTS as _DATA_DEFAULTS
from input_pipeline.sources import Source, config_error as _config_error, setting, train_sources  # noqa: F401
from input_pipeline.tokenizer import Tokenizer, get_tokenizer

# The dataset's own seed: fixed, so every training seed sees the same records
# and is evaluated on the same held-out set. The training seed only orders them.
DATASET_SEED = 0

CROP_MODES = ("random", "center")


def _stages(sources: list[Source]) -> list[tuple[int, dict[tuple, float]]]:
    """[(first step, {stream key: weight})] for every step range with a fixed set of active sources."""
    bounds = sorted({0} | {s.start_step for s in sources} | {s.end_step for s in sources if s.end_step is not None})
    stages = []
    for step in bounds:
        weights: dict[tuple, float] = {}
        for s in sources:
            if s.start_step <= step and (s.end_step is None or step < s.end_step):
                weights[s.stream_key] = weights.get(s.stream_key, 0.0) + s.weight
        if not weights:
            raise _config_error(
                f"config.data.sources: no source covers step {step}; adjust start_step/end_step so that every"
                " step has at least one active source"
            )
        if not stages or stages[-1][1] != weights:
            stages.append((step, weights))
    return stages


def _is_built(name: str) -> bool:
    return name != datasets.SYNTHETIC


# data key → smallest allowed value (integers). vocab_size: ids 0-3 are pad/unk/bos/eos.
DATA_INTEGERS = dict(num_frames=1, resolution=1, max_text_len=1, vocab_size=5, train_size=1, eval_size=1,
                     max_objects=1, worker_count=0, prefetch=0, decode_threads=0)


def check_data_values(data_config) -> None:
    """Ranges and types of the `data` keys, without touching any file: one line naming the key.

    Runs in `vlm.config.validate` (before anything is built or written) and again when a loader is made.
    Keys a family's data config does not have (a video-only dataset has no max_text_len) are not checked.
    """
    for key, low in DATA_INTEGERS.items():
        if key not in data_config and key not in _DATA_DEFAULTS:
            continue
        value = setting(data_config, key) if key in _DATA_DEFAULTS else data_config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _config_error(f"config.data.{key}={value!r} must be an integer ≥ {low}")
    fps = setting(data_config, "sample_fps")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps < 0:
        raise _config_error(f"config.data.sample_fps={fps!r} must be a finite number ≥ 0 (0 = unused)")
    if not isinstance(setting(data_config, "train_flip"), bool):
        raise _config_error(f"config.data.train_flip={setting(data_config, 'train_flip')!r} must be True or False")
    if not isinstance(data_config.name, str) or not data_config.name:
        raise _config_error(f"config.data.name={data_config.name!r} must name a dataset (\"synthetic\" or one built "
                            f"with `vlm data build`)")


def check_data_config(data_config, sources: list[Source] | None = None) -> None:
    """Checks `data` before any data is read: one line per problem, naming the key and the fix."""
    check_data_values(data_config)
    sampling = setting(data_config, "sampling")
    if sampling not in video.SAMPLING_MODES:
        raise _config_error(f"config.data.sampling={sampling!r} is unknown; choose one of {', '.join(video.SAMPLING_MODES)}")
    if sampling == "fps" and not setting(data_config, "sample_fps") > 0:
        raise _config_error("config.data.sampling='fps' needs config.data.sample_fps > 0 (frames per second)")
    if setting(data_config, "short_clips") not in video.SHORT_CLIP_MODES:
        raise _config_error(
            f"config.data.short_clips={setting(data_config, 'short_clips')!r} is unknown; choose one of"
            f" {', '.join(video.SHORT_CLIP_MODES)}"
        )
    if setting(data_config, "train_crop") not in CROP_MODES:
        raise _config_error(
            f"config.data.train_crop={setting(data_config, 'train_crop')!r} is unknown; choose one of {', '.join(CROP_MODES)}"
        )
    try:
        for source in sources if sources is not None else train_sources(data_config):
            key = "config.data.train_split" if not setting(data_config, "sources") else "config.data.sources split"
            datasets.check_split(source.name, source.data_dir, source.split, key)
        datasets.check_split(data_config.name, data_config.data_dir, datasets.eval_split(data_config),
                             "config.data.eval_split")
    except datasets.DatasetError as e:
        raise _config_error(str(e)) from None
    kinds = {s.name: latents.is_latent_dataset(s.name, s.data_dir) for s in sources or train_sources(data_config)}
    if len(set(kinds.values())) > 1:
        raise _config_error(f"config.data.sources mixes latent datasets ({', '.join(n for n, k in kinds.items() if k)})"
                            f" with video datasets ({', '.join(n for n, k in kinds.items() if not k)}); a batch holds "
                            "either latents or video")


def _synthetic_source(data_config, split: str) -> synthetic.SyntheticVideoCaptions:
    return synthetic.SyntheticVideoCaptions(
        split,
        num_examples=data_config.train_size if split == "train" else data_config.eval_size,
        num_frames=data_config.num_frames,
        resolution=data_config.resolution,
        seed=DATASET_SEED,
        max_objects=data_config.max_objects,
    )


def _data_source(data_config, split: str) -> grain.sources.RandomAccessDataSource:
    """The synthetic dataset's records for `split` ("train" or "heldout")."""
    if data_config.name == datasets.SYNTHETIC:
        return _synthetic_source(data_config, split)
    raise ValueError(f"_data_source is for the synthetic dataset, not {data_config.name!r}")


def eval_size(data_config) -> int:
    """Number of (unpadded) held-out examples: data.eval_size, at most the eval split's size."""
    if data_config.name == datasets.SYNTHETIC:
        return data_config.eval_size
    split = datasets.eval_split(data_config)
    return min(data_config.eval_size, len(datasets.records(data_config.name, split, data_config.data_dir)))


def num_eval_batches(data_config, global_batch_size: int) -> int:
    """Batches the eval iterator yields on every process (the last one padded)."""
    return math.ceil(eval_size(data_config) / global_batch_size)


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # Only here: Grain workers unpickle this module and need no JAX.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of process_count {process_count}"
        )
    return global_batch_size // process_count


def _shuffle_seed(seed: int) -> int:
    """A 32-bit shuffle seed hashed from the training seed.

    Grain shuffles epoch e with seed + e, so with the raw seed, seed 1 would
    replay seed 0's second epoch; hashing makes runs with nearby seeds unrelated.
    """
    return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


class TokenizeCaptions(grain.transforms.Map):
    """Adds "tokens" int32 [b, L] for a batch's "caption" [b] (each with eos).

    Train batches drop the captions; eval batches keep them as an object array
    [b] of str. One SentencePiece call per batch, not per example.
    """

    def __init__(self, tokenizer: Tokenizer, max_len: int, keep_captions: bool):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.keep_captions = keep_captions

    def map(self, batch: dict) -> dict:
        batch = dict(batch)
        captions = batch.pop("caption").tolist()
        batch["tokens"] = self.tokenizer.encode(captions, self.max_len)
        if self.keep_captions:
            batch["caption"] = np.array(captions, dtype=object)
        return batch


def _with_prefetch(dataset: grain.MapDataset, data_config) -> grain.IterDataset:
    """Up to `prefetch` batches computed ahead, in `worker_count` processes if > 0.

    One background thread per process computes the batches in order: rendering
    holds the GIL, so more threads only contend; worker processes are what
    parallelise the work.
    """
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=min(data_config.prefetch, 1), prefetch_buffer_size=data_config.prefetch)
    )
    if data_config.worker_count > 0:
        # Grain's worker start reads an absl flag directly, which raises
        # UnparsedFlagAccessError outside an absl app (tests, notebooks); with
        # no command line to parse, the flags' defaults are the values.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Worker i computes batches i, i + n, ...; they are interleaved back in
        # order, so the batches do not depend on the number of workers.
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data_config.worker_count, per_worker_buffer_size=max(data_config.prefetch, 1)
            )
        )
    return iter_dataset


def _stream_seed(seed: int, stream: int) -> int:
    """Shuffle seed of mixture stream `stream` (stream 0 shuffles like a single dataset)."""
    return _shuffle_seed(seed) if stream == 0 else int(np.random.SeedSequence([seed, 0x5EED, stream]).generate_state(1)[0])


def _source_stream(source: Source, data_config, seed: int, stream: int, extras: bool) -> grain.MapDataset:
    """One source's infinite stream of examples: its records, reshuffled every epoch, decoded."""
    if source.name == datasets.SYNTHETIC:
        records = _synthetic_source(data_config, source.split)
    else:
        records = datasets.records(source.name, source.split, source.data_dir)
    if len(records) == 0:
        raise _config_error(f"split {source.split!r} of dataset {source.name!r} is empty")
    dataset = grain.MapDataset.source(records).shuffle(seed=_stream_seed(seed, stream)).repeat()
    if source.name == datasets.SYNTHETIC:
        return dataset.map(datasets.WithExtras()) if extras else dataset
    decoder = latents.decoder_for(data_config, source.name, source.data_dir)  # video clips or cached latents
    return datasets.DecodedStream(dataset, decoder, seed=_shuffle_seed(seed), stream_id=stream)


def _integer_proportions(weights: list[float]) -> list[int]:
    """Small integers in the ratio of `weights` (to 1 in 1000): [0.3, 0.7] → [3, 7]."""
    total = sum(weights)
    fractions_ = [fractions.Fraction(w / total).limit_denominator(1000) for w in weights]
    scale = math.lcm(*(f.denominator for f in fractions_))
    if scale > 10_000:  # fall back to per-mille
        counts = [max(1, round(1000 * w / total)) for w in weights]
    else:
        counts = [max(1, int(f * scale)) for f in fractions_]
    divisor = math.gcd(*counts)
    return [c // divisor for c in counts]


class Mixture(grain.MapDataset):
    """Position i of a weighted mixture of infinite streams: (stream s, position j of s), by index arithmetic.

    Each stage (a range of global positions with fixed weights) repeats a pattern of P
    positions holding stream s exactly p_s times (the weights as small integers), in a
    seeded random order; so every window of P positions has the exact proportions and
    position i → (s, j) is O(1): resumable and process-independent like one stream. A
    stream's positions continue across stages.
    """

    def __init__(self, streams: list[grain.MapDataset], stages: list[tuple[int, list[float]]], seed: int):
        super().__init__(streams)
        self._starts, self._patterns, self._ranks, self._counts, self._bases = [], [], [], [], []
        base = [0] * len(streams)
        for g, (start, weights) in enumerate(stages):
            active = [s for s, w in enumerate(weights) if w > 0]
            counts = _integer_proportions([weights[s] for s in active])
            pattern = np.repeat(np.array(active), counts)
            pattern = pattern[np.random.default_rng([seed, 0x313, g]).permutation(len(pattern))]
            ranks = np.zeros(len(pattern), np.int64)
            seen = [0] * len(streams)
            for r, s in enumerate(pattern):
                ranks[r], seen[s] = seen[s], seen[s] + 1
            per_stream = [0] * len(streams)
            for s, c in zip(active, counts):
                per_stream[s] = c
            if g:  # positions each stream took in the previous stage
                length = start - self._starts[-1]
                cycles, rest = divmod(length, len(self._patterns[-1]))
                for s in range(len(streams)):
                    base[s] += cycles * self._counts[-1][s] + int(np.sum(self._patterns[-1][:rest] == s))
            self._starts.append(start)
            self._patterns.append(pattern)
            self._ranks.append(ranks)
            self._counts.append(per_stream)
            self._bases.append(list(base))

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"Mixture(stages={len(self._starts)}, streams={len(self._parents)})"

    def locate(self, index: int) -> tuple[int, int]:
        """(stream, position in that stream) of mixture position `index`."""
        g = int(np.searchsorted(self._starts, index, side="right")) - 1
        cycle, r = divmod(index - self._starts[g], len(self._patterns[g]))
        s = int(self._patterns[g][r])
        return s, self._bases[g][s] + cycle * self._counts[g][s] + int(self._ranks[g][r])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        stream, position = self.locate(int(index))
        return self._parents[stream][position]


def train_stream(data_config, *, global_batch_size: int, seed: int) -> tuple[grain.MapDataset, bool]:
    """(the global stream of training examples, whether they carry "frame_mask"/"skipped").

    The synthetic set alone gives plain {"video", "caption"} examples, as it always has.
    """
    sources = train_sources(data_config)
    check_data_config(data_config, sources)
    extras = any(_is_built(s.name) for s in sources)
    keys = list(dict.fromkeys(s.stream_key for s in sources))
    first_of = {key: next(s for s in sources if s.stream_key == key) for key in keys}
    streams = [_source_stream(first_of[key], data_config, seed, i, extras) for i, key in enumerate(keys)]
    stages = _stages(sources)
    if len(streams) == 1:
        return streams[0], extras
    positions = [(step * global_batch_size, [weights.get(key, 0.0) for key in keys]) for step, weights in stages]
    return Mixture(streams, positions, _shuffle_seed(seed)), extras


class CountSkipped(grain.IterDataset):
    """Turns each batch's per-row "skipped" [b] into "data/skipped": this process's running total (int64 [])."""

    def __iter__(self) -> grain.DatasetIterator:
        return _CountSkippedIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "CountSkipped"


class _CountSkippedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._skipped = 0

    def __next__(self) -> dict:
        batch = dict(next(self._parent))
        self._skipped += int(np.sum(batch.pop("skipped")))
        batch["data/skipped"] = np.int64(self._skipped)
        return batch

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "skipped": self._skipped}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = int(state["skipped"])


def create_train_iterator(
    data_config,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    start_batch: int = 0,
) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator of this process's train batches.

    Yields {"video": uint8 [b, T, H, W, 3], "tokens": int32 [b, L]} with
    b = global_batch_size // process_count, plus "frame_mask" bool [b, T] and
    "data/skipped" int64 [] when a built dataset is among the sources. The order
    depends only on `seed` and the process layout (not on worker_count).
    process_index/process_count default to jax.process_index()/jax.process_count().
    `start_batch` starts at global batch k of the stream: because the stream does
    not depend on the process layout, this resumes a run on a different number of
    processes (the Grain state saved by N processes cannot be read by M; the
    "data/skipped" total then restarts from 0).
    """
    process_index, process_count = _process_layout(process_index, process_count)
    local_batch_size = _local_batch_size(global_batch_size, process_count)
    if data_config.name == datasets.SYNTHETIC and not setting(data_config, "sources"):
        source = _data_source(data_config, "train")
        if len(source) < process_count:
            raise ValueError(f"train_size {len(source)} leaves some of the {process_count} processes no records")
    stream, extras = train_stream(data_config, global_batch_size=global_batch_size, seed=seed)
    dataset = (
        ProcessRows(stream, global_batch_size, local_batch_size, process_index)
        .batch(local_batch_size, drop_remainder=True)  # batches run across epoch boundaries
        .map(TokenizeCaptions(get_tokenizer(data_config), data_config.max_text_len, keep_captions=False))
    )
    if start_batch:
        dataset = dataset[start_batch:]
    iter_dataset = _with_prefetch(dataset, data_config)
    if extras:
        iter_dataset = CountSkipped(iter_dataset)
    return iter(iter_dataset)


class ProcessRows(grain.MapDataset):
    """This process's rows of every global batch of a (global) record stream.

    Element m is row m % b of local batch m // b, i.e. stream position
    (m // b) * B + p * b + m % b. The mapping is pure index arithmetic, so the
    iterator state is still one integer and resumes exactly.
    """

    def __init__(self, parent: grain.MapDataset, global_batch_size: int, local_batch_size: int, process_index: int):
        super().__init__(parent)
        self._global, self._local, self._process = global_batch_size, local_batch_size, process_index

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def _position(self, index: int) -> int:
        batch, row = divmod(int(index), self._local)
        return batch * self._global + self._process * self._local + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._position(index)]

    def __str__(self) -> str:
        return f"ProcessRows(B={self._global}, b={self._local}, p={self._process})"


class _PaddedEvalShard:
    """This process's eval slots: its block of b records in every global batch, padded at the end.

    Slot j is row j % b of local batch j // b, i.e. record (j // b) * B + p * b + j % b
    of the split; slots past the end of the split are blank examples with mask False.
    `decode` turns a record into an example (built datasets); a record that fails to
    decode becomes a blank example with mask False too (left out of the metrics).
    """

    def __init__(self, source, global_batch_size: int, local_batch_size: int, process_index: int,
                 size: int | None = None, decoder: datasets.ClipDecoder | None = None):
        self.source = source
        self.size = len(source) if size is None else min(size, len(source))
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size
        self.process_index = process_index
        self.num_batches = math.ceil(self.size / global_batch_size)
        self.decoder = decoder
        if decoder is None:
            self._blank = {"video": np.zeros_like(source[0]["video"]), "caption": ""}
        else:
            self._blank = decoder.blank()

    def __len__(self) -> int:
        return self.num_batches * self.local_batch_size

    def __getitem__(self, slot: int) -> dict:
        batch, row = divmod(int(slot), self.local_batch_size)
        index = batch * self.global_batch_size + self.process_index * self.local_batch_size + row
        if index >= self.size:
            return {**self._blank, "mask": np.False_}
        if self.decoder is None:
            return {**self.source[index], "mask": np.True_}
        try:
            return {**self.decoder(self.source[index], None), "mask": np.True_}
        except Exception:  # noqa: BLE001 - an undecodable record is left out, as in training
            return {**self._blank, "mask": np.False_}


def create_eval_iterator(
    data_config,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Finite iterable over the held-out split, once per `iter()`; see the module docstring for the layout.

    Every process yields `num_eval_batches(data_config, global_batch_size)`
    batches of b = global_batch_size // process_count rows; the processes'
    rows with mask True together cover the split exactly once. The split is
    data.eval_split (default: "heldout" for synthetic, else "validation" or
    "test"), its first data.eval_size examples.
    """
    process_index, process_count = _process_layout(process_index, process_count)
    local_batch_size = _local_batch_size(global_batch_size, process_count)
    if data_config.name == datasets.SYNTHETIC:
        shard = _PaddedEvalShard(_data_source(data_config, datasets.eval_split(data_config)),
                                 global_batch_size, local_batch_size, process_index, size=data_config.eval_size)
    else:
        try:
            split = datasets.eval_split(data_config)
            source = datasets.records(data_config.name, split, data_config.data_dir)
        except datasets.DatasetError as e:
            raise _config_error(str(e)) from None
        decoder = latents.decoder_for(data_config, data_config.name, data_config.data_dir)
        shard = _PaddedEvalShard(source, global_batch_size, local_batch_size, process_index,
                                 size=data_config.eval_size, decoder=decoder)
    dataset = (
        grain.MapDataset.source(shard)
        .batch(local_batch_size)
        .map(TokenizeCaptions(get_tokenizer(data_config), data_config.max_text_len, keep_captions=True))
    )
    return _with_prefetch(dataset, data_config)
