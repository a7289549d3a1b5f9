"""train.loggers: Weights & Biases (offline) and MLflow (a local file store) record what metrics.jsonl records."""

from __future__ import annotations

import json
import struct

import pytest

from cli_helpers import assert_one_error_line, run
from slotlab.config import apply_overrides, get_preset
from slotlab.errors import UserError
from slotlab.runs import read_metrics
from slotlab.train.loop import Trainer, TrainingError, train

SHORT = ["train.steps=4", "train.log_every=2", "train.val_every=2", "data.num_train=8", "data.num_val=4"]


def _jsonl_scalars(run_dir) -> dict[tuple[str, int], float]:
    return {(f"{r['split']}/{name}", r["step"]): float(value) for r in read_metrics(run_dir)
            for name, value in r.items() if name not in ("step", "split") and isinstance(value, (int, float))}


def test_mlflow_file_store_records_the_same_scalars_and_the_mask_pictures(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run_dir = tmp_path / "run"
    train(apply_overrides(get_preset("smoke"), [*SHORT, "train.loggers=tensorboard,mlflow"]), run_dir)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    run_id = json.loads((run_dir / "loggers.json").read_text())["mlflow"]
    expected = _jsonl_scalars(run_dir)
    logged = {(name, m.step): m.value for name in {key for key, _ in expected}
              for m in client.get_metric_history(run_id, name)}
    assert logged.keys() == expected.keys()
    assert all(logged[key] == pytest.approx(value, rel=1e-6) for key, value in expected.items())
    assert client.get_run(run_id).data.params["model.num_slots"] == str(get_preset("smoke").model.num_slots)
    assert client.get_run(run_id).info.status == "FINISHED"
    pictures = [artifact.path for artifact in client.list_artifacts(run_id, "images")]
    assert sum(path.startswith("images/val~masks+step+") and path.endswith(".png") for path in pictures) == 2


def test_wandb_offline_records_the_same_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train(apply_overrides(get_preset("smoke"), [*SHORT, "train.loggers=wandb"]), run_dir)

    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    logged, pictures = {}, 0
    for history in _wandb_history(files[0].read_bytes()):
        step = int(history.pop("_step"))
        pictures += history.get("val/masks/_type") == "image-file"
        logged.update({(name, step): value for name, value in history.items()
                       if not name.startswith(("_", "val/masks")) and isinstance(value, (int, float))})
    assert pictures == 2
    records = _wandb_records(files[0].read_bytes())
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0]
    expected = _jsonl_scalars(run_dir)
    assert logged.keys() == expected.keys()
    assert all(logged[key] == pytest.approx(value, rel=1e-6) for key, value in expected.items())


def _wandb_history(data: bytes) -> list[dict]:
    """The ``wandb.log`` records of an offline run's ``.wandb`` file."""
    return [{"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            for record in _wandb_records(data) if record.WhichOneof("record_type") == "history"]


def _wandb_records(data: bytes) -> list:
    """The protobuf ``Record`` messages of an offline run's ``.wandb`` file: a LevelDB-style log (a 7-byte file
    header, then 32 KiB blocks of chunks, each with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle /
    4 last)."""
    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B"
    block, index, chunk, records = 32768, 7, b"", []
    while index + 7 <= len(data):
        if block - index % block < 7:  # a block's tail too short for a header is padding
            index += block - index % block
            continue
        _, length, kind = struct.unpack("<IHB", data[index:index + 7])
        if length == 0 and kind == 0:
            break
        chunk += data[index + 7:index + 7 + length]
        index += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            records.append(record)
    return records


def test_a_run_stopped_by_an_error_ends_its_tracker_runs_as_failed(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = apply_overrides(get_preset("smoke"), [*SHORT, "train.loggers=mlflow,wandb"])
    trainer = Trainer(config, tmp_path / "run")
    original = trainer.loss_fn
    trainer.loss_fn = lambda batch, step: ((loss := original(batch, step))[0] * float("nan"), loss[1])
    with pytest.raises(TrainingError, match="non-finite"):
        trainer.fit()

    from mlflow.tracking import MlflowClient

    run_id = json.loads((tmp_path / "run/loggers.json").read_text())["mlflow"]
    assert MlflowClient(tracking_uri=(tmp_path / "run/mlruns").as_uri()).get_run(run_id).info.status == "FAILED"
    files = list((tmp_path / "run/wandb").glob("offline-run-*/run-*.wandb"))
    exits = [r.exit.exit_code for r in _wandb_records(files[0].read_bytes()) if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]


def test_tensorboard_gets_the_mask_pictures(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_dir = tmp_path / "run"
    train(apply_overrides(get_preset("smoke"), SHORT), run_dir)
    events = event_accumulator.EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("val/masks")] == [2, 4]
    assert [s.step for s in events.Scalars("val/fg_ari")] == [2, 4]


def test_an_unknown_logger_is_an_error_line(capsys, tmp_path):
    with pytest.raises(UserError, match="unknown logger 'neptune'"):
        apply_overrides(get_preset("smoke"), ["train.loggers=tensorboard,neptune"])
    code, _, err = run(capsys, "train", "--preset", "smoke", "--set", "train.loggers=neptun", "--out",
                       str(tmp_path / "r"))
    assert code == 2
    assert_one_error_line(err, "train.loggers", "neptun")
    assert not (tmp_path / "r").exists()


def test_every_tracker_is_closed_even_when_one_fails_to_close(tmp_path):
    from slotlab.train.logging import MetricsLog

    closed = []

    class Tracker:
        def __init__(self, name, fails):
            self.name, self.fails = name, fails

        def close(self, status):
            closed.append((self.name, status))
            if self.fails:
                raise RuntimeError(f"{self.name} is unreachable")

    log = MetricsLog(tmp_path)
    log.trackers = [Tracker("a", True), Tracker("b", False)]
    with pytest.raises(RuntimeError, match="a is unreachable"):
        log.close("killed")
    assert closed == [("a", "killed"), ("b", "killed")]
    log.close("failed")  # closing twice does nothing
    assert closed == [("a", "killed"), ("b", "killed")]
    with pytest.raises(ValueError, match="unknown run status"):
        log.close("crashed")


def test_a_run_stopped_by_a_signal_ends_its_mlflow_run_as_killed(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = apply_overrides(get_preset("smoke"), [*SHORT, "train.loggers=mlflow"])
    trainer = Trainer(config, tmp_path / "run")
    original = trainer.loss_fn

    def signalled(batch, step):
        if step == 1:
            trainer.stop_signal = "SIGTERM"  # what the SIGTERM handler sets
        return original(batch, step)

    trainer.loss_fn = signalled
    trainer.fit()  # a clean stop: checkpoint saved, resumable

    from mlflow.tracking import MlflowClient

    run_id = json.loads((tmp_path / "run/loggers.json").read_text())["mlflow"]
    assert MlflowClient(tracking_uri=(tmp_path / "run/mlruns").as_uri()).get_run(run_id).info.status == "KILLED"

