"""vlm export: safetensors round trip (bit-identical, without Orbax, sharded reads), bf16, golden
names, init_from an export, and StableHLO functions that run without vlm."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import vlm
from tests.helpers import FAST_COMPILE_FLAG, load_checkpoint_params, run_vlm
from vlm import export, init_from, loading, stablehlo

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "export_keys_small_dual_encoder.txt")
CAPTIONS = ["a red circle moves left", "a small blue square moves up", "two green triangles"]


@pytest.fixture(scope="module")
def exports(ema_run, tmp_path_factory):
    """(workdir, float32 export with StableHLO functions, bfloat16 export written by the command line)."""
    workdir, _ = ema_run
    tmp = tmp_path_factory.mktemp("exports")
    try:
        import flatbuffers  # noqa: F401
        kind = "stablehlo"
    except ImportError:  # the StableHLO test skips; the safetensors part is tested all the same
        kind = "safetensors"
    f32 = export.export(str(workdir), str(tmp / "f32"), format=kind)
    proc = run_vlm("export", f"--workdir={workdir}", f"--output={tmp / 'bf16'}", "--dtype=bfloat16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model.safetensors" in proc.stdout
    return workdir, str(f32), str(tmp / "bf16")


@pytest.fixture(scope="module")
def from_workdir(exports):
    return vlm.load(str(exports[0]))


@pytest.fixture(scope="module")
def clips():
    return np.random.default_rng(0).integers(0, 256, (3, 4, 16, 16, 3), dtype=np.uint8)


def test_export_folder_holds_the_ema_params_bit_for_bit(exports):
    workdir, f32, _ = exports
    assert sorted(os.listdir(f32)) == sorted(["README.md", "config.json", "model.safetensors", "tokenizer.model"] + (
        ["embed_text.jax_exported", "embed_video.jax_exported"] if os.path.exists(f"{f32}/embed_text.jax_exported")
        else []))
    stored = load_file(os.path.join(f32, "model.safetensors"))
    ema = export.flatten(load_checkpoint_params(workdir, 10, "ema"))
    assert sorted(stored) == sorted(ema)
    for name in ema:
        assert stored[name].dtype == np.float32
        np.testing.assert_array_equal(stored[name], ema[name], err_msg=name)
    meta = export.read_metadata(f32)
    assert (meta["format"], meta["step"], meta["weights"], meta["dtype"]) == ("vlm", "10", "ema", "float32")
    assert meta["vlm_version"] and meta["source"] == str(workdir)
    assert open(os.path.join(f32, "tokenizer.model"), "rb").read() == (workdir / "tokenizer.model").read_bytes()
    card = open(os.path.join(f32, "README.md")).read()
    assert "eval/t2v_r1" in card and "vlm.load(" in card


def test_golden_parameter_names_and_shapes(exports):
    """A renamed or reshaped parameter changes the export format: update the golden file on purpose
    (VLM_UPDATE_GOLDEN=1) and say so in the change."""
    lines = [f"{name} {list(shape)}" for name, shape in sorted(export.read_shapes(exports[1]).items())]
    if os.environ.get("VLM_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        open(GOLDEN, "w").write("\n".join(lines) + "\n")
    assert lines == open(GOLDEN).read().splitlines()


def test_export_embeds_bit_for_bit_like_the_workdir(exports, from_workdir, clips):
    exported = vlm.load(exports[1])
    assert exported.step == 10
    np.testing.assert_array_equal(exported.embed_text(CAPTIONS), from_workdir.embed_text(CAPTIONS))
    np.testing.assert_array_equal(exported.embed_video(clips), from_workdir.embed_video(clips))


def test_bfloat16_export_is_close(exports, from_workdir, clips):
    with safe_open(os.path.join(exports[2], "model.safetensors"), "numpy") as f:
        assert f.get_slice("text/embed/embedding").get_dtype() == "BF16"
    half = vlm.load(exports[2])
    assert half.model.text.embed.embedding[...].dtype == np.float32  # upcast on load
    for fn in ("embed_text", "embed_video"):
        data = CAPTIONS if fn == "embed_text" else clips
        a, b = getattr(half, fn)(data), getattr(from_workdir, fn)(data)
        assert 0 < np.abs(a - b).max() < 2e-2, fn
    compute = vlm.load(exports[1], dtype="bfloat16")  # float32 weights, bfloat16 compute
    assert compute.config.model.dtype == "bfloat16"
    assert 0 < np.abs(compute.embed_text(CAPTIONS) - from_workdir.embed_text(CAPTIONS)).max() < 3e-2


def test_export_loads_without_orbax(exports, from_workdir):
    code = ("import sys, json; sys.modules['orbax'] = None; sys.modules['orbax.checkpoint'] = None\n"
            "import vlm\n"
            f"loaded = vlm.load({exports[1]!r})\n"
            f"print(json.dumps(loaded.embed_text({CAPTIONS!r}).tolist()))\n"
            "assert not [m for m, v in sys.modules.items() if m.startswith('orbax') and v is not None]\n")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE_FLAG}",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.array(json.loads(proc.stdout.strip().splitlines()[-1]), np.float32)
    np.testing.assert_array_equal(got, from_workdir.embed_text(CAPTIONS))


def test_sharded_load_reads_only_each_devices_slices(exports, monkeypatch):
    reads = []
    real_open = safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def get_slice(self, name):
            stored = self.f.get_slice(name)

            class Slice:
                def get_shape(self):
                    return stored.get_shape()

                def __getitem__(self, index):
                    block = stored[index]
                    reads.append((name, np.shape(block)))
                    return block

            return Slice()

    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    sharded = vlm.load(exports[1], devices=jax.devices(), mesh=dict(data=1, fsdp=8))
    monkeypatch.undo()
    single = vlm.load(exports[1])
    table = sharded.model.text.embed.embedding[...]  # [vocab, embed]: embed over fsdp
    assert len(table.sharding.device_set) == 8 and table.addressable_shards[0].data.shape == (128, 4)
    embedding_reads = [shape for name, shape in reads if name == "text/embed/embedding"]
    assert embedding_reads == [(128, 4)] * 8  # each device its own slice, never the whole [128, 32]
    for a, b in zip(jax.tree.leaves(nnx_state(sharded)), jax.tree.leaves(nnx_state(single))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(sharded.embed_text(CAPTIONS), single.embed_text(CAPTIONS), rtol=0, atol=2e-6)


def nnx_state(loaded):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))


def test_init_from_an_export_folder(exports, from_workdir):
    """config.init_from.workdir may name an export: the plan reads its header, apply its tensors."""
    config = from_workdir.config
    mesh, rules = from_workdir.mesh, from_workdir.rules
    _, abstract, _, shardings, _ = loading.abstract_model(config, mesh, rules)
    init = ml_collections.ConfigDict(dict(workdir=exports[1], step=-1, mapping=(), strict=True, use_ema=True))
    plan = init_from.plan(init, abstract)
    assert plan.item == "export" and plan.step == 10 and not plan.kept_init
    zeros = jax.tree.map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, shardings)
    params = init_from.apply(plan, zeros, shardings)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx_state(from_workdir))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stablehlo_functions_run_without_vlm(exports, from_workdir, clips, tmp_path):
    pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers (pip install 'vlm[stablehlo]')")
    tokens = from_workdir.tokenize(CAPTIONS)
    np.save(tmp_path / "tokens.npy", tokens)
    np.save(tmp_path / "clips.npy", clips)
    code = ("import sys\n"
            "for blocked in ('vlm', 'input_pipeline', 'flax', 'orbax', 'safetensors', 'sentencepiece'):\n"
            "    sys.modules[blocked] = None\n"
            + stablehlo.CALLER.replace("FOLDER", exports[1]) +
            "tokens, clips = np.load('tokens.npy'), np.load('clips.npy')\n"
            "for n in (1, 3):\n"
            "    np.save(f'text_{n}.npy', np.asarray(embed_text.call(params, tokens[:n])))\n"
            "    np.save(f'video_{n}.npy', np.asarray(embed_video.call(params, clips[:n])))\n"
            "print(embed_text.platforms)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "('cpu', 'cuda', 'tpu')" in proc.stdout
    assert "jax.export.deserialize" in open(os.path.join(exports[1], "README.md")).read()  # the card says how
    model = from_workdir.model
    for n in (1, 3):
        np.testing.assert_allclose(np.load(tmp_path / f"text_{n}.npy"), model.embed_text(tokens[:n]), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.load(tmp_path / f"video_{n}.npy"), model.embed_video(clips[:n]), rtol=0,
                                   atol=1e-6)
