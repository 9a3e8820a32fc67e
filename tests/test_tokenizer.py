"""SentencePiece training, batch encoding, pickling and the cached per-dataset tokenizer."""

import os
import pickle
from concurrent import futures

import ml_collections
import numpy as np
import pytest

from input_pipeline import synthetic
from input_pipeline import tokenizer as tokenizer_lib
from input_pipeline.tokenizer import Tokenizer, get_tokenizer, main_train, train_tokenizer


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "synthetic"
    return train_tokenizer(synthetic.captions("train", 5000), vocab_size=128, output_prefix=str(prefix))


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return Tokenizer(model_path)


def _pieces_and_scores(path):
    """The learnt vocabulary (the model file also records its own path, so bytes differ)."""
    processor = Tokenizer(path).processor
    return [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]


def _data_config(data_dir, **overrides):
    config = ml_collections.ConfigDict(
        dict(
            name="synthetic",
            num_frames=2,
            resolution=16,
            train_size=3000,
            eval_size=16,
            max_objects=1,
            max_text_len=16,
            vocab_size=96,
            tokenizer="",
            data_dir=str(data_dir),
            worker_count=0,
            prefetch=2,
        )
    )
    config.update(overrides)
    return config


def test_train_writes_model_and_vocab_only(model_path):
    directory = os.path.dirname(model_path)
    assert model_path.endswith("synthetic.model")
    # No temporary files are left behind.
    assert sorted(os.listdir(directory)) == ["synthetic.model", "synthetic.vocab"]


def test_special_ids_and_vocab_size(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert tokenizer.processor.unk_id() == 1
    assert tokenizer.vocab_size == 128
    # 128 pieces are enough for every caption word to be one piece.
    assert tokenizer.processor.encode("a large red circle moves left quickly", out_type=str) == [
        "▁a", "▁large", "▁red", "▁circle", "▁moves", "▁left", "▁quickly"
    ]


def test_encode_decode_round_trip(tokenizer):
    captions = list(synthetic.captions("heldout", 64, max_objects=2))
    ids = tokenizer.encode(captions, max_len=24)
    assert ids.shape == (64, 24) and ids.dtype == np.int32
    lengths = np.array([len(tokenizer.processor.encode(caption)) for caption in captions])
    for row, length in zip(ids, lengths):
        assert row[length] == tokenizer.eos_id  # eos right after the pieces
        assert np.all(row[:length] > 3)  # no special ids among the pieces
        assert np.all(row[length + 1 :] == 0)  # right-padded with pad=0
    assert [tokenizer.decode(row) for row in ids] == captions
    assert tokenizer.decode_batch(ids) == captions


def test_encode_with_bos_and_truncation(tokenizer):
    caption = "a large red circle moves left quickly"
    with_bos = tokenizer.encode([caption], max_len=12, add_bos=True)[0]
    np.testing.assert_array_equal(with_bos[[0, 8]], [tokenizer.bos_id, tokenizer.eos_id])
    assert tokenizer.decode(with_bos) == caption
    # Truncation keeps the first max_len ids: the eos is cut off, there is no padding.
    truncated = tokenizer.encode([caption], max_len=4)[0]
    np.testing.assert_array_equal(truncated, tokenizer.encode([caption], max_len=12)[0][:4])
    assert tokenizer.decode(truncated) == "a large red circle"
    no_eos = tokenizer.encode([caption], max_len=10, add_eos=False)[0]
    assert tokenizer.eos_id not in no_eos and no_eos[7:].tolist() == [0, 0, 0]


def test_decode_stops_at_eos_and_skips_padding(tokenizer):
    ids = tokenizer.encode(["a small blue square moves up slowly"], max_len=10)[0]
    garbage_after_eos = ids.copy()
    garbage_after_eos[8:] = ids[:2]
    assert tokenizer.decode(garbage_after_eos) == "a small blue square moves up slowly"
    assert tokenizer.decode(np.concatenate([[0, 2], ids])) == "a small blue square moves up slowly"
    assert tokenizer.decode([tokenizer.eos_id]) == ""


def test_pickle_carries_the_model(model_path, tmp_path):
    # A copy whose file is removed after loading: the pickle must not need the file.
    copied = tmp_path / "copy.model"
    copied.write_bytes(open(model_path, "rb").read())
    original = Tokenizer(str(copied))
    expected = original.encode(["a medium cyan triangle moves down quickly"], max_len=8)
    copied.unlink()
    restored = pickle.loads(pickle.dumps(original))
    assert restored._processor is None  # rebuilt lazily
    np.testing.assert_array_equal(restored.encode(["a medium cyan triangle moves down quickly"], max_len=8), expected)


def test_training_is_deterministic(model_path, tmp_path):
    again = train_tokenizer(synthetic.captions("train", 5000), vocab_size=128, output_prefix=str(tmp_path / "again"))
    assert _pieces_and_scores(again) == _pieces_and_scores(model_path)


def test_vocab_size_is_a_soft_limit(tmp_path):
    path = train_tokenizer(["a red circle", "a blue square", "two red squares"], 1000, str(tmp_path / "tiny"))
    assert 4 < Tokenizer(path).vocab_size < 1000
    assert Tokenizer(path).decode(Tokenizer(path).encode(["a red square"], 8)[0]) == "a red square"


def test_concurrent_training_of_one_prefix_gives_one_complete_model(tmp_path):
    prefix = str(tmp_path / "shared")
    captions = list(synthetic.captions("train", 2000))
    with futures.ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: train_tokenizer(captions, 64, prefix), range(2)))
    assert paths == [prefix + ".model"] * 2
    assert sorted(os.listdir(tmp_path)) == ["shared.model", "shared.vocab"]
    assert Tokenizer(paths[0]).vocab_size == 64


