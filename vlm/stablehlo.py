"""`vlm export --format=stablehlo`: the embedding functions as serialized `jax.export` modules.

Beside an export folder's model.safetensors (see `vlm/export.py`):

  D/embed_text.jax_exported    f(params, tokens int32 [b, L]) → float32 [b, E], unit norm
  D/embed_video.jax_exported   f(params, video uint8 [b, T, R, R, 3]) → float32 [b, E], unit norm

`b` is symbolic (any batch size); `params` is {name: array} exactly as stored in model.safetensors
(its dtype: the functions cast to float32, as `vlm.load` does); lowered for cpu, cuda and tpu
(`jax.export` multi-platform; XLA attention whatever the run used). Calling one needs jax
(with `flatbuffers`) and numpy only: no vlm, flax or safetensors (`read_safetensors` below is
the ten lines a caller copies). Tokens are the SentencePiece ids of tokenizer.model with eos
appended, right-padded with 0 to L; videos are decoded, resized and centre-cropped like the
eval split (`vlm.load(D).preprocess` does it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from vlm import sharding

PLATFORMS = ("cpu", "cuda", "tpu")
FUNCTIONS = ("embed_text", "embed_video")
SUFFIX = ".jax_exported"

# What a caller runs, with only jax and numpy (ml_dtypes comes with jax).
CALLER = '''import json, struct
import jax, ml_dtypes, numpy as np

def read_safetensors(path):
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header, data = json.loads(f.read(size)), f.read()
    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
    return {name: np.frombuffer(data[t["data_offsets"][0]:t["data_offsets"][1]], dtypes[t["dtype"]]).reshape(t["shape"])
            for name, t in header.items() if name != "__metadata__"}

params = read_safetensors("FOLDER/model.safetensors")
embed_text = jax.export.deserialize(open("FOLDER/embed_text.jax_exported", "rb").read())
embed_video = jax.export.deserialize(open("FOLDER/embed_video.jax_exported", "rb").read())
'''


def _check_flatbuffers() -> None:
    try:
        import flatbuffers  # noqa: F401  (jax.export's serialization needs it)
    except ImportError:
        raise ValueError("--format=stablehlo needs the flatbuffers package (jax.export serialization): "
                         "pip install 'vlm[stablehlo]' (or flatbuffers)") from None


def export_functions(loaded, folder, *, dtype: str = "float32") -> list[str]:
    """Writes D/embed_text.jax_exported and D/embed_video.jax_exported for `loaded` (a `vlm.load`
    result); the parameters they take have the stored `dtype`. Returns the file names."""
    from vlm import export as export_lib
    from vlm import loading

    _check_flatbuffers()
    config = loading.inference_config(loaded.config)
    with config.unlocked():
        config.model.attention_impl = "xla"  # portable: no cuDNN-only kernel in a multi-platform module
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    graphdef, abstract_params, _, _, _ = loading.abstract_model(config, mesh, loaded.rules)
    keys = {"/".join(str(p) for p in k): k for k in traverse_util.flatten_dict(abstract_params)}
    stored_dtype = export_lib.numpy_dtype(dtype)
    params_spec = {name: jax.ShapeDtypeStruct(leaf.shape, stored_dtype)
                   for name, leaf in export_lib.flatten(abstract_params).items()}
    (b,) = jax.export.symbolic_shape("b")
    T, R, _, C = loaded.clip_shape
    inputs = {"embed_text": jax.ShapeDtypeStruct((b, loaded.max_text_len), jnp.int32),
              "embed_video": jax.ShapeDtypeStruct((b, T, R, R, C), jnp.uint8)}
    written = []
    for method in FUNCTIONS:
        def fn(params, x, method=method):
            nested = traverse_util.unflatten_dict({keys[n]: v.astype(jnp.float32) for n, v in params.items()})
            return getattr(nnx.merge(graphdef, nested, {}), method)(x)  # [b, E]

        exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(params_spec, inputs[method])
        (folder / f"{method}{SUFFIX}").write_bytes(exported.serialize())
        written.append(f"{method}{SUFFIX}")
    return written


def card_section() -> list[str]:
    return ["## StableHLO (jax.export)", "",
            "`embed_text.jax_exported` and `embed_video.jax_exported` run with jax and numpy alone, "
            f"on {', '.join(PLATFORMS)}, for any batch size:", "", "```python", CALLER.replace("FOLDER", "."),
            "emb = np.asarray(embed_text.call(params, tokens))  # tokens int32 [b, L]: tokenizer.model ids, eos, 0-padded",
            "```", ""]
