"""vlm.load: a copied workdir is self-contained and embeds exactly as the run's eval path does."""

import functools
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import vlm
from input_pipeline import testing, tokenizer
from input_pipeline.builders import media, video_captions
from vlm import run_tokenizer, sharding, train
from vlm.eval import loop as eval_loop
from vlm.eval import retrieval


def eval_path_embeddings(loaded, data_config):
    """The retrieval evaluator's embeddings (both towers in one jitted call, the eval iterator's batches),
    with the loaded model on its mesh and batch size."""
    graphdef, state = nnx.split(loaded.model)

    @jax.jit
    def embed(state, batch):
        video_emb, text_emb = nnx.merge(graphdef, state)(batch["video"], batch["tokens"])
        return {"video": video_emb, "text": text_emb}

    with sharding.use_mesh(loaded.mesh, loaded.rules):
        return eval_loop.eval_outputs(functools.partial(embed, state), data_config,
                                      global_batch_size=loaded.batch_size, mesh=loaded.mesh)


@pytest.fixture(scope="module")
def copied(ema_run, tmp_path_factory, monkeypatch_module):
    """Only W, copied elsewhere, with its data dir and $VLM_DATA_DIR pointing at empty folders."""
    workdir, _ = ema_run
    tmp = tmp_path_factory.mktemp("copied")
    copy = tmp / "w_copy"
    shutil.copytree(workdir, copy)
    empty = tmp / "empty_data"
    empty.mkdir()
    saved = json.loads((copy / "config.json").read_text())
    saved["data"]["data_dir"] = str(empty)
    (copy / "config.json").write_text(json.dumps(saved))
    monkeypatch_module.setenv("VLM_DATA_DIR", str(empty))
    return copy, empty


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def loaded(copied):
    return vlm.load(str(copied[0]))


def test_workdir_keeps_its_tokenizer_and_its_sha256(ema_run):
    workdir, config = ema_run
    saved = json.loads((workdir / "config.json").read_text())
    kept = (workdir / "tokenizer.model").read_bytes()
    cached = open(tokenizer.get_tokenizer(config.data).model_path, "rb").read()
    assert kept == cached
    assert saved["data"]["tokenizer_sha256"] == run_tokenizer.sha256(kept)
    assert "tokenizer_sha256" not in config.data  # the caller's config is not changed
    assert train.load_config(str(workdir)).data.tokenizer == str(workdir / "tokenizer.model")


def test_copied_workdir_embeds_text_like_the_eval_path(copied, loaded):
    copy, empty = copied
    assert loaded.tokenizer.model_path == str(copy / "tokenizer.model")
    assert loaded.step == 10 and loaded.model.text_proj.kernel[...].dtype == np.float32
    out, host = eval_path_embeddings(loaded, loaded.config.data)
    captions = host["caption"]
    assert len(captions) == 32
    text_emb = loaded.embed_text(captions)
    np.testing.assert_array_equal(text_emb, out["text"])  # bit for bit
    assert os.listdir(empty) == []  # no tokenizer trained or cached: W was enough
    # The same model's retrieval metric matches what the run logged at step 10 (its 8-device eval).
    logged = [row for row in map(json.loads, open(copy / "metrics.jsonl")) if "eval/t2v_r1" in row][-1]
    assert logged["step"] == 10
    assert retrieval.retrieval_metrics(text_emb @ out["video"].T)["t2v_r1"] == logged["eval/t2v_r1"]
    # Order and batch position do not change the tokens, and embeddings stay unit norm.
    np.testing.assert_allclose(loaded.embed_text(captions[3:5]), text_emb[3:5], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, rtol=1e-5)


@pytest.fixture(scope="module")
def video_dataset(tmp_path_factory, loaded):
    """Three mp4s of different sizes in the validation split of a dataset built from a manifest."""
    folder = tmp_path_factory.mktemp("videos")
    rows = []
    for i, (width, height, seconds) in enumerate(((64, 48, 1.0), (40, 56, 0.6), (90, 66, 1.4))):
        name = f"clip_{i}.mp4"
        testing.write_video(str(folder / name), width=width, height=height, fps=12, seconds=seconds, seed=i)
        rows.append({"video": name, "caption": f"clip number {i}", "split": "validation"})
    rows.append({"video": "clip_0.mp4", "caption": "train row", "split": "train", "start": 0.1})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_dir = folder / "data"
    video_captions.build(str(folder / "manifest.jsonl"), str(data_dir), "tiny_clips", media.EncodeOptions())
    return folder, data_dir


def test_embed_video_of_an_mp4_equals_the_eval_batch_embedding(loaded, video_dataset):
    folder, data_dir = video_dataset
    data = loaded.config.data.copy_and_resolve_references()
    data.update(dict(name="tiny_clips", data_dir=str(data_dir), eval_split="validation"))
    out, host = eval_path_embeddings(loaded, data)
    assert host["caption"] == ["clip number 0", "clip number 1", "clip number 2"]
    paths = [str(folder / f"clip_{i}.mp4") for i in range(3)]
    np.testing.assert_array_equal(loaded.embed_video(paths), out["video"])  # bit for bit
    assert loaded.rgb_mean == (0.485, 0.456, 0.406)  # the model's own normalisation (ImageNet by default)
    clip = loaded.preprocess(paths[1])
    assert clip.dtype == np.uint8 and clip.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(loaded.embed_video(clip[None]), loaded.embed_video([paths[1]]))
    np.testing.assert_array_equal(loaded.preprocess(open(paths[1], "rb").read()), clip)


def test_bad_inputs_are_one_line_errors(loaded, tmp_path):
    with pytest.raises(ValueError, match=r"expected uint8 \[\.\.\., 4, 16, 16, 3\]"):
        loaded.embed_video(np.zeros((1, 4, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="list of strings"):
        loaded.embed_text("one string")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        vlm.load(str(tmp_path))


def test_old_workdir_without_its_tokenizer_falls_back_with_a_warning(ema_run, loaded, tmp_path, caplog):
    workdir, config = ema_run
    old = tmp_path / "old"
    shutil.copytree(workdir, old, ignore=shutil.ignore_patterns("tokenizer.model", "checkpoints"))
    os.symlink(workdir / "checkpoints", old / "checkpoints")
    with caplog.at_level(logging.WARNING):
        fallback = vlm.load(str(old))
    assert "has no tokenizer.model" in caplog.text
    assert fallback.tokenizer.model_path == tokenizer.get_tokenizer(config.data).model_path
    captions = ["a red circle moves left", "a small blue square"]
    np.testing.assert_array_equal(fallback.embed_text(captions), loaded.embed_text(captions))


def test_a_replaced_tokenizer_is_refused(ema_run, tmp_path):
    workdir, _ = ema_run
    replaced = tmp_path / "replaced"
    shutil.copytree(workdir, replaced, ignore=shutil.ignore_patterns("checkpoints"))
    tokenizer.train_tokenizer(["another corpus entirely"] * 50, 40, str(tmp_path / "other"))
    shutil.copy(tmp_path / "other.model", replaced / "tokenizer.model")
    with pytest.raises(ValueError, match="sha256"):
        train.load_config(str(replaced))
