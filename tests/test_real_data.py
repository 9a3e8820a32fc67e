"""Training data from built video corpora: batches, process shards, exact resume, corrupt records, mixtures, CLI."""

import os
import shutil

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import SMALL_OVERRIDES, read_metrics, run_vlm
from input_pipeline import datasets, pipeline, testing, tokenizer
from input_pipeline.builders import media, video_captions

NUM_FRAMES, RESOLUTION = 3, 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two built datasets: "clean" (10 train videos + 4 images, 2 validation videos) and "corrupt"
    (30 inputs, 10% corrupt: 2 truncated videos that build, 1 file of noise that does not).

    The build's decode check would skip the truncated videos; it is switched off for "corrupt",
    which stands for data that goes bad after its build (or was built before the check)."""
    root = tmp_path_factory.mktemp("real")
    data_dir = str(root / "tfds")
    testing.write_corpus(str(root / "clean"), num_videos=12, num_images=4, validation=2)
    video_captions.build(str(root / "clean" / "manifest.jsonl"), data_dir, "clean")
    testing.write_corpus(str(root / "corrupt"), num_videos=19, num_images=8, validation=4, truncated=2, garbage=1,
                         seed=50)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(media, "check_decodes", lambda data, start, end: None)
        summary = video_captions.build(str(root / "corrupt" / "manifest.jsonl"), data_dir, "corrupt")
    assert summary.examples == {"train": 25, "validation": 4} and summary.num_skipped == 1
    return data_dir


def _config(data_dir, **overrides):
    config = ml_collections.ConfigDict(
        dict(name="clean", data_dir=data_dir, train_split="train", eval_split="", sources=(),
             num_frames=NUM_FRAMES, resolution=RESOLUTION, sampling="segments", sample_fps=0.0,
             short_clips="repeat", train_crop="random", train_flip=False, decode_threads=1,
             train_size=1000, eval_size=256, max_objects=1, max_text_len=16, vocab_size=128, tokenizer="",
             worker_count=0, prefetch=2)
    )
    config.update(overrides)
    return config


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def _record_of_caption(config) -> dict[str, str]:
    """caption → id of the train record it belongs to (captions are unique per record)."""
    records = datasets.records(config.name, "train", config.data_dir)
    return {c.decode(): r["id"].decode() for r in records for c in r["captions"]}


def _rows(config, batches) -> list[str]:
    tok = tokenizer.get_tokenizer(config)
    return [tok.decode(tokens) for batch in batches for tokens in batch["tokens"]]


def test_train_batches_from_a_built_dataset(data_dir):
    config = _config(data_dir)
    batches = _take(pipeline.create_train_iterator(config, global_batch_size=8, seed=0, process_index=0,
                                                   process_count=1), 2)
    batch = batches[0]
    assert set(batch) == {"video", "tokens", "frame_mask", "data/skipped"}
    assert batch["video"].shape == (8, NUM_FRAMES, RESOLUTION, RESOLUTION, 3) and batch["video"].dtype == np.uint8
    assert batch["tokens"].shape == (8, 16) and batch["tokens"].dtype == np.int32
    assert batch["frame_mask"].shape == (8, NUM_FRAMES) and batch["frame_mask"].all()
    assert batch["data/skipped"] == 0 and batch["video"].std() > 10
    known = _record_of_caption(config)
    assert all(caption in known for caption in _rows(config, batches))
    again = _take(pipeline.create_train_iterator(config, global_batch_size=8, seed=0, process_index=0,
                                                 process_count=1), 2)
    _same(batches, again)
    other = next(pipeline.create_train_iterator(config, global_batch_size=8, seed=1, process_index=0, process_count=1))
    assert not np.array_equal(other["video"], batch["video"])


@pytest.mark.parametrize("sampling, extra", [("uniform", {}), ("fps", dict(sample_fps=4.0, short_clips="pad"))])
def test_other_sampling_modes(data_dir, sampling, extra):
    config = _config(data_dir, sampling=sampling, num_frames=8, **extra)
    batch = next(pipeline.create_train_iterator(config, global_batch_size=4, seed=0, process_index=0,
                                                process_count=1))
    assert batch["video"].shape == (4, 8, RESOLUTION, RESOLUTION, 3)
    padded = ~batch["frame_mask"]
    assert not batch["video"][padded].any()
    # fps=4 over 8 frames spans 2 s; clips of 1-1.5 s and images end early and are padded.
    assert padded.any() == (sampling == "fps")


def test_eval_batches_cover_the_validation_split_in_order(data_dir):
    config = _config(data_dir)
    batches = list(pipeline.create_eval_iterator(config, global_batch_size=4, process_index=0, process_count=1))
    assert len(batches) == pipeline.num_eval_batches(config, 4) == 1
    batch = batches[0]
    assert batch["mask"].tolist() == [True, True, False, False] and batch["frame_mask"][:2].all()
    records = datasets.records("clean", "validation", data_dir)
    assert batch["caption"][:2].tolist() == [r["captions"][0].decode() for r in records]
    assert not batch["video"][2:].any() and not batch["frame_mask"][2:].any()


def test_processes_read_disjoint_shards_covering_the_split(data_dir):
    config = _config(data_dir)
    known = _record_of_caption(config)  # 14 train records
    per_process = []
    for p in range(2):
        iterator = pipeline.create_train_iterator(config, global_batch_size=14, seed=0, process_index=p,
                                                  process_count=2)
        per_process.append([known[c] for c in _rows(config, _take(iterator, 2))])
    for epoch in range(2):
        shards = [set(rows[7 * epoch : 7 * epoch + 7]) for rows in per_process]
        assert len(shards[0]) == len(shards[1]) == 7 and not shards[0] & shards[1]
        assert shards[0] | shards[1] == set(known.values())
    single = _take(pipeline.create_train_iterator(config, global_batch_size=14, seed=0, process_index=0,
                                                  process_count=1), 2)
    assert [known[c] for c in _rows(config, single)] == (
        per_process[0][:7] + per_process[1][:7] + per_process[0][7:] + per_process[1][7:])


def test_resume_mid_epoch_continues_with_the_next_batches(data_dir, tmp_path):
    """25 records (2 bad), batches of 5: checkpoint after 2, then 4 more batches cross into epoch 2."""
    config = _config(data_dir, name="corrupt", worker_count=1)
    make = lambda: pipeline.create_train_iterator(config, global_batch_size=5, seed=3, process_index=0,
                                                  process_count=1)
    iterator = make()
    consumed = _take(iterator, 2)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    expected = _take(iterator, 4)
    resumed = make()
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    _same(_take(resumed, 4), expected)  # including the running "data/skipped"
    # Worker processes change nothing.
    _same(_take(pipeline.create_train_iterator(_config(data_dir, name="corrupt"), global_batch_size=5, seed=3,
                                               process_index=0, process_count=1), 6), consumed + expected)
    for it in (iterator, resumed):
        it.close()


def test_corrupt_records_are_skipped_counted_and_replaced(data_dir):
    config = _config(data_dir, name="corrupt")
    seed = 5
    records = datasets.records("corrupt", "train", data_dir)
    ids = [r["id"].decode() for r in records]
    bad = {i for i, name in enumerate(ids) if name in ("media/video_019.mp4", "media/video_020.mp4")}
    assert len(bad) == 2  # the two truncated videos
    batches = _take(pipeline.create_train_iterator(config, global_batch_size=5, seed=seed, process_index=0,
                                                   process_count=1), 5)  # exactly one epoch
    assert [int(b["data/skipped"]) for b in batches][-1] == 2
    assert all(b["video"].shape == (5, NUM_FRAMES, RESOLUTION, RESOLUTION, 3) for b in batches)
    # A bad record's position holds the next good record of the stream.
    order = list(grain.MapDataset.range(len(records)).shuffle(seed=pipeline._stream_seed(seed, 0)))
    rows = _rows(config, batches)
    captions = lambda i: {c.decode() for c in records[i]["captions"]}
    for position, index in enumerate(order):
        if index in bad:
            substitute = next(order[p] for p in range(position + 1, len(order)) if order[p] not in bad)
            assert rows[position] in captions(substitute)
        else:
            assert rows[position] in captions(index)


def test_mixture_with_a_curriculum_is_exact_and_process_independent(data_dir):
    sources = (
        dict(name="synthetic", end_step=2),  # steps 0, 1: synthetic only
        dict(name="synthetic", weight=1, start_step=2),  # then 1 synthetic : 3 clean
        dict(name="clean", weight=3.0, start_step=2),
    )
    config = _config(data_dir, name="clean", sources=sources)
    batches = _take(pipeline.create_train_iterator(config, global_batch_size=8, seed=0, process_index=0,
                                                   process_count=1), 5)
    known = _record_of_caption(_config(data_dir))
    from_clean = [[c in known for c in _rows(config, [b])] for b in batches]
    assert [sum(flags) for flags in from_clean] == [0, 0, 6, 6, 6]
    assert all(b["frame_mask"].all() and set(b) == {"video", "tokens", "frame_mask", "data/skipped"} for b in batches)
    halves = [_take(pipeline.create_train_iterator(config, global_batch_size=8, seed=0, process_index=p,
                                                   process_count=2), 5) for p in range(2)]
    for k in range(5):
        np.testing.assert_array_equal(np.concatenate([halves[0][k]["tokens"], halves[1][k]["tokens"]]),
                                      batches[k]["tokens"])
        np.testing.assert_array_equal(np.concatenate([halves[0][k]["video"], halves[1][k]["video"]]),
                                      batches[k]["video"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(name="webvid"), "dataset 'webvid' not found in data_dir .*vlm data build"),
        (dict(train_split="training"), "config.data.train_split='training'.*splits: train, validation"),
        (dict(eval_split="test"), "config.data.eval_split='test'"),
        (dict(sampling="random"), "config.data.sampling='random' is unknown"),
        (dict(sampling="fps"), "sample_fps > 0"),
        (dict(sources=(dict(name="clean", wieght=2),)), r"sources\[0\] has unknown key\(s\) wieght"),
        (dict(sources=(dict(name="clean", end_step=10),)), "no source covers step 10"),
    ],
)
def test_bad_data_configs_are_one_line_errors(data_dir, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        pipeline.create_train_iterator(_config(data_dir, **overrides), global_batch_size=4, seed=0,
                                       process_index=0, process_count=1)
    assert "\n" not in str(error.value)


def test_tokenizer_trains_on_a_built_dataset(data_dir, tmp_path):
    path = tokenizer.main_train(os.path.join(data_dir, "clean"), 64, str(tmp_path / "spm"))
    model = tokenizer.Tokenizer(path)
    assert model.decode(model.encode(["clip 3 of a bar moving right"], 16)[0]) == "clip 3 of a bar moving right"
    # A dataset without the captions file (a Beam build) is read record by record, to the same captions.
    copy = tmp_path / "copy" / "1.0.0"
    shutil.copytree(datasets.dataset_path("clean", data_dir), copy)
    os.remove(copy / "captions-train.txt")
    assert sorted(datasets.captions_in(str(copy), "train", 1000)) == sorted(
        datasets.captions("clean", "train", data_dir, 1000))
    # The run's own tokenizer: trained on the dataset's captions, cached under its name.
    cached = tokenizer.get_tokenizer(_config(data_dir, vocab_size=64)).model_path
    assert os.path.basename(cached).startswith("clean_") and cached.startswith(data_dir)


def test_build_and_train_from_the_command_line(tmp_path):
    """A corpus with 10% corrupt files builds (the file of noise and the 2 truncated videos skipped) and
    trains, skipping nothing."""
    folder, data_dir = str(tmp_path / "corpus"), str(tmp_path / "tfds")
    rows = testing.write_corpus(folder, num_videos=19, num_images=8, validation=4, truncated=2, garbage=1)
    built = run_vlm("data", "build", f"--manifest={folder}/manifest.jsonl", f"--data_dir={data_dir}",
                    "--name=my_videos")
    assert built.returncode == 0, built.stderr[-3000:]
    assert "train 23" in built.stdout and "skipped 3 input(s), by manifest line:" in built.stdout
    assert "line 30 media/broken_000.mp4: not a readable video" in built.stdout
    for line, name in ((20, "video_019"), (21, "video_020")):  # the truncated ones: found at build time
        assert f"  [train] line {line} media/{name}.mp4: data ends at" in built.stdout
    bad = run_vlm("data", "build", f"--manifest={folder}/nope.jsonl", f"--data_dir={data_dir}", "--name=x")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"error: manifest not found: {folder}/nope.jsonl"]

    workdir = str(tmp_path / "run")
    # The synthetic quick start's command; only the config differs. 23 train records in batches of 5.
    trained = run_vlm(
        "train", "--config=configs/dual_encoder.py:tiny", f"--workdir={workdir}", *SMALL_OVERRIDES,
        "--config.data.name=my_videos", f"--config.data.data_dir={data_dir}", "--config.batch_size=5",
        "--config.eval_batch_size=4", "--config.total_steps=5", "--config.log_every=5", "--config.eval_every=5",
        "--config.checkpoint_every=5",
        # as a user runs it: vlm's default compilation cache folder (vlm/compilation_cache.py), here under tmp_path
        env_extra={"JAX_COMPILATION_CACHE_DIR": None, "VLM_CACHE_DIR": str(tmp_path / "vlm_cache")},
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert any(name.startswith("jit_train_step-") for name in os.listdir(tmp_path / "vlm_cache" / "jax"))
    metrics = read_metrics(workdir)
    train = next(m for m in metrics if "train/loss" in m)
    assert np.isfinite(train["train/loss"]) and train["data/skipped"] == 0  # the build skipped them all
    assert any("eval/t2v_r1" in m for m in metrics)
    corrupt = sum(1 for r in rows if "broken" in r.get("video", "")) + 2
    assert corrupt == 3  # 10% of 30 inputs, every one skipped by the build