def test_get_tokenizer_trains_once_and_caches(tmp_path, monkeypatch):
    config = _data_config(tmp_path)
    first = get_tokenizer(config)
    assert first.vocab_size == 96
    cached = first.model_path
    assert cached.startswith(str(tmp_path)) and "synthetic" in cached and "vocab96" in cached
    assert "max_objects1" in cached
    mtime = os.path.getmtime(cached)

    def fail(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(tokenizer_lib, "train_tokenizer", fail)
    second = get_tokenizer(config)
    assert second.model_path == cached and os.path.getmtime(cached) == mtime
    caption = "a large orange diamond moves right slowly"
    np.testing.assert_array_equal(second.encode([caption], 16), first.encode([caption], 16))
    # Other caption settings or vocabulary sizes get their own model.
    with pytest.raises(AssertionError, match="reused"):
        get_tokenizer(_data_config(tmp_path, max_objects=2))
    with pytest.raises(AssertionError, match="reused"):
        get_tokenizer(_data_config(tmp_path, vocab_size=64))


def test_get_tokenizer_defaults_to_vlm_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_DATA_DIR", str(tmp_path / "from_env"))
    tokenizer = get_tokenizer(_data_config("", vocab_size=64))
    assert tokenizer.model_path.startswith(str(tmp_path / "from_env"))


def test_get_tokenizer_loads_a_given_model(model_path, tmp_path):
    assert get_tokenizer(_data_config(tmp_path, tokenizer=model_path)).model_path == model_path
    missing = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        get_tokenizer(_data_config(tmp_path, tokenizer=missing))


def test_unknown_dataset_without_tokenizer_path_raises(tmp_path):
    with pytest.raises(ValueError, match="set data.tokenizer"):
        get_tokenizer(_data_config(tmp_path, name="webvid"))


def test_main_train_reads_one_caption_per_line(tmp_path):
    captions = list(synthetic.captions("train", 2000))
    input_path = tmp_path / "captions.txt"
    input_path.write_text("\n".join(captions[:1000]) + "\n\n   \n" + "\n".join(captions[1000:]) + "\n")
    path = main_train(str(input_path), 64, str(tmp_path / "cli"))
    assert path == str(tmp_path / "cli.model")
    tokenizer = Tokenizer(path)
    assert tokenizer.decode(tokenizer.encode(captions[:1], 32)[0]) == captions[0]
    # Blank lines were skipped: the same model as training on the captions alone.
    direct = train_tokenizer(captions, 64, str(tmp_path / "direct"))
    assert _pieces_and_scores(path) == _pieces_and_scores(direct)


def test_main_train_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_captions.txt") as error:
        main_train(str(tmp_path / "no_such_captions.txt"), 64, str(tmp_path / "out"))
    assert "\n" not in str(error.value)
