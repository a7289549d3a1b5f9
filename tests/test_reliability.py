"""What survives what: diverged steps, concurrent writers, damaged files, full disks, bad numbers (issue 15).

Each test drives ``slotlab`` as a user would (in-process through :func:`slotlab.cli.main`, or as real processes
where concurrency or signals matter) and checks the outcome: one ``error:`` line and exit code 2, no traceback,
nothing lost.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_one_error_line, run, strip_progress
from slotlab import io as checkpoint_module
from slotlab.config import apply_overrides, get_preset
from slotlab.io import load_checkpoint
from slotlab.train.loop import Trainer, TrainingError, train

SMOKE = ["--preset", "smoke", "--set", "train.log_every=1", "--set", "train.ckpt_every=1", "--set", "train.val_every=2"]


def _train(capsys, out: Path, *extra: str) -> tuple[int, str, str]:
    return run(capsys, "train", *SMOKE, "--out", str(out), *extra)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _process(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with log.open("w") as handle:
        return subprocess.Popen([sys.executable, "-m", "slotlab", *args], stdout=handle, stderr=subprocess.STDOUT,
                                env=env)


# ------------------------------------------------------------------------------------------------ divergence
def test_a_diverged_run_stops_at_the_bad_step_and_writes_nothing(tmp_path, capsys):
    code, _, err = _train(capsys, tmp_path / "nan", "--set", "train.lr=1e10", "--set", "train.steps=1000",
                          "--set", "train.ckpt_every=500", "--set", "train.log_every=500", "--set",
                          "train.val_every=500")
    assert code == 2
    assert_one_error_line(strip_progress(err), "non-finite at step", "No checkpoint had been written yet")
    assert not (tmp_path / "nan").exists()  # a start that failed before its first checkpoint leaves nothing


def test_sigterm_after_a_non_finite_step_keeps_the_good_checkpoint(tmp_path):
    """The GPU path checks finiteness only at log and checkpoint steps; a signal in between must not save NaNs."""
    config = apply_overrides(get_preset("smoke"), ["train.steps=50", "train.log_every=100", "train.ckpt_every=3",
                                                   "train.val_every=100"])
    reference = Trainer(config, tmp_path / "reference")
    reference.config = apply_overrides(config, ["train.steps=3"])
    reference.fit()
    trainer = Trainer(config, tmp_path / "run")
    trainer.check_every_step = False  # as on a GPU
    original = trainer.loss_fn

    def diverging(batch, step):
        loss, logs = original(batch, step)
        if step == 4:  # the 5th step: the SIGTERM arrives during the 6th
            trainer.stop_signal = "SIGTERM"
        return (loss * float("nan") if step >= 3 else loss), logs

    trainer.loss_fn = diverging
    with pytest.raises(TrainingError, match="at step 4.*last.pt \\(step 3\\), is kept"):
        trainer.fit()
    kept = _weights(tmp_path / "run/checkpoints/last.pt")
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] == 3
    for name, value in _weights(tmp_path / "reference/checkpoints/last.pt").items():
        assert torch.isfinite(kept[name]).all() if kept[name].is_floating_point() else True
        torch.testing.assert_close(kept[name], value, rtol=0, atol=0)


def test_weights_that_turn_non_finite_with_a_finite_loss_are_never_saved(tmp_path):
    config = apply_overrides(get_preset("smoke"), ["train.steps=4", "train.grad_clip=0"])
    trainer = Trainer(config, tmp_path / "run")
    trainer.fit()
    before = (tmp_path / "run/checkpoints/last.pt").read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters()).fill_(float("inf"))
    with pytest.raises(TrainingError, match="weights became non-finite"):
        trainer.save("last")
    assert (tmp_path / "run/checkpoints/last.pt").read_bytes() == before


def test_eval_refuses_non_finite_weights(tmp_path, capsys):
    train(apply_overrides(get_preset("smoke"), []), tmp_path / "run")
    path = tmp_path / "run/checkpoints/best.pt"
    state = load_checkpoint(path)
    first = next(name for name, value in state["model"].items() if value.is_floating_point())
    state["model"][first] = torch.full_like(state["model"][first], float("nan"))
    checkpoint_module.save_checkpoint(path, state)
    code, _, err = run(capsys, "eval", str(tmp_path / "run"))
    assert code == 2
    assert_one_error_line(strip_progress(err), "non-finite weights", first)
    assert not (tmp_path / "run/eval/metrics.json").exists()


# ------------------------------------------------------------------------------------------------ one writer per run
def test_two_concurrent_trainings_into_one_folder_run_exactly_once(tmp_path):
    args = ["train", *SMOKE, "--set", "train.steps=60", "--out", str(tmp_path / "run")]
    first, second = (_process(args, tmp_path / f"{i}.log") for i in range(2))
    codes = sorted([first.wait(timeout=120), second.wait(timeout=120)])
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(2)]
    assert codes == [0, 2], logs
    refused = next(log for log in logs if "error:" in log)
    assert "in use by process" in refused or "already holds a run" in refused
    assert "Traceback" not in "".join(logs)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == list(range(1, 61))  # one run's records, in order, each once


# Another process takes the folder and its lock, writes what a start writes, and holds the lock until stdin closes.
_HOLD_A_NEW_RUN = """
import os, sys, pathlib
from filelock import FileLock
run_dir = pathlib.Path(sys.argv[1])
run_dir.mkdir(parents=True)
lock = FileLock(run_dir / ".lock")
lock.acquire(timeout=0)
(run_dir / ".lock").write_text(f"{os.getpid()}\\n")
(run_dir / "config.json").write_text("{}")
print("held", flush=True)
sys.stdin.read()
"""


def test_a_start_refused_by_the_lock_leaves_the_winners_folder_alone(tmp_path, capsys, monkeypatch):
    """Both starts saw no folder; the one refused by the lock must not remove the folder the other one is filling."""
    from slotlab.train import loop

    run_dir, real_own, holders = tmp_path / "run", loop._own, []

    def own_after_another_start_took_the_folder(path):
        holder = subprocess.Popen([sys.executable, "-c", _HOLD_A_NEW_RUN, str(path)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        holders.append(holder)
        assert holder.stdout.readline().strip() == "held"
        return real_own(path)

    monkeypatch.setattr(loop, "_own", own_after_another_start_took_the_folder)
    try:
        code, _, err = _train(capsys, run_dir)
    finally:
        for holder in holders:
            holder.stdin.close()
            holder.wait(timeout=30)
    assert code == 2
    assert_one_error_line(err, "in use by process", str(holders[0].pid))
    assert (run_dir / "config.json").read_text() == "{}"  # the winner's start is untouched


def test_a_run_in_use_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    _train(capsys, tmp_path / "run")
    resumed = _process(["train", "--resume", str(tmp_path / "run"), "--set", "train.steps=100000"],
                       tmp_path / "resume.log")
    try:
        deadline = time.time() + 60
        while load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] < 4 and time.time() < deadline:
            time.sleep(0.1)
        code, _, err = run(capsys, "train", "--resume", str(tmp_path / "run"))
        assert code == 2
        assert_one_error_line(err, "in use by process", str(resumed.pid))
    finally:
        resumed.kill()
        resumed.wait()
    # SIGKILL left the lock file behind, but the system released the lock with the process: resuming takes it over.
    assert (tmp_path / "run/.lock").exists()
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "run"), "--set", "train.steps=1")
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ damaged files
@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"PK\x03\x04" + os.urandom(100)])
@pytest.mark.parametrize("name", ["last", "best"])
def test_damaged_checkpoints_are_error_lines(tmp_path, capsys, content, name):
    _train(capsys, tmp_path / "run")
    (tmp_path / f"run/checkpoints/{name}.pt").write_bytes(content)
    command = ["eval", str(tmp_path / "run"), "--checkpoint", name]
    if name == "last":
        command = ["train", "--resume", str(tmp_path / "run")]
    code, _, err = run(capsys, *command)
    assert code == 2
    assert_one_error_line(err, "corrupt checkpoint", f"{name}.pt")


def test_a_torn_metrics_line_is_dropped_with_a_warning_on_resume(tmp_path, capsys):
    _train(capsys, tmp_path / "run")
    with (tmp_path / "run/metrics.jsonl").open("a") as handle:
        handle.write('{"step": 3, "split": "tr')  # the disk filled up mid-line
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "run"), "--set", "train.steps=4")
    assert code == 0, err
    assert "warning:" in err and "damaged line" in err and "Traceback" not in err
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_out_at_or_under_a_file(tmp_path, capsys, where):
    (tmp_path / "f").write_text("mine")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    code, _, err = _train(capsys, out)
    assert code == 2
    assert_one_error_line(err, "is a file")
    assert (tmp_path / "f").read_text() == "mine"


def test_a_full_disk_never_leaves_a_partial_checkpoint(tmp_path, capsys, monkeypatch):
    _train(capsys, tmp_path / "run")
    before = (tmp_path / "run/checkpoints/last.pt").read_bytes()

    def no_space(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.os, "fsync", no_space)
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "run"), "--set", "train.steps=3")
    assert code == 2
    assert_one_error_line(strip_progress(err), "No space left on device")
    assert (tmp_path / "run/checkpoints/last.pt").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_a_read_only_folder_is_an_error_line(tmp_path, capsys, monkeypatch):
    def read_only(*_args, **_kwargs):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "ro"))

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, _, err = _train(capsys, tmp_path / "ro" / "run")
    assert code == 2
    assert_one_error_line(err, "Read-only file system", "ro")


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("override, fragment", [
    ("train.batch_size=0", "train.batch_size=0 is out of range: must be >= 1"),
    ("train.log_every=0", "train.log_every=0"),
    ("train.decay_steps=0", "train.decay_steps=0"),
    ("model.decoder_grid=0", "model.decoder_grid=0"),
    ("model.num_slots=0", "model.num_slots=0"),
    ("model.iters=0", "model.iters=0"),
    ("train.lr=-1", "train.lr=-1.0 is out of range: must be > 0"),
    ("train.lr=nan", "train.lr=nan: must be a finite number"),
    ("data.resolution=7", "data.resolution=7"),
    ("model.decoder=foo", "unknown config key 'model.decoder'"),
    ("train.steps=-5", "train.steps=-5"),
    ("train.warmup_steps=-5", "train.warmup_steps=-5"),
    ("model.eps=-1", "model.eps=-1.0"),
    ("train.val_batches=0", "train.val_batches=0"),
    ("model.decoder_grid=5", "data.resolution=16 must be model.decoder_grid=5 times a power of two"),
])
def test_numbers_out_of_range_are_refused_before_anything_is_written(tmp_path, capsys, override, fragment):
    code, _, err = _train(capsys, tmp_path / "run", "--set", override)
    assert code == 2
    assert_one_error_line(err, fragment)
    assert not (tmp_path / "run").exists()


def test_relations_between_fields_are_checked(capsys):
    code, _, err = run(capsys, "config", "--preset", "smoke", "--set", "data.min_objects=7", "--set",
                       "data.max_objects=2")
    assert code == 2
    assert_one_error_line(err, "data.min_objects=7 is more than data.max_objects=2")


def test_a_misspelt_key_gets_a_suggestion(capsys):
    code, _, err = run(capsys, "config", "--preset", "smoke", "--set", "model.num_slot=4")
    assert code == 2
    assert_one_error_line(err, "model.num_slot", "did you mean 'num_slots'")


@pytest.mark.parametrize("override", ["model.slot_dim=32", "train.lr=0.5", "data.name=tetrominoes"])
def test_resume_refuses_overrides_that_would_mix_two_configurations(tmp_path, capsys, override):
    _train(capsys, tmp_path / "run")
    before = (tmp_path / "run/checkpoints/last.pt").read_bytes()
    config_before = (tmp_path / "run/config.json").read_text()
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "run"), "--set", override)
    assert code == 2
    assert_one_error_line(err, "--resume cannot change", override.split("=")[0])
    assert (tmp_path / "run/checkpoints/last.pt").read_bytes() == before
    assert (tmp_path / "run/config.json").read_text() == config_before


# ------------------------------------------------------------------------------------------------ run folders
def test_a_failed_start_leaves_a_folder_that_can_be_reused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")  # what a start killed before its first checkpoint leaves
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 9.0}\n')
    code, _, err = _train(capsys, run_dir)
    assert code == 0, err
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] != 9.0 for r in records) and records[0]["step"] == 1


def test_a_folder_that_is_not_a_run_is_never_written(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    code, _, err = _train(capsys, tmp_path / "mine")
    assert code == 2
    assert_one_error_line(err, "is not a slotlab run", "metrics.jsonl")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["metrics.jsonl"]


def test_fid_of_a_few_images_warns(tmp_path, capsys):
    from PIL import Image

    from slotlab.metrics import fid

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 100, 30)).save(tmp_path / folder / f"{i}.png")
    try:
        fid.inception_weights_path()
    except Exception:  # noqa: BLE001
        pytest.skip("no Inception network installed")
    code, out, err = run(capsys, "fid", str(tmp_path / "a"), str(tmp_path / "b"), "--no-kid", "--device", "cpu")
    assert code == 0 and out.strip().splitlines()[-1].startswith("FID ")
    assert "warning: FID from 2 and 2 images" in err
