"""`vlm.load`: a trained run (its workdir) or an export folder, ready to embed.

    import vlm
    loaded = vlm.load("/tmp/vlm_tiny")                 # or gs://..., or an export folder (`vlm export`)
    text_emb = loaded.embed_text(["a red circle moves left"])      # float32 [1, E], unit norm
    video_emb = loaded.embed_video(["clip.mp4", "photo.jpg"])      # float32 [2, E]
    loaded.model, loaded.config, loaded.step, loaded.tokenizer     # the nnx model and what made it

Only the parameters are read (the EMA when the run kept one, unless use_ema=False), never the
optimizer state; an export folder is read without Orbax. The tokenizer is the one in the folder
(`tokenizer.model`, or a converted checkpoint's `tokenizer.json`), so nothing else is needed: no
data dir, no dataset. Videos go through the run's own eval decoding (`input_pipeline.datasets.
ClipDecoder` with no rng: the eval split's frame times, resize and centre crop) and the model
normalises them with its own constants. Embeddings are computed in batches of `batch_size` rows
on the mesh (the last one padded as the eval pipeline pads), so the same text or clip at the same
row of a batch gives the same bits as the run's eval on that mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from vlm import config as config_lib
from vlm import run_tokenizer, sharding, tasks
from vlm.nn.embeddings import IMAGENET_MEAN, IMAGENET_STD

DTYPES = ("float32", "bfloat16", "float16")
MAX_DEFAULT_BATCH = 64  # rows per call when the run's eval batch is larger (one device's memory)
EXPORT_WEIGHTS = "model.safetensors"
# vlm/nn/embeddings.py's constants, for configs without model.video.rgb_mean / rgb_std.


@dataclasses.dataclass
class Loaded:
    """A model with its config, step, tokenizer and the mesh it lives on."""

    model: nnx.Module
    config: ml_collections.ConfigDict
    step: int
    tokenizer: Any  # input_pipeline.tokenizer.Tokenizer (or a converted checkpoint's HFTokenizer)
    mesh: jax.sharding.Mesh
    rules: tuple
    batch_size: int  # rows per jitted call, a multiple of the mesh's batch shards
    path: str

    @property
    def max_text_len(self) -> int:
        return int(self.config.data.max_text_len)

    @property
    def rgb_mean(self) -> tuple[float, float, float]:
        """The model's per-channel normalisation mean, in [0, 1] units (it normalises uint8 video itself)."""
        return tuple(self.config.model.video.get("rgb_mean", IMAGENET_MEAN))

    @property
    def rgb_std(self) -> tuple[float, float, float]:
        return tuple(self.config.model.video.get("rgb_std", IMAGENET_STD))

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """(T, R, R, 3) of one preprocessed clip."""
        d = self.config.data
        return int(d.num_frames), int(d.resolution), int(d.resolution), 3

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [N, L]: the ids the eval pipeline gives these captions (eos, right-padded with 0)."""
        if isinstance(texts, str):
            raise ValueError("embed_text/tokenize take a list of strings, e.g. [\"a dog runs\"], not one string")
        return self.tokenizer.encode(list(texts), self.max_text_len)

    def preprocess(self, video) -> np.ndarray:
        """uint8 [T, R, R, 3]: a video or image (path, local or gs://, or encoded bytes) decoded as the
        eval split decodes (`ClipDecoder`, no rng); a uint8 array already [..., T, R, R, 3] is returned
        as it is (the model normalises it)."""
        from input_pipeline import datasets

        if isinstance(video, (str, os.PathLike, bytes)):
            data = video if isinstance(video, bytes) else epath.Path(video).read_bytes()
            record = {"video": data, "start": 0.0, "end": 0.0, "captions": [""]}  # the whole clip
            return datasets.ClipDecoder(self.config.data)(record, None)["video"]
        array = np.asarray(video)
        if array.dtype != np.uint8 or array.shape[-4:] != self.clip_shape:
            raise ValueError(f"video array of dtype {array.dtype} and shape {array.shape}: expected uint8 "
                             f"[..., {', '.join(map(str, self.clip_shape))}] (data.num_frames, data.resolution); "
                             f"pass a file path to decode, resize and crop it")
        return array

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [N, E], unit norm (dual encoders)."""
        tokens = self.tokenize(texts)
        blank = self.tokenizer.encode([""], self.max_text_len)[0]  # the eval pipeline's padding row
        return self._embed("embed_text", tokens, blank)

    def embed_video(self, videos) -> np.ndarray:
        """float32 [N, E], unit norm (dual encoders): a list of paths (or bytes), or uint8 [N, T, R, R, 3]."""
        if isinstance(videos, (str, os.PathLike, bytes)):
            raise ValueError("embed_video takes a list of paths (or a uint8 array [N, T, R, R, 3]), not one path")
        if isinstance(videos, np.ndarray) or hasattr(videos, "shape"):
            clips = self.preprocess(videos).reshape(-1, *self.clip_shape)
        else:
            clips = np.stack([self.preprocess(v) for v in videos]) if len(videos) else np.zeros((0, *self.clip_shape),
                                                                                              np.uint8)
        return self._embed("embed_video", clips, np.zeros(self.clip_shape, np.uint8))

    def _embed(self, method: str, rows: np.ndarray, blank: np.ndarray) -> np.ndarray:
        if not hasattr(self.model, method):
            raise ValueError(f"{type(self.model).__name__} has no {method} (only dual encoders embed)")
        fn = _embed_fn(nnx.graphdef(self.model), method)
        state = nnx.state(self.model)
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            pad = self.batch_size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.broadcast_to(blank, (pad, *blank.shape))])
            batch = jax.device_put(chunk, sharding.batch_sharding(self.mesh, chunk.ndim))
            with sharding.use_mesh(self.mesh, self.rules):
                out.append(np.asarray(jax.device_get(fn(state, batch)))[: len(chunk) - pad])
        if not out:
            return np.zeros((0, int(self.config.model.embed_dim)), np.float32)
        return np.concatenate(out)


