"""Experiment trackers as metric sinks: Weights & Biases and MLflow (`config.metrics.writers`).

    c.metrics = dict(writers=("tensorboard", "wandb", "mlflow"))

Each tracker receives exactly the rows `W/metrics.jsonl` gets (one `write(step, metrics)` per
logged step or evaluation), on process 0 only. The package is imported when the run starts, not
before; a missing one is a one-line error (`pip install 'vlm[tracking]'`). The run's id is kept
in the workdir (`W/wandb_run_id`, `W/mlflow_run_id`), so a resumed run continues the same tracker
run instead of starting a new one; the flat config ("optim.lr": 0.001, ...) is logged as its
parameters when the tracker run is created.

Where the runs go is each tool's own setting, from the environment:
  wandb   WANDB_PROJECT (default "vlm"), WANDB_ENTITY, WANDB_MODE=offline (no network), WANDB_DIR
          (default: the workdir when it is local)
  mlflow  MLFLOW_TRACKING_URI (e.g. a server, or file:/path/mlruns with MLFLOW_ALLOW_FILE_STORE=true),
          MLFLOW_EXPERIMENT_NAME (default "vlm")
The tracker run is named after the workdir's last folder.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping

from etils import epath

from vlm.errors import ConfigError

TRACKERS = ("wandb", "mlflow")
MLFLOW_BATCH = 100  # MLflow's limit of params (and metrics) per log_batch call
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on a parameter value


def flat_config(config) -> dict[str, str | int | float | bool]:
    """{"optim.lr": 0.001, "model.video.tubelet": "[2, 8, 8]", ...}: scalars as they are, the rest as JSON."""
    out = {}

    def visit(prefix: str, value) -> None:
        if isinstance(value, Mapping) and value:
            for key in sorted(value):
                visit(f"{prefix}.{key}" if prefix else str(key), value[key])
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value, default=str)

    visit("", config.to_dict() if hasattr(config, "to_dict") else dict(config))
    return out


def _import(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ConfigError(f"config.metrics.writers has {name!r} but the {name} package is not installed; "
                          f"pip install 'vlm[tracking]' (or {name}), or remove {name!r} from config.metrics.writers"
                          ) from None


def _run_name(workdir: str) -> str:
    return os.path.basename(os.fspath(workdir).rstrip("/")) or "vlm"


class _RunIdFile:
    """W/<tracker>_run_id: the tracker run this workdir logs to."""

    def __init__(self, workdir: str, tracker: str):
        self.path = epath.Path(workdir) / f"{tracker}_run_id"

    def read(self) -> str | None:
        if not self.path.exists():
            return None
        return self.path.read_text().strip() or None

    def write(self, run_id: str) -> None:
        self.path.write_text(run_id + "\n")


class WandbWriter:
    """Logs to a Weights & Biases run (resumed by id when the workdir already has one)."""

    def __init__(self, workdir: str, config):
        wandb = _import("wandb")
        ids = _RunIdFile(workdir, "wandb")
        run_id = ids.read() or uuid.uuid4().hex[:12]  # W&B run ids: lower-case letters and digits
        local = "://" not in os.fspath(workdir)
        self.run = wandb.init(
            id=run_id, resume="allow", name=_run_name(workdir), config=flat_config(config),
            project=os.environ.get("WANDB_PROJECT") or "vlm",
            dir=os.environ.get("WANDB_DIR") or (os.fspath(workdir) if local else None),
        )
        self.run_id = run_id
        ids.write(run_id)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=int(step))

    def close(self) -> None:
        self.run.finish()


class MlflowWriter:
    """Logs to an MLflow run (resumed by id when the workdir already has one)."""

    def __init__(self, workdir: str, config):
        _import("mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, or MLflow's default
        ids = _RunIdFile(workdir, "mlflow")
        self.run_id = ids.read()
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "vlm"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=_run_name(workdir)).info.run_id
            params = [Param(k, str(v)[:MLFLOW_PARAM_CHARS]) for k, v in flat_config(config).items()]
            for i in range(0, len(params), MLFLOW_BATCH):
                self.client.log_batch(self.run_id, params=params[i:i + MLFLOW_BATCH])
            ids.write(self.run_id)
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(rows), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=rows[i:i + MLFLOW_BATCH])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def create(name: str, workdir: str, config):
    """The tracker writer `name` ("wandb" or "mlflow") for the run in `workdir`."""
    writers = {"wandb": WandbWriter, "mlflow": MlflowWriter}
    if name not in writers:
        raise ConfigError(f"unknown tracker {name!r}; choose one of {', '.join(TRACKERS)}")
    return writers[name](workdir, config)
