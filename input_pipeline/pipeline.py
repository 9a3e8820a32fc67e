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

Eval: the held-out split in order, once. Global batch k holds records
[k*B, (k+1)*B); process p's share of it is the p-th block of b records, so the
rows of the global array built from the per-process batches are in split
order. The last global batch is padded (mask False), so every batch has the
same shape and every process yields the same number of batches:
    {"video": uint8 [b, T, H, W, 3], "tokens": int32 [b, L],
     "caption": object [b] (str), "mask": bool [b]}.
"""

from __future__ import annotations

import math

import grain
import numpy as np
from absl import flags

from input_pipeline import synthetic
from input_pipeline.tokenizer import Tokenizer, get_tokenizer

# The dataset's own seed: fixed, so every training seed sees the same records
# and is evaluated on the same held-out set. The training seed only orders them.
DATASET_SEED = 0

DATASETS = ("synthetic",)


def _data_source(data_config, split: str) -> grain.sources.RandomAccessDataSource:
    """The configured dataset's records for `split` ("train" or "heldout")."""
    if data_config.name == "synthetic":
        return synthetic.SyntheticVideoCaptions(
            split,
            num_examples=data_config.train_size if split == "train" else data_config.eval_size,
            num_frames=data_config.num_frames,
            resolution=data_config.resolution,
            seed=DATASET_SEED,
            max_objects=data_config.max_objects,
        )
    raise ValueError(f"unknown dataset {data_config.name!r}; known: {', '.join(DATASETS)}")


def eval_size(data_config) -> int:
    """Number of (unpadded) held-out examples."""
    return data_config.eval_size


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
    b = global_batch_size // process_count. The order depends only on `seed`
    and the process layout (not on worker_count). process_index/process_count
    default to jax.process_index()/jax.process_count(). `start_batch` starts at
    global batch k of the stream: because the stream does not depend on the
    process layout, this resumes a run on a different number of processes (the
    Grain state saved by N processes cannot be read by M).
    """
    process_index, process_count = _process_layout(process_index, process_count)
    local_batch_size = _local_batch_size(global_batch_size, process_count)
    source = _data_source(data_config, "train")
    if len(source) < process_count:
        raise ValueError(f"train_size {len(source)} leaves some of the {process_count} processes no records")
    stream = grain.MapDataset.source(source).shuffle(seed=_shuffle_seed(seed)).repeat()  # reshuffled every epoch
    dataset = (
        ProcessRows(stream, global_batch_size, local_batch_size, process_index)
        .batch(local_batch_size, drop_remainder=True)  # batches run across epoch boundaries
        .map(TokenizeCaptions(get_tokenizer(data_config), data_config.max_text_len, keep_captions=False))
    )
    if start_batch:
        dataset = dataset[start_batch:]
    return iter(_with_prefetch(dataset, data_config))


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
    """

    def __init__(self, source, global_batch_size: int, local_batch_size: int, process_index: int):
        self.source = source
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size
        self.process_index = process_index
        self.num_batches = math.ceil(len(source) / global_batch_size)
        first = source[0]
        self._blank_video = np.zeros_like(first["video"])

    def __len__(self) -> int:
        return self.num_batches * self.local_batch_size

    def __getitem__(self, slot: int) -> dict:
        batch, row = divmod(int(slot), self.local_batch_size)
        index = batch * self.global_batch_size + self.process_index * self.local_batch_size + row
        if index >= len(self.source):
            return {"video": self._blank_video, "caption": "", "mask": np.False_}
        return {**self.source[index], "mask": np.True_}


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
    rows with mask True together cover the split exactly once.
    """
    process_index, process_count = _process_layout(process_index, process_count)
    local_batch_size = _local_batch_size(global_batch_size, process_count)
    shard = _PaddedEvalShard(_data_source(data_config, "heldout"), global_batch_size, local_batch_size, process_index)
    dataset = (
        grain.MapDataset.source(shard)
        .batch(local_batch_size)
        .map(TokenizeCaptions(get_tokenizer(data_config), data_config.max_text_len, keep_captions=True))
    )
    return _with_prefetch(dataset, data_config)
