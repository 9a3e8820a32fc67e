"""Tracking sinks: MLflow (local file store) and W&B (offline) get the rows metrics.jsonl gets; a
resumed run continues the same tracker run."""

import glob
import json
import struct

import pytest

from tests.helpers import read_metrics, small_config
from vlm import metrics, tracking
from vlm.errors import ConfigError

ROWS = [(1, {"train/loss": 2.5, "train/lr": 1e-3}), (2, {"train/loss": 2.25, "train/lr": 1e-3}),
        (2, {"eval/t2v_r1": 0.125, "eval/v2t_r1": 0.25}), (3, {"train/loss": 2.0, "train/lr": 9e-4})]
RESUMED = [(4, {"train/loss": 1.75, "train/lr": 8e-4}), (4, {"eval/t2v_r1": 0.375, "eval/v2t_r1": 0.5})]


def config_with(*writers):
    c = small_config()
    c.metrics.writers = writers
    return c


def write_rows(workdir, config, rows):
    writer = metrics.MetricWriter(str(workdir), 10, enabled=True, config=config)
    for step, values in rows:
        writer.write(step, values)
    writer.close()


def series(rows):
    """{metric: [(step, value), ...]} of (step, {metric: value}) rows."""
    out = {}
    for step, values in rows:
        for key, value in values.items():
            out.setdefault(key, []).append((step, value))
    return out


def jsonl_series(workdir):
    return series((row["step"], {k: v for k, v in row.items() if k not in ("step", "time")})
                  for row in read_metrics(workdir))


def test_mlflow_records_the_metrics_jsonl_series_and_resumes_its_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'vlm[tracking]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    workdir, config = tmp_path / "w", config_with("mlflow")
    write_rows(workdir, config, ROWS)
    run_id = (workdir / "mlflow_run_id").read_text().strip()
    write_rows(workdir, config, RESUMED)  # a resumed run: same workdir, same tracker run
    assert (workdir / "mlflow_run_id").read_text().strip() == run_id
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "w"
    assert run.data.params["optim.lr"] == str(config.optim.lr) and run.data.params["model.video.tubelet"] == "[2, 8, 8]"
    expected = jsonl_series(workdir)
    assert expected == series(ROWS + RESUMED)
    got = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in expected}
    assert got == {key: sorted(values) for key, values in expected.items()}
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert not (workdir / "tensorboard").exists()  # only the writers named


def wandb_records(path):
    """The records of an offline W&B run file (LevelDB-style log: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # block trailer
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_records_the_metrics_jsonl_series_and_resumes_its_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'vlm[tracking]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    workdir, config = tmp_path / "w", config_with("tensorboard", "wandb")
    write_rows(workdir, config, ROWS)
    wandb.teardown()  # waits for W&B's service to finish writing the run file (a process exit does too)
    run_id = (workdir / "wandb_run_id").read_text().strip()
    write_rows(workdir, config, RESUMED)
    wandb.teardown()
    assert (workdir / "wandb_run_id").read_text().strip() == run_id
    files = sorted(glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)
    rows, run_ids = [], set()
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.add(record.run.run_id)
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                rows.append((items["_step"], {k: v for k, v in items.items() if not k.startswith("_")}))
    assert run_ids == {run_id}
    assert {k: sorted(v) for k, v in series(rows).items()} == {k: sorted(v) for k, v in jsonl_series(workdir).items()}
    assert (workdir / "tensorboard").exists()


def test_unknown_or_missing_writers_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown writer.*'tensorbord'.*tensorboard, wandb, mlflow"):
        metrics.MetricWriter(str(tmp_path), 10, enabled=True, config=config_with("tensorbord"))
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"wandb package is not installed; pip install 'vlm\[tracking\]'"):
        metrics.MetricWriter(str(tmp_path), 10, enabled=True, config=config_with("wandb"))
    assert metrics.writer_names(None) == ("tensorboard",)  # a config.json from before config.metrics


def test_flat_config_names_every_leaf():
    flat = tracking.flat_config(small_config())
    assert flat["optim.lr"] == 1e-3 and flat["data.name"] == "synthetic" and flat["metrics.writers"] == '["tensorboard"]'
    assert flat["model.video.tubelet"] == "[2, 8, 8]" and flat["init_from.mapping"] == "[]"
