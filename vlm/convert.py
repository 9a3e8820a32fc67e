"""Public image-text weights (Hugging Face CLIP and SigLIP folders) → a vlm dual-encoder export.

    vlm convert --from=DIR --kind=clip|siglip --output=D [--num_frames=8 --tubelet_frames=2]

DIR is a Hugging Face checkpoint folder: `config.json` and `model.safetensors` (or shards with
`model.safetensors.index.json`), read with the `safetensors` library (no torch, no transformers).
D is an export folder:

    D/model.safetensors  float32 parameters keyed by their "/"-joined vlm paths ("video/encoder/blocks/0/mlp/up/kernel")
    D/config.json        a dual-encoder config (configs/dual_encoder.py's keys) that builds exactly this model
    D/tokenizer.json     CLIP's BPE tokenizer, when DIR has one (read with the `tokenizers` library: `HFTokenizer`)
    D/tokenizer.model    SigLIP's SentencePiece model, when DIR has `spiece.model`
    D/README.md          where it came from

The image tower becomes a video tower (joint space-time attention): the patch embedding is
inflated over the tubelet's t frames (repeated, divided by t) and the temporal positions start
at zero, so a static clip embeds like its image; an image is a one-frame video. Every tensor of
DIR is used exactly once: a missing or unexpected tensor is an error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

KINDS = ("clip", "siglip")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
# Hugging Face `hidden_act` → vlm.nn.mlp.ACTIVATIONS ("gelu_new" is the same tanh formula).
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu_exact", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
IGNORED_SUFFIXES = (".position_ids",)  # index buffers some checkpoints carry; not weights
# transformers' defaults: a config.json leaves out the values equal to them.
_TOWER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
HF_DEFAULTS = {
    "clip": dict(projection_dim=512,
                 vision=dict(_TOWER, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
                 text=dict(_TOWER, hidden_size=512, intermediate_size=2048, num_attention_heads=8, vocab_size=49408,
                           max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                           eos_token_id=49407)),
    "siglip": dict(vision=dict(_TOWER, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                               layer_norm_eps=1e-6, vision_use_head=True),
                   text=dict(_TOWER, vocab_size=32000, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                             layer_norm_eps=1e-6)),
}


class ConvertError(ValueError):
    """A checkpoint that cannot be converted: one line naming the file, tensor or key and what to do."""


# ----- reading a Hugging Face folder -----


def read_checkpoint(folder: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, {tensor name: numpy array}) of a Hugging Face checkpoint folder."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ConvertError(f"{folder}/config.json not found; --from must be a Hugging Face checkpoint folder")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ConvertError(f"{folder} has no model.safetensors (nor model.safetensors.index.json); "
                           f"save the model with safe_serialization (pytorch_model.bin is not read)")
    tensors = {}
    for name in files:
        tensors.update(load_file(folder / name))
    return json.loads((folder / "config.json").read_text()), tensors


class _Tensors:
    """Hands out a checkpoint's tensors once each, as float32; `finish()` names any left over."""

    def __init__(self, tensors: dict[str, np.ndarray], source: str):
        self.tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
        self.source = source

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise ConvertError(f"{self.source}: missing tensor {name}; is this the right --kind, and a whole model "
                               f"(not only one tower)?")
        return np.asarray(self.tensors.pop(name), np.float32)

    def finish(self) -> None:
        if self.tensors:
            names = sorted(self.tensors)
            raise ConvertError(f"{self.source}: unexpected tensor {names[0]}"
                               + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
                               + "; this converter does not know where it goes")


