"""Latent datasets: video clips encoded once by a trained VAE (`vlm data encode`), read like any dataset.

A latent dataset is a built dataset (tfds, ArrayRecord, `DATA_DIR/NAME/VERSION/`) whose records hold

    latent      float32 [t, h, w, c]: the posterior mean (stored="posterior") or one draw (stored="sample")
    latent_std  float32 [t, h, w, c]: the posterior std (stored="posterior" only)
    captions    list of str; id str; index int64 (the clip's index in the source split)

and beside the shards `latent_info.json` (`latent_info`): the latent shape, per-channel mean and
std over the train split (of z ~ q(z | x) when the posterior is stored: E[μ] and
sqrt(E[μ² + σ²] − E[μ]²); of the stored draws otherwise), the VAE's checkpoint step and parameter
hash, and the source. Selected by `--config.data.name=NAME`, the pipelines yield

    train {"latents": float32 [b, t, h, w, c], "tokens": int32 [b, L]}       (+ "data/skipped")
    eval  {"latents", "tokens", "caption": object [b], "mask": bool [b]}

Training draws a caption per example and, with `data.latent_sample` (posterior caches),
z = μ + σ·ε, all from the stream's per-position rng (deterministic, resumable, process-independent);
eval reads μ and the first caption. A model normalises with `normalize(z, info)` (per channel) and
checks the cache came from its VAE with `check_vae_hash(info, expected)`.
"""

from __future__ import annotations

import json

import numpy as np
from etils import epath

from input_pipeline import datasets
from input_pipeline.sources import config_error

INFO_FILE = "latent_info.json"
STORED = ("posterior", "sample")


def _info_path(name: str, data_dir: str) -> epath.Path:
    return datasets.dataset_path(name, data_dir) / INFO_FILE


def is_latent_dataset(name: str, data_dir: str) -> bool:
    """Whether `name` is a built dataset written by `vlm data encode` (False for missing ones and synthetic)."""
    if name == datasets.SYNTHETIC:
        return False
    try:
        return _info_path(name, data_dir).exists()
    except datasets.DatasetError:
        return False


def latent_info(name: str, data_dir: str) -> dict:
    """The latent dataset's metadata: {"shape": [t, h, w, c], "mean": [c], "std": [c], "stored",
    "vae_hash", "vae_step", "vae_workdir", "source", "splits": {split: count}, "stats_split", ...}.

    Raises DatasetError (a ValueError, one line) for a missing dataset or one that holds no latents.
    """
    path = _info_path(name, data_dir)
    if not path.exists():
        raise datasets.DatasetError(f"dataset {name!r} ({path.parent}) holds no latents (no {INFO_FILE}); write one "
                                    f"with `vlm data encode --vae_workdir=W --out_name={name}`")
    return json.loads(path.read_text())


def check_vae_hash(info: dict, expected: str) -> None:
    """Raises a one-line ConfigError when the latents were not made by the VAE with parameter hash `expected`
    (a prefix of the hash is enough)."""
    got = str(info.get("vae_hash", ""))
    if not expected or not got.startswith(str(expected)):
        raise config_error(
            f"the latent dataset was encoded by the VAE with parameter hash {got[:16]} (step {info.get('vae_step')} of "
            f"{info.get('vae_workdir') or '?'}), not {str(expected)[:16]}; re-encode it with `vlm data encode` from "
            f"this VAE, or use the VAE that made it")


def _stats(info: dict):
    return np.asarray(info["mean"], np.float32), np.asarray(info["std"], np.float32)


def normalize(z, info: dict):
    """(z − mean_c) / std_c per channel (the last axis); numpy or jax arrays [..., c]."""
    mean, std = _stats(info)
    return (z - mean) / std


def denormalize(z, info: dict):
    """The inverse of `normalize`: z · std_c + mean_c."""
    mean, std = _stats(info)
    return z * std + mean


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class LatentDecoder:
    """A latent record → {"latents": float32 [t, h, w, c], "caption": str}; the pipelines' decoder for
    latent datasets (the interface of datasets.ClipDecoder: `decoder(record, rng)` and `blank()`).

    Training (an rng): a random caption, and z = μ + σ·ε when `data.latent_sample` and the cache holds
    the posterior. Eval (rng None): μ (or the stored draw) and the first caption.
    """

    def __init__(self, data_config, info: dict):
        self.shape = tuple(int(s) for s in info["shape"])
        self.sample = bool(data_config.get("latent_sample", False)) and info.get("stored") == "posterior"

    def __call__(self, record: dict, rng: np.random.Generator | None) -> dict:
        z = np.asarray(record["latent"], np.float32)
        texts = record["captions"]
        if len(texts) == 0:
            raise ValueError("record has no caption")
        choice = 0
        if rng is not None:
            choice = int(rng.integers(len(texts)))
            if self.sample:
                z = z + np.asarray(record["latent_std"], np.float32) * rng.standard_normal(self.shape, np.float32)
        return {"latents": z, "caption": _text(texts[choice])}

    def blank(self) -> dict:
        """An all-zero example (eval batches' padding rows)."""
        return {"latents": np.zeros(self.shape, np.float32), "caption": ""}


def decoder_for(data_config, name: str, data_dir: str):
    """The decoder of a built dataset's records: LatentDecoder for latent datasets, else ClipDecoder."""
    if is_latent_dataset(name, data_dir):
        return LatentDecoder(data_config, latent_info(name, data_dir))
    return datasets.ClipDecoder(data_config)
