"""The latent cache (`vlm data encode`): read-back latents equal the encoder's output, the stored statistics
are the dataset's, two processes write the same dataset as one, resuming redoes only missing chunks, the
pipelines read it like any dataset, normalisation and the VAE hash check."""

import json
import os

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from input_pipeline import datasets, latents, pipeline
from input_pipeline.builders import latent_captions
from tests.test_autoencoding import tiny_vae_run
from vlm.errors import ConfigError
from vlm.tasks import autoencoding

SPLITS = {"train": 12, "heldout": 8}  # chunks of 5: 3 train chunks, 2 held-out chunks (the last ones partial)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The small VAE run's train and held-out clips encoded into `synthetic_latents` by one process, and the
    same plan by two simulated processes (process_index 0 and 1 of 2, in this process) into `two_latents`."""
    workdir, data_dir = tiny_vae_run(tmp_path_factory)
    from vlm import train

    data_config = train.load_config(str(workdir)).data
    vae, _, step, digest = autoencoding.load_vae(str(workdir))
    out_dir = str(tmp_path_factory.mktemp("latents"))
    one = autoencoding.encode_dataset(str(workdir), data_config, "synthetic_latents", data_dir=out_dir,
                                      max_examples=12, chunk_size=5, batch_size=2, log=lambda _: None)
    encode = autoencoding.encoder_fn(vae, jax.local_devices()[:2])
    plan = latent_captions.Plan(out_name="two_latents", data_dir=out_dir, splits=SPLITS, shape=tuple(one["shape"]),
                                stored="posterior", chunk_size=5, seed=0, stats_split="train",
                                vae={"hash": digest, "step": step, "workdir": str(workdir)}, source=one["source"])
    written = [latent_captions.encode_chunks(plan, data_config, encode, process_index=p, process_count=2,
                                             batch_size=2, log=lambda _: None) for p in (0, 1)]
    assert written == [3, 2]  # train chunks 0, 2 + held-out 0 on process 0; train 1 + held-out 1 on process 1
    # Resume: a lost chunk is redone, the others are kept.
    plan.chunk_path("train", 1).unlink()
    assert latent_captions.encode_chunks(plan, data_config, encode, process_index=1, process_count=2,
                                         batch_size=2, log=lambda _: None) == 1
    two = latent_captions.write_dataset(plan)
    return dict(vae=vae, data_config=data_config, out_dir=out_dir, one=one, two=two, digest=digest, step=step,
                encode=encode)


def records(name, split, data_dir):
    source = datasets.records(name, split, data_dir)
    return [source[i] for i in range(len(source))]


def test_read_back_latents_equal_the_encoder_output(cache):
    info = latents.latent_info("synthetic_latents", cache["out_dir"])
    assert info["splits"] == SPLITS and info["shape"] == [3, 2, 2, 4]  # 5 frames of 16 px → [3, 2, 2, z=4]
    assert info["vae_hash"] == cache["digest"] and info["vae_step"] == cache["step"] == 2
    source = latent_captions.ClipSource(cache["data_config"], "train", 12)
    videos = np.stack([source.example(i)["video"] for i in range(12)])
    mean, std = cache["encode"](videos)  # one batch of 12 here; the cache encoded batches of 2
    rows = records("synthetic_latents", "train", cache["out_dir"])
    assert [int(r["index"]) for r in rows] == list(range(12))
    np.testing.assert_allclose(np.stack([r["latent"] for r in rows]), mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.stack([r["latent_std"] for r in rows]), std, rtol=0, atol=1e-6)
    assert [r["captions"][0].decode() for r in rows] == [source.example(i)["captions"][0] for i in range(12)]
    assert rows[3]["id"].decode() == "train/3"
    # The statistics: per channel over the train split of z ~ N(μ, σ²): E[μ], sqrt(E[μ² + σ²] − E[μ]²).
    mu, sigma = mean.reshape(-1, 4).astype(np.float64), std.reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(info["mean"], mu.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(info["std"], np.sqrt((mu**2 + sigma**2).mean(0) - mu.mean(0) ** 2), rtol=1e-5)
    # normalize ∘ denormalize = identity; normalised train latents have mean 0 per channel.
    z = np.random.default_rng(0).normal(size=(2, 3, 2, 2, 4)).astype(np.float32)
    np.testing.assert_allclose(latents.denormalize(latents.normalize(z, info), info), z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(latents.normalize(mean, info).reshape(-1, 4).mean(0), 0.0, atol=1e-4)


def test_two_processes_write_the_same_dataset_as_one(cache):
    one, two = cache["one"], cache["two"]
    assert {k: v for k, v in one.items()} == {k: v for k, v in two.items()}  # stats, hash, shape, splits, ...
    for split in SPLITS:
        a, b = records("synthetic_latents", split, cache["out_dir"]), records("two_latents", split, cache["out_dir"])
        assert len(a) == len(b) == SPLITS[split]
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for key in x:
                np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)
    for name in ("synthetic_latents", "two_latents"):  # the work folders are gone once the dataset is written
        assert not os.path.exists(os.path.join(cache["out_dir"], name, latent_captions.WORK_FOLDER))


def latent_data_config(out_dir, **kw):
    c = ConfigDict(dict(name="synthetic_latents", data_dir=out_dir, train_split="train", eval_split="", sources=(),
                        latent_sample=False, num_frames=5, resolution=16, max_text_len=8, vocab_size=128,
                        tokenizer="", worker_count=0, prefetch=1, eval_size=64, train_size=64, max_objects=1))
    c.update(kw)
    return c


def test_pipelines_read_latents_like_any_dataset(cache):
    out_dir = cache["out_dir"]
    stored = {int(r["index"]): r for r in records("synthetic_latents", "train", out_dir)}
    held = records("synthetic_latents", "heldout", out_dir)
    # Eval: the held-out split in order, posterior means, captions, the last batch padded.
    batches = list(pipeline.create_eval_iterator(latent_data_config(out_dir), global_batch_size=4))
    assert [sorted(b) for b in batches] == [["caption", "latents", "mask", "tokens"]] * 2
    assert batches[0]["latents"].shape == (4, 3, 2, 2, 4) and batches[0]["latents"].dtype == np.float32
    assert batches[0]["tokens"].shape == (4, 8) and batches[0]["tokens"].dtype == np.int32
    got = np.concatenate([b["latents"] for b in batches])[np.concatenate([b["mask"] for b in batches])]
    np.testing.assert_array_equal(got, np.stack([r["latent"] for r in held]))
    assert batches[0]["caption"][1] == held[1]["captions"][0].decode()
    # Train: {"latents", "tokens"}; the mean, or with latent_sample z = μ + σ·ε from the position's rng.
    means = next(pipeline.create_train_iterator(latent_data_config(out_dir), global_batch_size=4, seed=0))
    assert sorted(means) == ["data/skipped", "latents", "tokens"] and means["latents"].shape == (4, 3, 2, 2, 4)
    assert any(np.array_equal(means["latents"][0], r["latent"]) for r in stored.values())
    sampled = [next(pipeline.create_train_iterator(latent_data_config(out_dir, latent_sample=True),
                                                   global_batch_size=4, seed=0)) for _ in range(2)]
    np.testing.assert_array_equal(sampled[0]["latents"], sampled[1]["latents"])  # deterministic per position
    row = next(r for r in stored.values() if np.array_equal(r["latent"], means["latents"][0]))
    noise = (sampled[0]["latents"][0] - row["latent"]) / row["latent_std"]
    assert 0.5 < noise.std() < 1.6 and not np.allclose(noise, 0)  # one standard normal draw per value
    # Process 1 of 2 reads the other rows of the same global batch.
    second = next(pipeline.create_train_iterator(latent_data_config(out_dir), global_batch_size=4, seed=0,
                                                 process_index=1, process_count=2))
    np.testing.assert_array_equal(second["latents"], means["latents"][2:])


def test_vae_hash_check_and_errors(cache):
    info = latents.latent_info("synthetic_latents", cache["out_dir"])
    latents.check_vae_hash(info, cache["digest"])
    latents.check_vae_hash(info, cache["digest"][:12])  # a prefix is enough
    with pytest.raises(ConfigError, match="encoded by the VAE with parameter hash") as error:
        latents.check_vae_hash(info, "0123abcd")
    assert "\n" not in str(error.value)
    assert latents.is_latent_dataset("synthetic_latents", cache["out_dir"])
    assert not latents.is_latent_dataset("synthetic", cache["out_dir"])
    with pytest.raises(ValueError, match="not found"):
        latents.latent_info("missing_latents", cache["out_dir"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        autoencoding.encode_dataset(cache["one"]["vae_workdir"], cache["data_config"], "synthetic_latents",
                                    data_dir=cache["out_dir"], max_examples=2, log=lambda _: None)
    with pytest.raises(ValueError, match="--out_name"):
        latent_captions.Plan(out_name="Bad-Name", data_dir="", splits={"train": 1}, shape=(1, 1, 1, 1),
                             stored="posterior", chunk_size=1, seed=0, stats_split="train", vae={}, source={})
    mixed = latent_data_config(cache["out_dir"], sources=(dict(name="synthetic_latents"), dict(name="synthetic")))
    with pytest.raises(ConfigError, match="mixes latent datasets"):
        pipeline.check_data_config(mixed)
    # The latent dataset's info names its source and the stored kind.
    assert info["stored"] == "posterior" and info["source"]["name"] == "synthetic"
    assert json.loads(json.dumps(info)) == info
