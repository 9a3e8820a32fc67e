"""benchmarks/throughput.py on a DiT config: random latents stand in for the latent cache (the GPU MFU table's
DiT rows, benchmarks/README.md)."""

import importlib.util
import json
import math
import sys

import pytest

SMALL_DIT = ("batch_size=8", "model.dit.width=32", "model.dit.depth=1", "model.dit.num_heads=2", "model.dit.mlp_dim=64",
             "model.text.width=32", "model.text.depth=1", "model.text.num_heads=2", "model.text.mlp_dim=64")


@pytest.fixture
def throughput(monkeypatch):
    spec = importlib.util.spec_from_file_location("throughput_bench", "benchmarks/throughput.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "throughput_bench", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    from input_pipeline import latents

    monkeypatch.setattr(latents, "latent_info", latents.latent_info)  # the row replaces it: undone after the test
    return module


def test_a_dit_row_trains_on_random_latents_of_the_given_shape(throughput, tmp_path):
    out = tmp_path / "t.md"
    argv = ["--config=configs/dit_video.py:tiny", "--latents=2,4,4,4", "--steps=1", "--warmup=0", f"--out={out}",
            *(f"--set={s}" for s in SMALL_DIT), "--sweep=dit:", "--sweep=no_latents:latents=", "--sweep=bad:latents=(2,4)"]
    assert throughput.main(argv) == 0
    dit, no_latents, bad = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert "error" not in dit, dit
    assert dit["latents"] == "2x4x4x4" and dit["attention"] == "xla" and dit["batch"] == 8
    assert math.isfinite(dit["loss"]) and dit["step_s"] > 0 and dit["flops_per_step"] > 0
    assert "--latents=9,32,32,16" in no_latents["error"]
    assert "latents='(2,4)' must be four positive integers" in bad["error"]
    assert "| dit | configs/dit_video.py:tiny | 8x1x1x1 | 8 | float32 | none | xla |" in out.read_text()