@functools.lru_cache(maxsize=16)
def _embed_fn(graphdef: nnx.GraphDef, method: str):
    """jit(state, rows → model.<method>(rows)); traced under the caller's `use_mesh`."""
    return jax.jit(lambda state, x: getattr(nnx.merge(graphdef, state), method)(x))


def is_export(path: str) -> bool:
    return (epath.Path(path) / EXPORT_WEIGHTS).exists()


def read_config(path: str) -> ml_collections.ConfigDict:
    """The config.json of a workdir or an export folder (trainer keys added since filled in)."""
    file = epath.Path(path) / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found; pass the workdir of a `vlm train` run or a `vlm export` folder")
    return config_lib.from_json(file.read_text())


def inference_config(config, *, mesh: dict | None = None, dtype: str | None = None):
    """`config` with the mesh for loading (default: data parallel) and the compute dtype override."""
    config = config.copy_and_resolve_references()
    sizes = dict(data=-1, fsdp=1, context=1, tensor=1)
    sizes.update(mesh or {})
    unknown = sorted(set(sizes) - set(sharding.MESH_AXES))
    if unknown:
        raise ValueError(f"mesh={mesh}: unknown axes {unknown}; use {', '.join(sharding.MESH_AXES)}")
    with config.unlocked():  # (configs saved before the context axis lack it)
        config.mesh.update(sizes)
        config.mesh.dcn.update(dict(data=1, fsdp=1, context=1, tensor=1))
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        config.model.dtype = dtype
    return config


def abstract_model(config, mesh: jax.sharding.Mesh, rules):
    """(graphdef, abstract params, abstract other variables, their shardings): pure dicts; nothing allocated,
    no optimizer."""
    task = tasks.get(config)
    with sharding.use_mesh(mesh, rules):
        model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(config.seed)))
        graphdef, params, variables = nnx.split(model, nnx.Param, ...)
        param_shardings = sharding.state_shardings(params, mesh, rules)
        variable_shardings = sharding.state_shardings(variables, mesh, rules)
        sharding.check_divisible(nnx.to_pure_dict(params), param_shardings)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(variables), param_shardings, variable_shardings


