"""The run's SentencePiece model, kept in its workdir: a copied workdir is self-contained.

At train start every process resolves the configured tokenizer (`data.tokenizer`, or the one
trained on the train captions and cached in the data dir) and process 0 copies it to
`W/tokenizer.model`; its sha256 goes into `W/config.json` as `data.tokenizer_sha256` (a key the
trainer adds to the config it saves, not one the config files define, so configs of older runs
still load and validate). Everything that reads a run afterwards (`vlm eval`, `train.load_model`,
`vlm.load`, `vlm export`, `vlm embed`) uses `W/tokenizer.model` when it is there, checked against
that sha256, and needs no data dir; a workdir from before this (no `W/tokenizer.model`) falls back
to the configured tokenizer, with a warning.
"""

from __future__ import annotations

import copy
import hashlib
import os

import jax
from absl import logging
from etils import epath

TOKENIZER_FILE = "tokenizer.model"
SHA_KEY = "tokenizer_sha256"  # in config.data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_to_workdir(config, workdir: str):
    """A copy of `config` with `data.tokenizer_sha256` set; process 0 writes `W/tokenizer.model`.

    Called by the trainer before it writes W/config.json. A bad data config raises the input
    pipeline's own one-line ConfigError (the tokenizer of a missing dataset cannot be trained).
    """
    from input_pipeline import pipeline
    from input_pipeline.tokenizer import get_tokenizer

    pipeline.check_data_config(config.data)
    model_bytes = epath.Path(get_tokenizer(config.data).model_path).read_bytes()
    digest = sha256(model_bytes)
    if jax.process_index() == 0:
        path = epath.Path(workdir) / TOKENIZER_FILE
        if not (path.exists() and sha256(path.read_bytes()) == digest):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / (TOKENIZER_FILE + ".tmp")
            tmp.write_bytes(model_bytes)
            tmp.replace(path)
    config = copy.deepcopy(config)  # the caller's config stays as it was
    with config.unlocked():
        config.data[SHA_KEY] = digest
    return config


def local_copy(path: epath.Path, digest: str | None = None) -> str:
    """A local file path for `path`: itself when local, else a copy cached under its sha256
    (SentencePiece reads local files only)."""
    if "://" not in os.fspath(path):
        return os.fspath(path)
    data = path.read_bytes()
    digest = digest or sha256(data)
    cache = epath.Path(os.path.expanduser("~")) / ".cache" / "vlm" / "tokenizers" / f"{digest}{path.suffix}"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.parent / f"{cache.name}.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        tmp.replace(cache)
    return os.fspath(cache)


def use_folder_copy(config, folder: str):
    """`config` with `data.tokenizer` pointing at FOLDER/tokenizer.model when the folder has one
    (checked against `data.tokenizer_sha256` when recorded); unchanged, with a warning, if not.

    FOLDER is a workdir or an export folder, local or a bucket. Raises ValueError when the file
    does not match the recorded sha256 (a tokenizer replaced after training).
    """
    path = epath.Path(folder) / TOKENIZER_FILE
    if not path.exists():
        logging.warning("%s has no %s (a run from before workdirs kept their tokenizer): using the configured "
                        "tokenizer (data.tokenizer=%r, else the one cached in the data dir)",
                        folder, TOKENIZER_FILE, config.data.tokenizer)
        return config
    data = path.read_bytes()
    digest = sha256(data)
    recorded = config.data.get(SHA_KEY)
    if recorded and recorded != digest:
        raise ValueError(f"{path} has sha256 {digest[:12]}… but the run recorded {recorded[:12]}… in config.json "
                         f"(data.{SHA_KEY}); restore the run's own tokenizer.model")
    config = copy.deepcopy(config)
    config.data.tokenizer = local_copy(path, digest)
    return config
