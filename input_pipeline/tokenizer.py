"""SentencePiece tokenizer: training one from captions, and encoding batches.

Ids: pad=0 (also the padding of every token batch), unk=1, bos=2, eos=3.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from input_pipeline.sources import default_data_dir, train_sources

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# How many train-split captions a cached tokenizer is trained on.
NUM_TOKENIZER_TRAINING_CAPTIONS = 20_000


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_prefix: str) -> str:
    """Trains a BPE SentencePiece model on `texts`; writes PREFIX.model and PREFIX.vocab.

    `vocab_size` is a soft limit: a corpus too small for it gives a smaller
    vocabulary instead of an error. Training is single-threaded, so the same
    texts give the same pieces, scores and ids (the file's bytes also record the
    temporary prefix it was trained under). Both files are written under a
    temporary name and renamed into place (.vocab first), so PREFIX.model exists
    only once training has finished, and two processes training the same model
    at once simply replace one complete file by an equivalent one. Returns the
    path of PREFIX.model.
    """
    output_prefix = str(output_prefix)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    temporary_prefix = f"{output_prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=temporary_prefix,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            model_type="bpe",
            character_coverage=1.0,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=1,
            minloglevel=2,
        )
        os.replace(f"{temporary_prefix}.vocab", f"{output_prefix}.vocab")
        os.replace(f"{temporary_prefix}.model", f"{output_prefix}.model")
    finally:
        for suffix in (".model", ".vocab"):
            Path(f"{temporary_prefix}{suffix}").unlink(missing_ok=True)
    return f"{output_prefix}.model"


class Tokenizer:
    """A SentencePiece model with fixed-length batch encoding.

    Picklable for Grain worker processes: the pickle carries the model's bytes
    (not its path, which another host may not have), and the processor is
    rebuilt on first use after unpickling.
    """

    def __init__(self, model_path: str):
        self.model_path = str(model_path)
        try:
            self._model_proto = Path(model_path).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}") from None
        self._processor: spm.SentencePieceProcessor | None = None
        if (self.pad_id, self.bos_id, self.eos_id) != (PAD_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"{model_path}: expected pad/bos/eos ids {PAD_ID}/{BOS_ID}/{EOS_ID}, got"
                f" {self.pad_id}/{self.bos_id}/{self.eos_id}"
            )

    @property
    def processor(self) -> spm.SentencePieceProcessor:
        if self._processor is None:
            self._processor = spm.SentencePieceProcessor(model_proto=self._model_proto)
        return self._processor

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "_model_proto": self._model_proto, "_processor": None}

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    def encode(
        self, texts: Sequence[str], max_len: int, add_bos: bool = False, add_eos: bool = True
    ) -> np.ndarray:
        """Token ids int32 [B, max_len]: [bos] pieces [eos], truncated to max_len, right-padded with 0.

        Truncation cuts the end, so a text longer than max_len loses its eos.
        """
        ids = np.full((len(texts), max_len), PAD_ID, dtype=np.int32)
        for row, pieces in enumerate(self.processor.encode(list(texts), add_bos=add_bos, add_eos=add_eos)):
            pieces = pieces[:max_len]
            ids[row, : len(pieces)] = pieces
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one id sequence [L]: stops at the first eos, skips pad and bos."""
        kept = []
        for token in np.asarray(ids).reshape(-1).tolist():
            if token == EOS_ID:
                break
            if token not in (PAD_ID, BOS_ID):
                kept.append(token)
        return self.processor.decode(kept)

    def decode_batch(self, ids: np.ndarray) -> list[str]:
        """Texts of a batch of id sequences [B, L]."""
        return [self.decode(row) for row in np.asarray(ids)]


