"""Run logs: ``metrics.jsonl`` (one JSON object per line, the record every other log mirrors), the loss-curve PNG,
and the lab's own trackers chosen by ``train.loggers``: TensorBoard, Weights & Biases, MLflow.

Each tracker gets the same scalars as ``metrics.jsonl`` (named ``split/name``, e.g. ``val/fg_ari``) at the same
steps, and the mask picture of every validation (``val/masks``). Weights & Biases and MLflow are optional extras
(``pip install 'slotlab[wandb]'`` / ``'slotlab[mlflow]'``) and follow their own environment variables
(``WANDB_MODE=offline``, ``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``); without
``MLFLOW_TRACKING_URI`` MLflow writes a file store in ``RUN_DIR/mlruns`` (``mlflow ui --backend-store-uri
RUN_DIR/mlruns`` shows it). A resumed run goes on logging into the same
tracker run: the tracker run ids are kept in ``RUN_DIR/loggers.json``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from slotlab.config import flatten_config
from slotlab.errors import UserError
from slotlab.runs import read_metrics


class TensorBoardLogger:
    """Scalars and pictures into ``RUN_DIR/tb`` (TensorBoard is optional at run time: without it, nothing)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], ids: dict[str, str]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.writer = None
            return
        self.writer = SummaryWriter(str(run_dir / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def picture(self, step: int, name: str, picture: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.add_image(name, picture, step, dataformats="HWC")

    def close(self, status: str = "finished") -> None:
        if self.writer is not None:
            self.writer.close()


class WandbLogger:
    """A Weights & Biases run named after the run directory, its files in ``RUN_DIR/wandb``."""

    def __init__(self, run_dir: Path, config: dict[str, Any], ids: dict[str, str]):
        wandb = _optional("wandb", "wandb")
        self.wandb = wandb
        ids.setdefault("wandb", uuid.uuid4().hex[:8])
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "slotlab"), name=run_dir.name,
                              id=ids["wandb"], resume="allow", dir=str(run_dir), config=config)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def picture(self, step: int, name: str, picture: np.ndarray) -> None:
        self.run.log({name: self.wandb.Image(picture)}, step=step)

    def close(self, status: str = "finished") -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)  # non-zero: wandb marks the run failed


class MlflowLogger:
    """An MLflow run named after the run directory, with the resolved config as its parameters."""

    def __init__(self, run_dir: Path, config: dict[str, Any], ids: dict[str, str]):
        mlflow = _optional("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a file store in the run (MLflow 3 asks for that choice to be explicit)
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.entities = mlflow.entities
        if "mlflow" in ids:
            self.run_id = ids["mlflow"]
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "slotlab")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = ids["mlflow"] = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        params = [self.entities.Param(key, str(value)[:500]) for key, value in flatten_config(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(name, value, now, step) for name, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def picture(self, step: int, name: str, picture: np.ndarray) -> None:
        self.client.log_image(self.run_id, picture, key=name, step=step)

    def close(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, status=status.upper())  # FINISHED, FAILED or KILLED


LOGGER_CLASSES = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MlflowLogger}


class MetricsLog:
    """Appends ``{"step", "split", ...}`` records to ``RUN_DIR/metrics.jsonl`` and mirrors them to the trackers named
    in ``loggers`` (a comma list of :data:`LOGGER_CLASSES` names), which are opened by :meth:`open`."""

    def __init__(self, run_dir: Path, loggers: str = "tensorboard", config: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.names = [name.strip() for name in loggers.split(",") if name.strip()]
        self.config = config or {}
        self.trackers: list[Any] = []

    def open(self) -> None:
        """Start (or, for a resumed run, continue) the tracker runs."""
        ids_path = self.run_dir / "loggers.json"
        ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
        self.trackers = [LOGGER_CLASSES[name](self.run_dir, self.config, ids) for name in self.names]
        if ids:
            from slotlab.io import atomic_write_text

            atomic_write_text(ids_path, json.dumps(ids, indent=1) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites them exactly), and any torn or damaged line."""
        if not self.path.exists():
            return
        from slotlab.io import atomic_write_text

        keep = [record for record in read_metrics(self.path.parent) if record.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in keep))

    def log(self, step: int, split: str, values: dict[str, Any]) -> None:
        """Append one record, and send its numbers to every tracker as ``split/name``."""
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {f"{split}/{name}": float(value) for name, value in record.items()
                   if name not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool)}
        for tracker in self.trackers:
            tracker.scalars(step, scalars)

    def picture(self, step: int, name: str, picture: np.ndarray) -> None:
        """Send a uint8 ``[H, W, 3]`` picture to every tracker."""
        for tracker in self.trackers:
            tracker.picture(step, name, picture)

    def close(self, status: str = "finished") -> None:
        """End the tracker runs as ``finished``, ``failed`` (an error stopped training) or ``killed`` (a signal or
        Ctrl-C stopped it; the run can be resumed). MLflow records the three; wandb has no "killed", so a stopped run
        shows as failed there until it is resumed. Every tracker is closed even if one fails (the first error is
        raised after); closing twice does nothing."""
        if status not in ("finished", "failed", "killed"):
            raise ValueError(f"unknown run status {status!r}")
        trackers, self.trackers = self.trackers, []
        errors = []
        for tracker in trackers:
            try:
                tracker.close(status)
            except Exception as error:  # noqa: BLE001 - the others must still be closed
                errors.append(error)
        if errors:
            raise errors[0]


def _optional(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        message = f"train.loggers names {module}, which is not installed: pip install 'slotlab[{extra}]'"
        raise UserError(message) from None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value
