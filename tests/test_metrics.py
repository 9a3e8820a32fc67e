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
