import types

import pytest

from vlm import metrics


@pytest.mark.parametrize(
    "kind, peak",
    [("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
     ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", None)],
)
def test_peak_flops_table(kind, peak):
    assert metrics.peak_flops_per_device(types.SimpleNamespace(device_kind=kind)) == peak


def test_step_timer_reports_mfu_when_peak_known(monkeypatch):
    monkeypatch.setattr(metrics, "peak_flops_per_device", lambda device=None: 100e12)
    timer = metrics.StepTimer(batch_size=64, flops_per_step=50e12, total_steps=100)
    timer.num_devices = 2
    timer._t, timer._step = 0.0, 10
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: 5.0)
    out, eta = timer.lap(20)  # 10 steps in 5 s
    assert out["train/steps_per_s"] == pytest.approx(2.0)
    assert out["train/examples_per_s"] == pytest.approx(128.0)
    assert out["train/mfu"] == pytest.approx(50e12 * 2 / 2 / 100e12)  # 0.5
    assert eta == pytest.approx(40.0)


def test_step_timer_reports_data_wait_and_peak_memory(monkeypatch):
    monkeypatch.setattr(metrics, "peak_memory_bytes", lambda: 3 * 2**30)
    now = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    timer = metrics.StepTimer(batch_size=8, flops_per_step=None, total_steps=100)
    timer.start(0)
    timer.data_wait(0.5)
    timer.data_wait(0.5)
    now[0] = 4.0
    out, _ = timer.lap(10)  # 1 s of 4 blocked on the input pipeline
    assert out["train/data_wait_frac"] == pytest.approx(0.25)
    assert out["train/peak_memory_gib"] == pytest.approx(3.0)
    now[0] = 6.0
    out, _ = timer.lap(20)  # the wait counter restarts at each lap
    assert out["train/data_wait_frac"] == 0.0


def test_peak_memory_is_absent_where_the_backend_keeps_no_stats():
    assert metrics.peak_memory_bytes() is None  # XLA:CPU: no memory_stats


def test_data_wait_warning_names_the_worker_count_to_try(capsys):
    import ml_collections

    from vlm import train

    data = ml_collections.ConfigDict({"worker_count": 2})
    assert not train._warn_data_wait(0.05, 100, data)
    assert capsys.readouterr().out == ""
    assert train._warn_data_wait(0.4, 100, data)
    line = capsys.readouterr().out.strip()
    assert "40% of the time" in line and "--config.data.worker_count=4 (now 2)" in line, line


def test_writer_writes_jsonl_and_console(tmp_path, capsys):
    import json

    w = metrics.MetricWriter(str(tmp_path), total_steps=10, enabled=True, tensorboard=False)
    w.write(5, {"train/loss": 1.5}, eta_s=65)
    w.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 5 and row["train/loss"] == 1.5
    assert "[     5/10  50.0%] loss=1.5 eta=1m05s" in capsys.readouterr().out


def test_flops_are_counted_for_any_attention_implementation():
    """A fused kernel (cuDNN) cannot be lowered on CPU; the count uses the XLA twin of the model."""
    import jax

    from tests.helpers import random_batch, small_config
    from vlm import flops, sharding, train

    config = small_config(data=1, fsdp=1, tensor=1)
    config.model.dtype = "bfloat16"
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in random_batch(config).items()}
    xla = flops.model_flops_per_step(train.build(config, mesh), batch)
    config.model.attention_impl = "cudnn"
    cudnn = flops.model_flops_per_step(train.build(config, mesh), batch)
    assert xla > 1e6 and cudnn == xla


def test_tensorboard_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch when it is installed (2.1 s of start-up); vlm's writer keeps it out, and torch
    still imports afterwards. A stand-in `torch` package on the path records whether it was imported."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os\nopen(os.environ['TORCH_MARKER'], 'a').write('imported\\n')\n")
    marker = tmp_path / "marker"
    code = (
        "import sys, os\n"
        "from vlm import metrics\n"
        f"w = metrics.MetricWriter({str(tmp_path / 'w')!r}, 10)\n"
        "w.write(1, {'train/loss': 2.5}); w.close()\n"
        "assert 'torch' not in sys.modules and not os.path.exists(os.environ['TORCH_MARKER'])\n"
        "import torch\n"  # the stand-in: importable again once the writer exists
        "print(open(os.environ['TORCH_MARKER']).read().strip())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.getcwd()]),
           "TORCH_MARKER": str(marker), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("imported")
    assert list((tmp_path / "w" / "tensorboard").glob("events.out.tfevents.*"))
