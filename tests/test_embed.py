"""vlm embed / vlm retrieve: complete rows, the eval's embeddings and R@1 from the files, N processes
write what one does, and search over the files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import vlm
from input_pipeline import synthetic, testing
from tests.helpers import multiprocess_env
from tests.test_load import eval_path_embeddings
from vlm import embed
from vlm.eval import retrieval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def index(ema_run, tmp_path_factory):
    """The run's eval split (32 synthetic held-out pairs) embedded in this process (8 devices)."""
    workdir, _ = ema_run
    out = tmp_path_factory.mktemp("embed") / "one"
    info = embed.embed(str(workdir), str(out))
    return workdir, out, info


def test_rows_are_complete_and_unique(index):
    workdir, out, info = index
    assert sorted(os.listdir(out)) == ["img_emb", "info.json", "metadata", "text_emb"]
    assert os.listdir(out / "img_emb") == ["img_emb_0.npy"] and os.listdir(out / "metadata") == ["metadata_0.parquet"]
    assert np.load(out / "img_emb" / "img_emb_0.npy").dtype == np.float16
    video_emb, text_emb, meta = embed.read_index(str(out))
    assert video_emb.shape == text_emb.shape == (32, 32)
    assert sorted(meta) == sorted(embed.COLUMNS)
    assert len(set(meta["id"])) == 32 and meta["index"] == list(range(32))
    assert meta["id"][5] == "heldout/5" and set(meta["split"]) == {"heldout"}
    source = synthetic.SyntheticVideoCaptions("heldout", num_examples=32, num_frames=4, resolution=16, seed=0)
    assert meta["caption"] == [source.caption(i) for i in range(32)]
    assert info == {**json.loads((out / "info.json").read_text())}
    assert (info["count"], info["skipped"], info["step"], info["processes"]) == (32, 0, 10, 1)


def test_embeddings_and_recall_equal_the_eval(index):
    workdir, out, _ = index
    loaded = vlm.load(str(workdir), devices=__import__("jax").devices())
    loaded.batch_size = 16  # the run's eval batch on the same 8-device data-parallel mesh as `vlm embed`
    expected, _ = eval_path_embeddings(loaded, loaded.config.data)
    video_emb, text_emb, _ = embed.read_index(str(out))
    np.testing.assert_array_equal(video_emb, expected["video"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(text_emb, expected["text"].astype(np.float16).astype(np.float32))
    logged = [row for row in map(json.loads, open(workdir / "metrics.jsonl")) if "eval/t2v_r1" in row][-1]
    from_files = retrieval.retrieval_metrics(text_emb @ video_emb.T)
    assert from_files["t2v_r1"] == logged["eval/t2v_r1"] and from_files["v2t_r1"] == logged["eval/v2t_r1"]


def test_two_processes_write_the_same_rows_as_one(index, tmp_path):
    workdir, one, _ = index
    two = tmp_path / "two"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--processes=2", "--devices_per_process=4",
           f"--log_dir={tmp_path / 'logs'}", "--", sys.executable, "-m", "vlm.main", "embed",
           f"--workdir={workdir}", f"--output={two}"]
    env = multiprocess_env()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(os.listdir(two / "img_emb")) == ["img_emb_0.npy", "img_emb_1.npy"]
    assert json.loads((two / "info.json").read_text())["count"] == 32
    rows = {}
    for folder in (one, two):
        video_emb, text_emb, meta = embed.read_index(str(folder))
        rows[folder] = {i: (v, t, c) for i, v, t, c in zip(meta["id"], video_emb, text_emb, meta["caption"])}
    assert sorted(rows[one]) == sorted(rows[two])
    for key, (v, t, c) in rows[one].items():
        np.testing.assert_array_equal(rows[two][key][0], v)
        np.testing.assert_array_equal(rows[two][key][1], t)
        assert rows[two][key][2] == c


def test_retrieve_ranks_by_cosine_similarity(index, capsys):
    workdir, out, _ = index
    video_emb, text_emb, meta = embed.read_index(str(out))
    results = embed.retrieve(str(out), text=meta["caption"][7], k=5)
    scores = [r["score"] for r in results]
    assert len(results) == 5 and scores == sorted(scores, reverse=True)
    query = vlm.load(str(workdir)).embed_text([meta["caption"][7]])[0]
    expected = video_emb @ query
    assert results[0]["id"] == meta["id"][int(np.argmax(expected))]
    np.testing.assert_allclose(scores, np.sort(expected)[::-1][:5], rtol=1e-6)
    best, rows = embed.top_k(video_emb, query, 3)
    np.testing.assert_allclose(best, np.sort(expected)[::-1][:3], rtol=1e-6)
    with pytest.raises(ValueError, match="exactly one of"):
        embed.retrieve(str(out), k=3)


def test_embed_a_manifest_of_media_files(ema_run, tmp_path):
    workdir, _ = ema_run
    rows = []
    for i in range(3):
        testing.write_video(str(tmp_path / f"v{i}.mp4"), width=48 + 8 * i, height=40, fps=10, seconds=0.8, seed=i)
        rows.append({"video": f"v{i}.mp4", "caption": f"video {i}"})
    testing.write_image(str(tmp_path / "still.png"))
    rows.append({"image": "still.png", "captions": ["a still", "another caption"]})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "index"
    info = embed.embed(str(workdir), str(out), manifest=str(tmp_path / "manifest.jsonl"))
    video_emb, text_emb, meta = embed.read_index(str(out))
    assert info["count"] == 4 and meta["id"] == ["v0.mp4", "v1.mp4", "v2.mp4", "still.png"]
    assert meta["caption"] == ["video 0", "video 1", "video 2", "a still"]
    paths = [str(tmp_path / m) for m in ("v0.mp4", "v1.mp4", "v2.mp4", "still.png")]
    assert meta["image_path"] == paths
    loaded = vlm.load(str(workdir))
    np.testing.assert_allclose(video_emb, loaded.embed_video(paths), rtol=0, atol=1e-3)  # float16 files
    np.testing.assert_allclose(text_emb, loaded.embed_text(meta["caption"]), rtol=0, atol=1e-3)
    video_query = embed.retrieve(str(out), video=paths[1], k=1)
    assert video_query[0]["score"] == pytest.approx(float(text_emb[np.argmax(text_emb @ video_emb[1])] @ video_emb[1]),
                                                    abs=2e-3)