def _training_captions(data_config) -> tuple[str, Iterable[str]]:
    """(cache name, train-split captions) for the configured dataset, or the training mixture's datasets."""
    sources = data_config.get("sources") or ()
    if data_config.name == "synthetic" and not sources:
        from input_pipeline import synthetic

        num_captions = min(NUM_TOKENIZER_TRAINING_CAPTIONS, data_config.train_size)
        name = f"synthetic_max_objects{data_config.max_objects}_captions{num_captions}_vocab{data_config.vocab_size}"
        return name, synthetic.captions("train", num_captions, max_objects=data_config.max_objects)
    from input_pipeline import datasets, synthetic

    # Equal shares of the captions from every dataset the model trains on.
    keys = list(dict.fromkeys((s.name, s.split, s.data_dir) for s in train_sources(data_config)))
    share = max(NUM_TOKENIZER_TRAINING_CAPTIONS // len(keys), 1)
    texts, parts, fingerprint = [], [], hashlib.sha1()
    for name, split, data_dir in keys:
        if name == "synthetic":
            count = min(share, data_config.train_size)
            texts.extend(synthetic.captions("train", count, max_objects=data_config.max_objects))
            fingerprint.update(f"synthetic{data_config.max_objects}".encode())
        else:
            try:
                path = datasets.dataset_path(name, data_dir)
                texts.extend(datasets.captions(name, split, data_dir, share))
            except datasets.DatasetError as e:
                raise datasets.DatasetError(
                    f"no captions to train a tokenizer on: {e}; or set data.tokenizer to a SentencePiece .model"
                ) from None
            fingerprint.update((path / "dataset_info.json").read_bytes() + split.encode())
        parts.append(re.sub(r"[^\w.-]", "-", name))
    if not texts:
        raise ValueError(f"no captions to train a tokenizer on in {', '.join(parts)}; set data.tokenizer to a .model path")
    name = f"{'+'.join(parts)}_{fingerprint.hexdigest()[:10]}_captions{len(texts)}_vocab{data_config.vocab_size}"
    return name, texts


def get_tokenizer(data_config) -> Tokenizer:
    """The configured tokenizer: `data.tokenizer` if set, else one trained on train captions and cached.

    The cache lives in `data.data_dir` (or `default_data_dir()`) under a name
    holding the dataset, its caption settings and the vocabulary size, so a
    second call, or another process, reuses it.
    """
    if data_config.tokenizer:
        return Tokenizer(data_config.tokenizer)
    name, texts = _training_captions(data_config)
    prefix = os.path.join(data_config.data_dir or default_data_dir(), "tokenizers", name)
    model_path = f"{prefix}.model"
    if not os.path.exists(model_path):
        train_tokenizer(texts, data_config.vocab_size, prefix)
    return Tokenizer(model_path)


def main_train(input_path: str, vocab_size: int, output_prefix: str) -> str:
    """`vlm tokenizer train`: trains on a text file of one caption per line, or on the captions
    of a built dataset's train split (--input=DATA_DIR/NAME, or DATA_DIR/NAME/VERSION); returns
    the .model path."""
    if os.path.isdir(input_path):
        return train_tokenizer(_dataset_captions(input_path), vocab_size, output_prefix)
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"caption file not found: {input_path}")
    with open(input_path, encoding="utf-8") as lines:
        captions = (line.rstrip("\n") for line in lines)
        nonblank = (caption for caption in captions if caption.strip())
        first = list(itertools.islice(nonblank, 1))
        if not first:
            raise ValueError(f"caption file has no captions: {input_path}")
        return train_tokenizer(itertools.chain(first, nonblank), vocab_size, output_prefix)


# Captions `vlm tokenizer train` reads at most from a built dataset (from its captions file, or,
# for a Beam build without one, from its records, which reads their media too).
MAX_DATASET_CAPTIONS = 100_000


def _dataset_captions(folder: str) -> list[str]:
    """The train split's captions (up to MAX_DATASET_CAPTIONS) of the built dataset in `folder`
    (DATA_DIR/NAME[/CONFIG][/VERSION]; the latest version)."""
    from input_pipeline import datasets

    path = folder.rstrip("/")
    if not os.path.exists(os.path.join(path, "dataset_info.json")):
        versions = sorted(
            (v for v in os.listdir(path) if re.fullmatch(r"\d+\.\d+\.\d+", v)
             and os.path.exists(os.path.join(path, v, "dataset_info.json"))),
            key=lambda v: tuple(map(int, v.split("."))),
        )
        if not versions:
            raise FileNotFoundError(
                f"{folder} is neither a caption file nor a built dataset (no dataset_info.json in it or a version folder)"
            )
        path = os.path.join(path, versions[-1])
    texts = datasets.captions_in(path, "train", MAX_DATASET_CAPTIONS)
    if not texts:
        raise ValueError(f"built dataset {path} has no train captions")
    return texts
