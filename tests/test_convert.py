"""`vlm convert`: tiny Hugging Face CLIP and SigLIP checkpoints (tests/fixtures/hf_tiny, made by its
make_fixtures.py with torch + transformers) converted to vlm exports give the features transformers
computed; static clips embed like their image; bad checkpoints are one-line errors; every model option's
default leaves today's dual encoder bit-identical (tests/fixtures/default_dual_encoder.npz, computed on main
before the options existed)."""

import json
import pathlib
import pickle
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from tests.helpers import run_vlm, small_config  # noqa: E402
from vlm import convert, sharding, tasks, train  # noqa: E402
from vlm.models import video_encoder  # noqa: E402
from vlm.tasks import contrastive  # noqa: E402
from vlm.errors import ConfigError  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
HF = FIXTURES / "hf_tiny"
CLIP_TEXTS = ("a photo of a cat", "Two  DOGS on the grass!!", "a red ball! " * 8, "photo")  # as make_fixtures.py
NUM_FRAMES, TUBELET_FRAMES = 4, 2


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(HF / "expected.npz"))


def _model(config, params):
    """The model `config` builds, holding `params` (built abstractly: no random init to run)."""
    model = nnx.eval_shape(lambda: tasks.get(config).build_model(nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(jnp.asarray, params))
    return model


def _features_fns(model):
    """Jitted (video_features(video), text_features(tokens)) of `model`."""
    graphdef, state = nnx.split(model)
    video = jax.jit(lambda state, v: nnx.merge(graphdef, state).video_features(v))
    text = jax.jit(lambda state, t: nnx.merge(graphdef, state).text_features(t))
    return (lambda v: video(state, v)), (lambda t: text(state, t))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """kind → (export folder, model with the converted weights, its config, (video_features, text_features) jitted)."""
    out = {}
    for kind in convert.KINDS:
        path = convert.convert(HF / kind, kind, tmp_path_factory.mktemp(kind), num_frames=NUM_FRAMES,
                               tubelet_frames=TUBELET_FRAMES)
        params, config = convert.load_export(path)
        model = _model(config, params)
        out[kind] = (path, model, config, _features_fns(model))
    return out


def _tokens(kind, export, expected):
    if kind == "clip":
        return convert.HFTokenizer(export / "tokenizer.json").encode(CLIP_TEXTS, 16)
    return expected["siglip/input_ids"]


@pytest.mark.parametrize("kind", convert.KINDS)
def test_converted_features_match_transformers(kind, exports, expected):
    """Images as one-frame videos (inflated tubelet of 2 frames), and the fixture's texts: HF's
    get_image_features / get_text_features and logits_per_image, within 1e-5."""
    path, model, config, (video_features, text_features) = exports[kind]
    video = jnp.asarray(expected["images"][:, None])  # [3, 1, 32, 32, 3] uint8
    image_features, text_features = video_features(video), text_features(jnp.asarray(_tokens(kind, path, expected)))
    np.testing.assert_allclose(image_features, expected[f"{kind}/image_features"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(text_features, expected[f"{kind}/text_features"], rtol=0, atol=1e-5)
    assert np.abs(expected[f"{kind}/image_features"]).max() > 1.0  # features of size, not near-zero noise
    v, t = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (np.asarray(image_features), np.asarray(text_features)))
    logits = np.exp(float(model.logit_scale[...])) * v @ t.T + float(model.logit_bias[...])
    np.testing.assert_allclose(logits, expected[f"{kind}/logits_per_image"], rtol=0, atol=1e-5)
    assert config.task.loss == {"clip": "softmax", "siglip": "sigmoid"}[kind]


def test_clip_tokenizer_json_matches_transformers(exports, expected):
    """HF's ids (padding="max_length", truncation=True) with its padding replaced by vlm's 0; the padding
    ids differ, the features do not (causal attention, pooled at the end-of-text token)."""
    path = exports["clip"][0]
    tokenizer = convert.HFTokenizer(path / "tokenizer.json")
    ids = tokenizer.encode(CLIP_TEXTS, 16)
    hf = np.where(expected["clip/hf_attention_mask"] == 1, expected["clip/hf_input_ids"], 0)
    np.testing.assert_array_equal(ids, hf)
    assert ids[2, -1] == tokenizer.vocab_size - 1  # truncation keeps <|endoftext|>, the highest id
    assert 0 in ids[1, :ids[1].argmax()]  # "!" is id 0 before the end: not masked as padding
    assert tokenizer.decode(ids[1]) == "two dogs on the grass !!"
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tokenizer)).encode(CLIP_TEXTS, 16), ids)  # Grain workers
    text_features = exports["clip"][3][1]
    np.testing.assert_allclose(text_features(jnp.asarray(expected["clip/hf_input_ids"])),
                               text_features(jnp.asarray(ids)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind, pool", [("clip", "cls"), ("siglip", "map"), ("siglip", "mean")])
def test_static_video_embeds_like_its_image(kind, pool, exports, expected):
    """4 equal frames (2 tubelets) vs the image (1 tubelet): zero temporal positions and the inflated patch
    kernel make the clip's sequence the image's repeated, which attention and mean / MAP pooling do not see;
    with "cls" every frame has its class token, so the same holds (their mean is the image's)."""
    _, model, config, (video_features, _) = exports[kind]
    if pool != config.model.video.pool:  # the converted SigLIP weights with mean pooling instead of its head
        config = config.copy_and_resolve_references()
        config.model.video.pool = pool
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        del params["video"]["head"]
        model = _model(config, params)
        video_features = _features_fns(model)[0]
    image = jnp.asarray(expected["images"][:, None])  # [3, 1, H, W, 3]
    clip = jnp.repeat(image, NUM_FRAMES, axis=1)  # [3, 4, H, W, 3]
    np.testing.assert_allclose(video_features(clip), video_features(image), rtol=0, atol=2e-6)
    assert model.video.temporal_pos.table[...].shape[0] == NUM_FRAMES // TUBELET_FRAMES == 2  # two tubelets encoded


def _edited_copy(tmp_path, kind, edit) -> pathlib.Path:
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / kind
    shutil.copytree(HF / kind, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("vision_model.encoder.layers.1.mlp.fc2.bias"),
     "missing tensor vision_model.encoder.layers.1.mlp.fc2.bias"),
    (lambda t: t.update({"text_model.extra.weight": np.zeros(3, np.float16)}),
     "unexpected tensor text_model.extra.weight; this converter does not know where it goes"),
    (lambda t: t.update({"text_model.embeddings.position_ids": np.arange(16)}), None),  # a buffer: ignored
])
def test_missing_or_unexpected_tensors_are_named(tmp_path, edit, message):
    folder = _edited_copy(tmp_path, "clip", edit)
    if message is None:
        convert.convert(folder, "clip", tmp_path / "out")
        return
    with pytest.raises(convert.ConvertError, match=re.escape(message)) as e:
        convert.convert(folder, "clip", tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_bad_configs_are_one_line_errors(tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(HF / "clip", folder)
    hf = json.loads((folder / "config.json").read_text())
    hf["text_config"]["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(convert.ConvertError, match=r"text_config.hidden_act='relu' is not supported"):
        convert.convert(folder, "clip", tmp_path / "out")
    with pytest.raises(convert.ConvertError, match=r"--kind=siglip but .* has model_type 'clip'; use --kind=clip"):
        convert.convert(HF / "clip", "siglip", tmp_path / "out")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(convert.ConvertError, match=r"bin has no model.safetensors"):
        convert.convert(tmp_path / "bin", "clip", tmp_path / "out")


def test_keys_a_config_json_leaves_out_get_transformers_defaults(tmp_path, exports):
    """transformers writes only the values that differ from its defaults: SigLIP's GELU and LayerNorm eps."""
    folder = tmp_path / "siglip"
    shutil.copytree(HF / "siglip", folder)
    hf = json.loads((folder / "config.json").read_text())
    for tower in ("text_config", "vision_config"):
        for key in ("hidden_act", "layer_norm_eps"):
            hf[tower].pop(key)
    (folder / "config.json").write_text(json.dumps(hf))
    _, config = convert.load_export(convert.convert(folder, "siglip", tmp_path / "out", num_frames=NUM_FRAMES))
    assert config.to_dict() == exports["siglip"][2].to_dict()
    assert (config.model.video.activation, config.model.video.norm_eps) == ("gelu_tanh", 1e-6)


@pytest.mark.parametrize("key, value, message", [
    ("video.pool", "max", "config.model.video.pool='max' is unknown; choose one of mean, cls, map"),
    ("text.activation", "relu", "config.model.text.activation='relu' is unknown"),
    ("text.causal", True, "config.model.text.causal=True needs config.model.text.pool='eot' or 'last'"),
    ("video.projection", "none", "config.model.video.projection='none' needs config.model.video.width=32 to equal "
                                 "config.model.embed_dim=16"),
    ("video.rgb_std", (0.5, 0.0, 0.5), "config.model.video.rgb_std=(0.5, 0.0, 0.5) needs 3 per-channel values"),
])
def test_new_model_keys_are_checked(key, value, message):
    config = small_config()
    config.model.embed_dim = 16
    tower, name = key.split(".")
    config.model[tower][name] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        tasks.get(config)


def test_default_options_keep_the_dual_encoder_bit_identical(tmp_path):
    """Parameters (paths and values) and jitted outputs equal those of the code before the options, bit for bit.

    The script that made the reference runs again on today's code, in a process with XLA's default
    optimisation (the reference was compiled with it; the test process compiles without, tests/conftest.py)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "today.npz"
    env = dict(os.environ, PYTHONPATH=str(FIXTURES.parent.parent), XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(FIXTURES / "make_default_reference.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference, today = np.load(FIXTURES / "default_dual_encoder.npz"), np.load(out)
    assert sorted(today.files) == sorted(reference.files)
    for name in reference.files:
        np.testing.assert_array_equal(today[name], reference[name], err_msg=name)


def test_a_config_json_from_before_the_options_builds_the_same_model():
    """W/config.json of an older run lacks the new keys: its model is the default one (same parameter tree)."""
    from vlm import config as config_lib

    config = small_config()
    values = json.loads(config_lib.to_json(config))
    for tower, names in (("video", video_encoder.VIDEO_OPTIONS + ("projection",)),
                         ("text", contrastive.TEXT_OPTIONS + ("projection",))):
        for name in names:
            del values["model"][tower][name]
    old = config_lib.from_json(json.dumps(values))
    assert "pool" not in old.model.video
    shapes = lambda c: jax.tree.map(lambda a: a.shape, convert.abstract_params(c))
    assert shapes(old) == shapes(config)


@pytest.mark.parametrize("kind", convert.KINDS)
def test_export_fits_a_run_built_from_its_config(kind, exports):
    """What init_from checks before loading: the run that the export's config.json builds (train.build,
    abstract) has exactly the export's parameter paths and shapes, so every tensor loads and nothing keeps
    its random init."""
    params, config = convert.load_export(exports[kind][0])
    setup = train.build(config, sharding.create_mesh(config.mesh))
    run = {"/".join(map(str, k)): v.shape for k, v in traverse_util.flatten_dict(setup.abstract_state["params"]).items()}
    export = {"/".join(map(str, k)): v.shape for k, v in traverse_util.flatten_dict(params).items()}
    assert run == export and len(run) == {"clip": 81, "siglip": 93}[kind]
    # ... and init_from plans exactly that from the export folder: every tensor loads, none keeps its init.
    from vlm import init_from

    with config.unlocked():
        config.init_from.workdir = str(exports[kind][0])
    plan = init_from.plan(config.init_from, setup.abstract_state["params"])
    assert len(plan.renames) == len(run) and plan.kept_init == [] and plan.left_out == []


def test_load_export_names_a_tensor_the_model_lacks(exports, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "export"
    shutil.copytree(exports["clip"][0], path)
    tensors = load_file(path / "model.safetensors")
    tensors["video/head/probe"] = np.zeros((1, 32), np.float32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(convert.ConvertError, match="tensor video/head/probe is not a parameter of the model"):
        convert.load_export(path)


def test_cli_convert(tmp_path):
    proc = run_vlm("convert", f"--from={HF}/siglip", "--kind=siglip", f"--output={tmp_path}/d")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote {tmp_path}/d" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    from safetensors import safe_open

    with safe_open(tmp_path / "d" / "model.safetensors", framework="numpy") as f:
        assert {k: f.metadata()[k] for k in ("format", "format_version", "weights")} == dict(
            format="vlm", format_version="1", weights="converted")
    proc = run_vlm("convert", f"--from={HF}/siglip", "--kind=clip", f"--output={tmp_path}/e")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --kind=clip but {HF}/siglip/config.json has model_type 'siglip'; use --kind=siglip")