def tokenizer_of(path: str, config):
    """(tokenizer, config): the folder's tokenizer.model (or tokenizer.json, a converted checkpoint's)."""
    from input_pipeline.tokenizer import Tokenizer

    folder = epath.Path(path)
    if not (folder / run_tokenizer.TOKENIZER_FILE).exists() and (folder / "tokenizer.json").exists():
        from vlm.convert import HFTokenizer  # `vlm convert`'s reader of Hugging Face tokenizer.json files

        return HFTokenizer(run_tokenizer.local_copy(folder / "tokenizer.json")), config
    config = run_tokenizer.use_folder_copy(config, path)
    if config.data.tokenizer:
        return Tokenizer(config.data.tokenizer), config
    from input_pipeline.tokenizer import get_tokenizer

    return get_tokenizer(config.data), config  # an old workdir: the tokenizer cached in the data dir


def _restore_workdir(config, path, abstract, step, use_ema):
    from vlm import train  # Orbax: imported for workdirs only

    _, params, variables, param_shardings, variable_shardings = abstract
    checkpointer = train.create_checkpointer(config, path)
    try:
        step = checkpointer.resolve_step(step)
        item = "ema" if (use_ema is None or use_ema) and "ema" in checkpointer.items(step) else "params"
        params, step = checkpointer.restore_params(step, params, param_shardings, item=item)
        if jax.tree.leaves(variables):
            state, _ = checkpointer.restore(step, {"model_state": variables}, {"model_state": variable_shardings})
            variables = state["model_state"]
    finally:
        checkpointer.close()
    return params, variables, step


def load(path: str, step: int | None = None, use_ema: bool | None = None, devices: Sequence[jax.Device] | None = None,
         dtype: str | None = None, *, mesh: dict | None = None, batch_size: int | None = None) -> Loaded:
    """A run's model from its workdir (checkpoint `step`, default latest) or an export folder.

    devices: where the model lives (default: the first device); mesh: axis sizes over them (default
    dict(data=-1): data parallel; dict(fsdp=8) shards the parameters, each device reading only its
    slices of an export). dtype: the compute dtype (default: the run's; parameters stay float32).
    use_ema: the EMA weights when the run kept them (default True; exports hold one set).
    batch_size: rows per jitted call (default: the run's eval batch, at most 64, rounded to the mesh).
    """
    from vlm import export as export_lib

    exported = is_export(path)
    config = inference_config(read_config(path), mesh=mesh, dtype=dtype)
    tokenizer, config = tokenizer_of(path, config)
    devices = list(devices if devices is not None else jax.devices()[:1])
    device_mesh = sharding.create_mesh(config.mesh, devices)
    rules = sharding.logical_rules(config.sharding_rules)
    abstract = abstract_model(config, device_mesh, rules)
    graphdef, abstract_params, abstract_vars, param_shardings, _ = abstract
    if exported:
        params = export_lib.read_params(path, abstract_params, param_shardings)
        if jax.tree.leaves(abstract_vars):
            raise ValueError(f"{path}: the model has non-parameter state, which exports do not hold yet; "
                             f"load the workdir instead")
        variables, step = {}, int(export_lib.read_metadata(path).get("step", 0))
    else:
        params, variables, step = _restore_workdir(config, path, abstract, step, use_ema)
    model = nnx.merge(graphdef, params, variables or {})
    shards = device_mesh.shape["data"] * device_mesh.shape["fsdp"]
    rows = batch_size or min(int(config.get("eval_batch_size", MAX_DEFAULT_BATCH)), MAX_DEFAULT_BATCH)
    rows = -(-rows // shards) * shards
    return Loaded(model, config, int(step), tokenizer, device_mesh, rules, rows, os.fspath(path))
