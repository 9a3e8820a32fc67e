"""`vlm export`: a run's weights as a folder anyone can load, without Orbax or the workdir.

    vlm export --workdir=W --output=D [--step=N] [--use_ema=false] [--dtype=bfloat16] [--format=stablehlo]

The export folder (also what `vlm convert` writes for public CLIP/SigLIP weights):

  D/model.safetensors   every parameter of the model, one tensor each, keyed by its "/"-joined path in
                        the model's parameter tree: the names `config.optim.frozen` and
                        `config.init_from.mapping` match ("video/encoder/blocks/0/mlp/up/kernel",
                        "text/embed/embedding", "logit_scale"; list indices are numbers). Shapes are
                        the model's own (kernels [in, out]), C order, little-endian, dtype F32 (or
                        BF16 / F16 with --dtype). The header's metadata (str → str):
                          format="vlm"  format_version="1"  vlm_version  step  dtype (of the tensors)
                          weights ("ema" or "params"; "converted" for `vlm convert`)  source (where from)
                        Names and shapes are stable: `tests/golden/export_keys_*.txt` pins them.
  D/config.json         the config that builds this model: the run's resolved config as W/config.json
                        holds it (`config.from_json` reads it; model, data.num_frames, data.resolution,
                        data.max_text_len, model.video.rgb_mean/rgb_std define the preprocessing),
                        with data.tokenizer="" and data.tokenizer_sha256 = sha256 of D/tokenizer.model.
  D/tokenizer.model     the run's SentencePiece model (pad 0, unk 1, bos 2, eos 3); a converted
                        checkpoint may instead have D/tokenizer.json (a Hugging Face tokenizer).
  D/README.md           a model card: source, step, the run's last eval metrics, how to load it.
  with --format=stablehlo, also (`vlm/stablehlo.py`):
  D/embed_text.jax_exported, D/embed_video.jax_exported   serialized `jax.export` functions.

Loading: `vlm.load(D)` (any mesh: each device reads only its slices of each tensor, with
safetensors' `safe_open(...).get_slice`), `config.init_from.workdir=D` (start a run from it),
or `safetensors.numpy.load_file(D + "/model.safetensors")` anywhere. Parameters load as the
model's float32 whatever the stored dtype. A bucket (gs://...) export is copied to a local
cache first (safetensors reads local files).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os

import jax
import numpy as np
from etils import epath
from flax import nnx, traverse_util

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
README = "README.md"
FORMAT_VERSION = "1"
FORMATS = ("safetensors", "stablehlo")
DTYPES = ("float32", "bfloat16", "float16")


def flatten(tree) -> dict[str, object]:
    """{"a/b/0/kernel": leaf} of a nested dict (the names `optim.frozen` regexes see)."""
    return {"/".join(str(k) for k in path): leaf for path, leaf in traverse_util.flatten_dict(tree).items()}


def vlm_version() -> str:
    try:
        return importlib.metadata.version("vlm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def numpy_dtype(name: str):
    """float32 | bfloat16 | float16 → the numpy dtype (ml_dtypes for bfloat16)."""
    import ml_dtypes

    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


def local_weights(path: str) -> str:
    """A local path of D/model.safetensors: itself, or for a bucket a copy cached by its path and size."""
    file = epath.Path(path) / WEIGHTS
    if "://" not in os.fspath(file):
        return os.fspath(file)
    size = file.stat().length
    key = hashlib.sha1(f"{file}:{size}".encode()).hexdigest()[:16]
    cache = epath.Path(os.path.expanduser("~")) / ".cache" / "vlm" / "exports" / key / WEIGHTS
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.parent / f"{WEIGHTS}.tmp-{os.getpid()}"
        file.copy(tmp, overwrite=True)
        tmp.replace(cache)
    return os.fspath(cache)


def read_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(local_weights(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor in D/model.safetensors (header only)."""
    from safetensors import safe_open

    with safe_open(local_weights(path), framework="numpy") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def read_arrays(path: str, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """{name: jax.Array} for the named tensors, each placed on its target's sharding and cast to its
    dtype; every device's slice is read on its own (`get_slice`), so nothing is read whole unless a
    device holds it whole."""
    from safetensors import safe_open

    out = {}
    with safe_open(local_weights(path), framework="numpy") as f:
        for name, target in targets.items():
            stored = f.get_slice(name)
            if tuple(stored.get_shape()) != tuple(target.shape):
                raise ValueError(f"{path}/{WEIGHTS}: tensor {name} has shape {tuple(stored.get_shape())}, the model "
                                 f"expects {tuple(target.shape)}; the export does not fit this config")

            def read(index, stored=stored, name=name, dtype=target.dtype):
                block = stored[index] if index else f.get_tensor(name)
                return np.asarray(block).astype(dtype)

            out[name] = jax.make_array_from_callback(target.shape, target.sharding, read)
    return out


def read_params(path: str, abstract_params, shardings):
    """The model's parameters (pure dict like `abstract_params`) from D/model.safetensors, on `shardings`.
    A missing or unexpected tensor is an error naming it."""
    flat_abstract, flat_shardings = flatten(abstract_params), flatten(shardings)
    stored = read_shapes(path)
    missing, unexpected = sorted(set(flat_abstract) - set(stored)), sorted(set(stored) - set(flat_abstract))
    if missing or unexpected:
        raise ValueError(f"{path}/{WEIGHTS} does not fit the model of its config.json: "
                         + (f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "")
                         + ("; " if missing and unexpected else "")
                         + (f"unexpected {', '.join(unexpected[:5])}" if unexpected else ""))
    targets = {name: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=flat_shardings[name])
               for name, a in flat_abstract.items()}
    arrays = read_arrays(path, targets)
    keys = traverse_util.flatten_dict(abstract_params)
    return traverse_util.unflatten_dict({k: arrays["/".join(str(p) for p in k)] for k in keys})


