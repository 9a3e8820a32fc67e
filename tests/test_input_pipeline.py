"""Grain loaders: batch layout, determinism, per-process sharding, resumable state, eval coverage."""

import hashlib

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from input_pipeline import pipeline
from input_pipeline.synthetic import SyntheticVideoCaptions
from input_pipeline.tokenizer import get_tokenizer

NUM_FRAMES, RESOLUTION = 3, 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def _data_config(data_dir, **overrides):
    config = ml_collections.ConfigDict(
        dict(
            name="synthetic",
            num_frames=NUM_FRAMES,
            resolution=RESOLUTION,
            train_size=48,
            eval_size=20,
            max_objects=1,
            max_text_len=12,
            vocab_size=128,
            tokenizer="",
            data_dir=data_dir,
            worker_count=0,
            prefetch=2,
        )
    )
    config.update(overrides)
    return config


def _video_key(video: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(video).tobytes()).hexdigest()


def _train_record_index(data_config) -> dict[str, int]:
    """Record index of every train video, keyed by the video's hash: recovers which record a batch row is."""
    source = SyntheticVideoCaptions(
        "train", data_config.train_size, data_config.num_frames, data_config.resolution, seed=pipeline.DATASET_SEED
    )
    index = {_video_key(source[i]["video"]): i for i in range(len(source))}
    assert len(index) == len(source)  # every record's video is distinct
    return index


def _take(iterator, num_batches):
    return [next(iterator) for _ in range(num_batches)]


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for batch, other in zip(first, second):
        assert batch.keys() == other.keys()
        for key in batch:
            np.testing.assert_array_equal(batch[key], other[key])


def test_train_batch_layout(data_dir):
    config = _data_config(data_dir)
    iterator = pipeline.create_train_iterator(config, global_batch_size=8, seed=0, process_index=0, process_count=2)
    batch = next(iterator)
    assert set(batch) == {"video", "tokens"}
    assert batch["video"].shape == (4, NUM_FRAMES, RESOLUTION, RESOLUTION, 3) and batch["video"].dtype == np.uint8
    assert batch["tokens"].shape == (4, 12) and batch["tokens"].dtype == np.int32
    tokenizer = get_tokenizer(config)
    assert np.all((batch["tokens"] >= 0) & (batch["tokens"] < tokenizer.vocab_size))
    assert np.all((batch["tokens"] == tokenizer.eos_id).sum(axis=1) == 1)
    # The tokens are the caption of the video in the same row.
    records = SyntheticVideoCaptions("train", 48, NUM_FRAMES, RESOLUTION)
    index = _train_record_index(config)
    for video, tokens in zip(batch["video"], batch["tokens"]):
        assert tokenizer.decode(tokens) == records.caption(index[_video_key(video)])


def test_process_layout_defaults_to_jax_and_batch_must_divide(data_dir):
    config = _data_config(data_dir)
    # One JAX process here: the whole global batch is local.
    assert next(pipeline.create_train_iterator(config, global_batch_size=6, seed=0))["video"].shape[0] == 6
    with pytest.raises(ValueError, match="multiple of process_count 4"):
        pipeline.create_train_iterator(config, global_batch_size=6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="multiple of process_count 4"):
        pipeline.create_eval_iterator(config, global_batch_size=6, process_index=0, process_count=4)


def test_train_order_depends_only_on_seed(data_dir):
    config = _data_config(data_dir)
    make = lambda seed: pipeline.create_train_iterator(
        config, global_batch_size=8, seed=seed, process_index=0, process_count=1
    )
    seed_seven = _take(make(7), 8)
    _assert_same_batches(seed_seven, _take(make(7), 8))
    other = _take(make(8), 8)
    assert not np.array_equal(seed_seven[0]["video"], other[0]["video"])


def test_processes_read_disjoint_shards_covering_all_records(data_dir):
    config = _data_config(data_dir)
    index = _train_record_index(config)
    # 48 records, global batch 16 from 2 processes of 8 rows: 3 global batches make one epoch.
    rows_by_process = []
    for process_index in range(2):
        iterator = pipeline.create_train_iterator(
            config, global_batch_size=16, seed=0, process_index=process_index, process_count=2
        )
        rows_by_process.append([index[_video_key(video)] for batch in _take(iterator, 6) for video in batch["video"]])
    for epoch in range(2):
        shards = [set(rows[epoch * 24 : (epoch + 1) * 24]) for rows in rows_by_process]
        # Within an epoch the processes read disjoint records that together cover the split once.
        assert len(shards[0]) == len(shards[1]) == 24
        assert not shards[0] & shards[1]
        assert shards[0] | shards[1] == set(range(48))
    assert rows_by_process[0][:24] != rows_by_process[0][24:]  # reshuffled every epoch

    # The global batch does not depend on the number of processes: rows of process 0, then 1.
    single = pipeline.create_train_iterator(config, global_batch_size=16, seed=0, process_index=0, process_count=1)
    single_rows = [index[_video_key(video)] for batch in _take(single, 6) for video in batch["video"]]
    for k in range(6):
        assert single_rows[16 * k : 16 * k + 16] == (
            rows_by_process[0][8 * k : 8 * k + 8] + rows_by_process[1][8 * k : 8 * k + 8]
        )