def _activation(hf_act: str, where: str) -> str:
    if hf_act not in ACTIVATIONS:
        raise ConvertError(f"{where}.hidden_act={hf_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[hf_act]


def _normalisation(folder: Path, mean: tuple, std: tuple) -> tuple[tuple, tuple]:
    """The image processor's mean/std (preprocessor_config.json) when the folder has one, else the kind's."""
    path = folder / "preprocessor_config.json"
    if path.exists():
        pre = json.loads(path.read_text())
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


# ----- tensor layouts: PyTorch (out, in) → vlm (in, out), heads split out -----


def _layer_norm(get, prefix: str) -> dict:
    return {"scale": get(f"{prefix}.weight"), "bias": get(f"{prefix}.bias")}


def _attention(q, k, v, out_w, out_b, num_heads: int) -> dict:
    """q/k/v: (weight [D, D], bias [D]) pairs in PyTorch layout → SelfAttention / CrossAttention params."""
    d = out_w.shape[0]
    proj = lambda w, b: {"kernel": w.T.reshape(w.shape[1], num_heads, d // num_heads), "bias": b.reshape(num_heads, -1)}
    return {"query": proj(*q), "key": proj(*k), "value": proj(*v),
            "out": {"kernel": out_w.T.reshape(num_heads, d // num_heads, d), "bias": out_b}}


def _mlp(get, prefix: str) -> dict:
    return {"up": {"kernel": get(f"{prefix}.fc1.weight").T, "bias": get(f"{prefix}.fc1.bias")},
            "down": {"kernel": get(f"{prefix}.fc2.weight").T, "bias": get(f"{prefix}.fc2.bias")}}


def _encoder(get, prefix: str, depth: int, num_heads: int, final_norm: str) -> dict:
    """`prefix`.layers.{i} (CLIP/SigLIP encoder layers) + a final LayerNorm → vlm Encoder params."""
    blocks = {}
    for i in range(depth):
        p = f"{prefix}.layers.{i}"
        pair = lambda name: (get(f"{p}.self_attn.{name}.weight"), get(f"{p}.self_attn.{name}.bias"))
        blocks[i] = {
            "norm1": _layer_norm(get, f"{p}.layer_norm1"),
            "attn": _attention(pair("q_proj"), pair("k_proj"), pair("v_proj"), get(f"{p}.self_attn.out_proj.weight"),
                               get(f"{p}.self_attn.out_proj.bias"), num_heads),
            "norm2": _layer_norm(get, f"{p}.layer_norm2"),
            "mlp": _mlp(get, f"{p}.mlp"),
        }
    return {"blocks": blocks, "norm": _layer_norm(get, final_norm)}


def inflate_patch_embedding(weight: np.ndarray, tubelet_frames: int) -> np.ndarray:
    """Conv2d weight [D, 3, p, q] → TubeletEmbed kernel [t*p*q*3, D] (features ordered t, p, q, channel):
    the image kernel repeated over the t frames and divided by t, so t equal frames give the image's token."""
    kernel = weight.transpose(2, 3, 1, 0)  # [p, q, 3, D]
    kernel = np.broadcast_to(kernel / tubelet_frames, (tubelet_frames, *kernel.shape))  # [t, p, q, 3, D]
    return np.ascontiguousarray(kernel.reshape(-1, weight.shape[0]))


# ----- CLIP and SigLIP -----


def _towers(hf: dict) -> tuple[dict, dict]:
    """(vision_config, text_config) with transformers' defaults filled in (older files: *_config_dict)."""
    defaults = HF_DEFAULTS[hf["model_type"]]
    towers = []
    for tower in ("vision", "text"):
        given = {**(hf.get(f"{tower}_config_dict") or {}), **(hf.get(f"{tower}_config") or {})}
        if not given:
            raise ConvertError(f"config.json has no {tower}_config; convert a whole CLIPModel or SiglipModel")
        towers.append({**defaults[tower], **given})
    return towers[0], towers[1]


def _tower_config(tc: dict, where: str) -> dict:
    return dict(width=tc["hidden_size"], depth=tc["num_hidden_layers"], num_heads=tc["num_attention_heads"],
                mlp_dim=tc["intermediate_size"], norm_eps=float(tc["layer_norm_eps"]),
                activation=_activation(tc["hidden_act"], where))


def clip_model(hf: dict, get, tubelet_frames: int, num_frames: int) -> tuple[dict, dict]:
    """(model/data/task config values, params) of a Hugging Face CLIPModel."""
    vc, tc = _towers(hf)
    video, text = _tower_config(vc, "vision_config"), _tower_config(tc, "text_config")
    eos = tc["eos_token_id"]
    if eos not in (2, tc["vocab_size"] - 1):  # 2: the legacy config, where HF pools at the highest id as well
        raise ConvertError(f"text_config.eos_token_id={eos} is not the highest id ({tc['vocab_size'] - 1}); vlm pools "
                           f"CLIP text at the highest token id")
    p = vc["patch_size"]
    pos = get("vision_model.embeddings.position_embedding.weight")  # [1+S, D]: class token first
    params = {
        "video": {
            "embed": {"proj": {"kernel": inflate_patch_embedding(get("vision_model.embeddings.patch_embedding.weight"),
                                                                 tubelet_frames),
                               "bias": np.zeros(video["width"], np.float32)}},  # CLIP's patch conv has no bias
            "cls_token": get("vision_model.embeddings.class_embedding") + pos[0],
            "temporal_pos": {"table": np.zeros((-(-num_frames // tubelet_frames), video["width"]), np.float32)},
            "spatial_pos": {"table": pos[1:]},
            "pre_norm": _layer_norm(get, "vision_model.pre_layrnorm"),
            # CLIP's post_layernorm acts on the pooled class token; a LayerNorm is per token, so it is the final norm.
            "encoder": _encoder(get, "vision_model.encoder", video["depth"], video["num_heads"],
                                "vision_model.post_layernorm"),
        },
        "text": {
            "embed": {"embedding": get("text_model.embeddings.token_embedding.weight")},
            "pos": {"table": get("text_model.embeddings.position_embedding.weight")},
            "encoder": _encoder(get, "text_model.encoder", text["depth"], text["num_heads"],
                                "text_model.final_layer_norm"),
        },
        "video_proj": {"kernel": get("visual_projection.weight").T},
        "text_proj": {"kernel": get("text_projection.weight").T},
        "logit_scale": get("logit_scale").reshape(()),
        "logit_bias": np.zeros((), np.float32),
    }
    values = dict(
        embed_dim=hf.get("projection_dim", HF_DEFAULTS["clip"]["projection_dim"]), loss="softmax",
        resolution=vc["image_size"], max_text_len=tc["max_position_embeddings"],
        video=dict(tubelet=(tubelet_frames, p, p), pool="cls", pre_norm=True, projection="linear", **video),
        text=dict(vocab_size=tc["vocab_size"], pool="eot", causal=True, projection="linear", **text),
    )
    return values, params


def siglip_model(hf: dict, get, tubelet_frames: int, num_frames: int) -> tuple[dict, dict]:
    """(model/data/task config values, params) of a Hugging Face SiglipModel."""
    vc, tc = _towers(hf)
    if not vc["vision_use_head"]:
        raise ConvertError("vision_config.vision_use_head=false (no attention-pooling head) is not supported")
    video, text = _tower_config(vc, "vision_config"), _tower_config(tc, "text_config")
    p, d = vc["patch_size"], video["width"]
    head = "vision_model.head"
    in_w, in_b = get(f"{head}.attention.in_proj_weight"), get(f"{head}.attention.in_proj_bias")  # [3D, D], [3D]
    qkv = [(in_w[i * d:(i + 1) * d], in_b[i * d:(i + 1) * d]) for i in range(3)]
    params = {
        "video": {
            "embed": {"proj": {"kernel": inflate_patch_embedding(get("vision_model.embeddings.patch_embedding.weight"),
                                                                 tubelet_frames),
                               "bias": get("vision_model.embeddings.patch_embedding.bias")}},
            "temporal_pos": {"table": np.zeros((-(-num_frames // tubelet_frames), d), np.float32)},
            "spatial_pos": {"table": get("vision_model.embeddings.position_embedding.weight")},
            "encoder": _encoder(get, "vision_model.encoder", video["depth"], video["num_heads"],
                                "vision_model.post_layernorm"),
            "head": {
                "probe": get(f"{head}.probe").reshape(1, d),
                "attn": _attention(*qkv, get(f"{head}.attention.out_proj.weight"),
                                   get(f"{head}.attention.out_proj.bias"), video["num_heads"]),
                "norm": _layer_norm(get, f"{head}.layernorm"),
                "mlp": _mlp(get, f"{head}.mlp"),
            },
        },
        "text": {
            "embed": {"embedding": get("text_model.embeddings.token_embedding.weight")},
            "pos": {"table": get("text_model.embeddings.position_embedding.weight")},
            "encoder": _encoder(get, "text_model.encoder", text["depth"], text["num_heads"],
                                "text_model.final_layer_norm"),
        },
        "text_proj": {"kernel": get("text_model.head.weight").T, "bias": get("text_model.head.bias")},
        "logit_scale": get("logit_scale").reshape(()),
        "logit_bias": get("logit_bias").reshape(()),
    }
    values = dict(
        embed_dim=d, loss="sigmoid", resolution=vc["image_size"], max_text_len=tc["max_position_embeddings"],
        video=dict(tubelet=(tubelet_frames, p, p), pool="map", pre_norm=False, projection="none", **video),
        text=dict(vocab_size=tc["vocab_size"], pool="last", causal=False, projection="linear_bias", **text),
    )
    return values, params


MODELS: dict[str, Callable] = {"clip": clip_model, "siglip": siglip_model}
DEFAULT_NORMALISATION = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}


# ----- the vlm side: config, checks against the model, the export folder -----


def _vlm_config(values: dict, rgb: tuple[tuple, tuple], num_frames: int):
    """configs/dual_encoder.py:tiny with the converted model's keys (its trainer keys are the file's defaults)."""
    from configs import dual_encoder

    c = dual_encoder.get_config("tiny")
    video, text = dict(values["video"]), dict(values["text"])
    c.model.embed_dim = values["embed_dim"]
    c.model.video.update(dict(attention="joint", rgb_mean=rgb[0], rgb_std=rgb[1], **video))
    c.model.text.update(text)
    c.data.update(dict(num_frames=num_frames, resolution=values["resolution"], max_text_len=values["max_text_len"],
                       vocab_size=text["vocab_size"]))
    c.task.loss = values["loss"]
    return c


def _flat(tree) -> dict[str, object]:
    from flax import traverse_util

    return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(tree).items()}


def abstract_params(config) -> dict:
    """The pure-dict tree of ShapeDtypeStructs of the dual encoder `config` builds (nothing allocated)."""
    from flax import nnx

    from vlm import tasks

    model = nnx.eval_shape(lambda: tasks.get(config).build_model(nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _check_against_model(flat: dict[str, np.ndarray], config, what: str) -> dict:
    """`flat` must name every parameter of the model `config` builds, with its shape; returns the model's tree."""
    from flax import traverse_util

    abstract = abstract_params(config)
    keys = {"/".join(map(str, k)): k for k in traverse_util.flatten_dict(abstract)}
    expected = _flat(abstract)
    for name in sorted(set(expected) | set(flat)):
        if name not in flat:
            raise ConvertError(f"{what}: no tensor for the model's parameter {name}")
        if name not in expected:
            raise ConvertError(f"{what}: tensor {name} is not a parameter of the model its config.json builds")
        if tuple(flat[name].shape) != tuple(expected[name].shape):
            raise ConvertError(f"{what}: tensor {name} has shape {tuple(flat[name].shape)} but the model's has shape "
                               f"{tuple(expected[name].shape)}")
    return traverse_util.unflatten_dict({keys[name]: flat[name] for name in flat})


def convert(source: str | Path, kind: str, output: str | Path, *, num_frames: int = 8, tubelet_frames: int = 2) -> Path:
    """Converts the Hugging Face folder `source` (`kind`: clip or siglip) into the export folder `output`."""
    if kind not in KINDS:
        raise ConvertError(f"--kind={kind!r} is unknown; choose one of {', '.join(KINDS)}")
    if num_frames < 1 or tubelet_frames < 1:
        raise ConvertError(f"--num_frames={num_frames} and --tubelet_frames={tubelet_frames} must be ≥ 1")
    source, output = Path(source), Path(output)
    hf, tensors = read_checkpoint(source)
    model_type = hf.get("model_type", "")
    if model_type != kind:
        hint = f"use --kind={model_type}" if model_type in KINDS else f"supported: {', '.join(KINDS)}"
        raise ConvertError(f"--kind={kind} but {source}/config.json has model_type {model_type!r}; {hint}")
    get = _Tensors(tensors, f"{source}/model.safetensors")
    values, params = MODELS[kind](hf, get, tubelet_frames, num_frames)
    get.finish()
    config = _vlm_config(values, _normalisation(source, *DEFAULT_NORMALISATION[kind]), num_frames)
    flat = {k: np.array(v, np.float32, order="C") for k, v in _flat(params).items()}
    _check_against_model(flat, config, f"converting {source}")
    tokenizer = next((str(source / n) for n in ("tokenizer.json", "spiece.model") if (source / n).exists()), None)
    write_export(output, flat, config, source=f"{kind}:{source.resolve()}", tokenizer=tokenizer,
                 readme=f"Converted from the Hugging Face {kind} checkpoint {source.resolve()} by `vlm convert`.\n")
    return output


def write_export(output: str | Path, flat_params: dict[str, np.ndarray], config, *, source: str = "",
                 tokenizer: str | None = None, readme: str = "") -> None:
    """The export folder of `vlm/export.py` (model.safetensors with format="vlm" header metadata,
    weights="converted"; config.json; the tokenizer; README.md), float32 parameters."""
    from vlm import export

    flat = {k: np.array(v, np.float32, order="C") for k, v in flat_params.items()}
    readme = ("# vlm export\n\n" + readme + "\n`model.safetensors`: float32 parameters keyed by their `/`-joined "
              "paths; `config.json`: the config that builds the model.\n\n"
              "    import vlm\n    loaded = vlm.load(\"" + str(output) + "\")\n")
    export.write(str(output), flat, config, tokenizer=tokenizer, readme=readme,
                 metadata={"weights": "converted", "source": source, "dtype": "float32", "step": "0"})


def load_export(path: str | Path):
    """(params, config) of an export folder: params a pure dict of numpy float32 arrays shaped like the model
    that `config` builds (`nnx.update(model, params)` or `init_from`), config the locked ConfigDict."""
    from safetensors.numpy import load_file

    from vlm import config as config_lib

    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).exists():
            raise ConvertError(f"{path / name} not found; an export folder has model.safetensors and config.json")
    config = config_lib.from_json((path / "config.json").read_text())
    return _check_against_model(load_file(path / "model.safetensors"), config, str(path)), config


# ----- tokenizer.json (CLIP's BPE) -----


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (e.g. CLIP's BPE) with `input_pipeline.tokenizer.Tokenizer`'s batch encoding:
    [bos] pieces [eos] (the file's post-processor), truncated to max_len keeping the eos, right-padded with 0.

    Padding with 0 is harmless for CLIP's towers: causal attention and end-of-text pooling never read past
    the end-of-text token. Picklable (carries the JSON text, not the path).
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            self._json = Path(path).read_text()
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer.json not found: {path}") from None
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(self._json)
        return self._tokenizer

    def __getstate__(self) -> dict:
        return {"path": self.path, "_json": self._json, "_tokenizer": None}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts, max_len: int) -> np.ndarray:
        """Token ids int32 [B, max_len]."""
        tokenizer = self.tokenizer
        tokenizer.enable_truncation(max_len)
        tokenizer.no_padding()
        ids = np.zeros((len(texts), max_len), np.int32)
        for row, encoding in enumerate(tokenizer.encode_batch(list(texts))):
            ids[row, :len(encoding.ids)] = encoding.ids
        return ids

    def decode(self, ids) -> str:
        """Text of one id sequence [L] (special tokens and the trailing padding skipped)."""
        text = self.tokenizer.decode([int(i) for i in np.trim_zeros(np.asarray(ids).reshape(-1), "b")])
        suffix = getattr(self.tokenizer.model, "end_of_word_suffix", None)  # CLIP's "</w>" marks word ends
        return " ".join(text.replace(suffix, " ").split()) if suffix else text