def write(output: str, params: dict[str, np.ndarray], config, *, tokenizer: str | None, metadata: dict[str, str],
          readme: str = "") -> epath.Path:
    """Writes an export folder: model.safetensors (the flat `params` as they are, with `metadata`
    added to format/format_version/vlm_version), config.json (`config` with data.tokenizer=""),
    the tokenizer file (a SentencePiece .model → tokenizer.model, or a tokenizer.json) and README.md."""
    from safetensors.numpy import save

    from vlm import config as config_lib
    from vlm import run_tokenizer

    folder = epath.Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_bytes = epath.Path(tokenizer).read_bytes() if tokenizer else b""
    name = "tokenizer.json" if os.fspath(tokenizer or "").endswith(".json") else run_tokenizer.TOKENIZER_FILE
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.tokenizer = ""
        config.data[run_tokenizer.SHA_KEY] = run_tokenizer.sha256(tokenizer_bytes) if tokenizer and name.endswith(
            ".model") else ""
    header = {"format": "vlm", "format_version": FORMAT_VERSION, "vlm_version": vlm_version(),
              **{k: str(v) for k, v in metadata.items()}}
    tensors = {k: np.array(v, order="C") for k, v in sorted(params.items())}  # (ascontiguousarray makes 0-d 1-d)
    _write_bytes(folder / WEIGHTS, save(tensors, metadata=header))
    if tokenizer:  # (a converted checkpoint may come without one)
        _write_bytes(folder / name, tokenizer_bytes)
    (folder / CONFIG).write_text(config_lib.to_json(config))
    if readme:
        (folder / README).write_text(readme)
    return folder


def _write_bytes(path: epath.Path, data: bytes) -> None:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def last_metrics(workdir: str) -> tuple[dict, dict]:
    """(the last train row, the last row with eval metrics) of W/metrics.jsonl ({} when absent)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    train_row, eval_row = {}, {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            keys = [k for k in row if k not in ("step", "time")]
            if any(k.startswith("train/") for k in keys):
                train_row = row
            if any(not k.startswith("train/") for k in keys):
                eval_row = row
    return train_row, eval_row


def model_card(workdir: str, step: int, weights: str, dtype: str, config, stablehlo: bool) -> str:
    train_row, eval_row = last_metrics(workdir)
    lines = [
        f"# vlm {config.model.name} ({config.task.name})", "",
        f"Exported from `{workdir}` at step {step} ({weights} weights, {dtype}) by vlm {vlm_version()} on "
        f"{datetime.date.today().isoformat()}.", "",
        f"- video: {config.data.num_frames} frames of {config.data.resolution}x{config.data.resolution} "
        f"(uint8 [B, T, H, W, 3]; the model normalises), sampled and centre-cropped as the eval split",
        f"- text: at most {config.data.max_text_len} SentencePiece tokens (`tokenizer.model`)",
        f"- embedding size: {config.model.get('embed_dim', '?')}", "",
    ]
    if eval_row:
        lines += [f"## Eval metrics (step {eval_row['step']})", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in eval_row.items() if k not in ("step", "time")
                  and not k.startswith("train/")]
        lines.append("")
    if train_row:
        lines += [f"Last train loss: {train_row.get('train/loss', float('nan')):.4g} (step {train_row['step']}).", ""]
    lines += ["## Loading", "", "```python", "import vlm", "", "loaded = vlm.load(\"PATH_TO_THIS_FOLDER\")",
              "text_emb = loaded.embed_text([\"a red circle moves left\"])  # float32 [1, E], unit norm",
              "video_emb = loaded.embed_video([\"clip.mp4\"])  # decoded like the eval split", "```", "",
              "Without vlm: `safetensors.numpy.load_file(\"model.safetensors\")` gives the parameters by name.", ""]
    if stablehlo:
        from vlm import stablehlo as stablehlo_lib

        lines += stablehlo_lib.card_section()
    return "\n".join(lines)


def export(workdir: str, output: str, *, step: int | None = None, use_ema: bool | None = None,
           dtype: str = "float32", format: str = "safetensors") -> epath.Path:
    """Writes the export folder `output` from a checkpoint of `workdir` (latest, or `step`)."""
    from vlm import loading

    if format not in FORMATS:
        raise ValueError(f"--format={format!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    if loading.is_export(workdir):
        raise ValueError(f"{workdir} is already an export folder; --workdir must be a `vlm train` workdir")
    loaded = loading.load(workdir, step=step, use_ema=use_ema)
    params = flatten(jax.device_get(nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))))
    params = {k: np.asarray(v).astype(numpy_dtype(dtype)) for k, v in params.items()}
    weights = "ema" if use_ema is not False and _has_ema(workdir, loaded.step) else "params"
    card = model_card(workdir, loaded.step, weights, dtype, loaded.config, format == "stablehlo")
    config = loading.read_config(workdir)  # as saved (not the loading mesh), with the run's tokenizer sha
    folder = write(output, params, config, tokenizer=loaded.tokenizer.model_path,
                   metadata={"step": loaded.step, "dtype": dtype, "weights": weights, "source": workdir}, readme=card)
    if format == "stablehlo":
        from vlm import stablehlo

        stablehlo.export_functions(loaded, folder, dtype=dtype)
    return folder


def _has_ema(workdir: str, step: int) -> bool:
    return (epath.Path(workdir) / "checkpoints" / str(step) / "ema").exists()