@pytest.mark.parametrize("worker_count", [0, 1])
def test_state_restores_exactly_the_next_batches(data_dir, worker_count):
    config = _data_config(data_dir, worker_count=worker_count)
    make = lambda: pipeline.create_train_iterator(config, global_batch_size=8, seed=3, process_index=0, process_count=1)
    iterator = make()
    consumed = _take(iterator, 4)
    state = iterator.get_state()
    # 48 records in batches of 8: batches 5-7 cross into the second epoch.
    expected = _take(iterator, 3)
    resumed = make()
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 3), expected)
    # Worker processes do not change the data.
    reference = make() if worker_count == 0 else pipeline.create_train_iterator(
        _data_config(data_dir), global_batch_size=8, seed=3, process_index=0, process_count=1
    )
    _assert_same_batches(_take(reference, 7), consumed + expected)
    for it in (iterator, resumed, reference):
        it.close()


def test_orbax_checkpoint_manager_round_trip(data_dir, tmp_path):
    config = _data_config(data_dir)
    make = lambda: pipeline.create_train_iterator(config, global_batch_size=8, seed=0, process_index=0, process_count=1)
    iterator = make()
    _take(iterator, 5)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    # The state is captured when save is called: advancing afterwards does not change it.
    expected = _take(iterator, 2)
    resumed = make()
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        restored = manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert restored["data"] is resumed
    _assert_same_batches(_take(resumed, 2), expected)


@pytest.mark.parametrize("process_count, global_batch_size", [(1, 8), (2, 8), (4, 8), (2, 40)])
def test_eval_covers_heldout_once_in_order(data_dir, process_count, global_batch_size):
    config = _data_config(data_dir)  # 20 held-out examples
    heldout = SyntheticVideoCaptions("heldout", 20, NUM_FRAMES, RESOLUTION)
    tokenizer = get_tokenizer(config)
    local_batch_size = global_batch_size // process_count
    num_batches = pipeline.num_eval_batches(config, global_batch_size)
    assert num_batches == -(-20 // global_batch_size)
    per_process = []
    for process_index in range(process_count):
        batches = list(
            pipeline.create_eval_iterator(
                config, global_batch_size=global_batch_size, process_index=process_index, process_count=process_count
            )
        )
        assert len(batches) == num_batches
        for batch in batches:
            assert batch["video"].shape == (local_batch_size, NUM_FRAMES, RESOLUTION, RESOLUTION, 3)
            assert batch["video"].dtype == np.uint8
            assert batch["tokens"].shape == (local_batch_size, 12) and batch["tokens"].dtype == np.int32
            assert batch["caption"].shape == (local_batch_size,) and batch["caption"].dtype == object
            assert batch["mask"].shape == (local_batch_size,) and batch["mask"].dtype == np.bool_
        per_process.append(batches)
    # Global batch k is the processes' k-th batches stacked in process order.
    rows = {
        key: np.concatenate([per_process[p][k][key] for k in range(num_batches) for p in range(process_count)])
        for key in ("video", "tokens", "caption", "mask")
    }
    assert rows["mask"].tolist() == [True] * 20 + [False] * (num_batches * global_batch_size - 20)
    for i in range(20):
        example = heldout[i]
        assert rows["caption"][i] == example["caption"]
        np.testing.assert_array_equal(rows["video"][i], example["video"])
        assert tokenizer.decode(rows["tokens"][i]) == example["caption"]
    assert np.all(rows["video"][20:] == 0) and all(caption == "" for caption in rows["caption"][20:])


def test_eval_iterable_restarts_and_uses_workers(data_dir):
    config = _data_config(data_dir)
    evaluation = pipeline.create_eval_iterator(config, global_batch_size=8, process_index=0, process_count=1)
    first_pass = list(evaluation)
    _assert_same_batches(list(evaluation), first_pass)
    with_worker = pipeline.create_eval_iterator(
        _data_config(data_dir, worker_count=1), global_batch_size=8, process_index=0, process_count=1
    )
    _assert_same_batches(list(with_worker), first_pass)
