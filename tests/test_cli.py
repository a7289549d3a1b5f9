"""Bad input at the command line: one `error:` line on stderr, exit code 2, no traceback, nothing overwritten."""

from __future__ import annotations

import pickle

import pytest
import torch

from cli_helpers import assert_one_error_line, run
from slotlab.config import apply_overrides, get_preset
from slotlab.train.loop import train


@pytest.fixture
def trained_run(tmp_path):
    run_dir = tmp_path / "run"
    train(apply_overrides(get_preset("smoke"), ["train.log_every=1"]), run_dir)
    return run_dir


@pytest.mark.parametrize("args, fragments", [
    (["train", "--preset", "nope", "--out", "X"], ["unknown preset 'nope'"]),
    (["train", "--preset", "smoke", "--set", "model.slotz=3", "--out", "X"], ["unknown config key 'model.slotz'"]),
    (["train", "--preset", "smoke", "--set", "train.lr=fast", "--out", "X"], ["train.lr", "float"]),
    (["eval", "does/not/exist"], ["missing run directory does/not/exist"]),
    (["train", "--resume", "does/not/exist"], ["missing run directory"]),
    (["train"], ["--preset"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_user_mistakes(capsys, tmp_path, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *args)
    assert code == 2
    assert_one_error_line(err, *fragments)
    assert not (tmp_path / "X").exists()


def test_truncated_checkpoint(capsys, trained_run):
    capsys.readouterr()  # drop the fixture's training output
    path = trained_run / "checkpoints/last.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    (trained_run / "checkpoints/best.pt").unlink()
    code, _, err = run(capsys, "eval", str(trained_run), "--checkpoint", "last")
    assert code == 2
    assert_one_error_line(err, "corrupt checkpoint", "last.pt")
    code, _, err = run(capsys, "train", "--resume", str(trained_run))
    assert code == 2
    assert_one_error_line(err, "corrupt checkpoint")
    assert path.read_bytes() == data[: len(data) // 2]  # nothing overwritten


class Payload:
    def __reduce__(self):
        return (print, ("this code must never run",))


def test_checkpoint_with_pickled_code_is_refused(capsys, trained_run):
    capsys.readouterr()  # drop the fixture's training output
    path = trained_run / "checkpoints/last.pt"
    state = torch.load(path, weights_only=True)
    state["extra"] = Payload()
    torch.save(state, path, pickle_module=pickle)
    (trained_run / "checkpoints/best.pt").unlink()
    code, out, err = run(capsys, "eval", str(trained_run))
    assert code == 2
    assert "this code must never run" not in out
    assert_one_error_line(err, "refused to unpickle code")


def test_presets_and_config_commands(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "sprites-cpu" in out and "clevrtex" in out
    code, out, _ = run(capsys, "config", "--preset", "smoke", "--set", "model.num_slots=5")
    assert code == 0 and '"num_slots": 5' in out
