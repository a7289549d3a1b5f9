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
    (["train", "--from", "does/not/exist", "--out", "X"], ["missing run directory"]),
    (["train", "--from", "does/not/exist"], ["--from", "--out"]),
    (["train", "--from", "A", "--preset", "smoke", "--out", "X"], ["--from", "--preset"]),
    (["train", "--preset", "smoke", "--checkpoint", "best", "--out", "X"], ["--checkpoint", "--from"]),
    (["frobnicate"], ["invalid choice"]),
    (["eval", "does/not/exist", "--checkpoint", "../x"], ["--checkpoint", "last, best or step-<N>", "'../x'"]),
    (["export", "does/not/exist", "--out", "X", "--checkpoint", "step-"], ["--checkpoint", "'step-'"]),
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


def test_version_and_suggestions(capsys):
    from slotlab import __version__

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"slotlab {__version__}"
    code, _, err = run(capsys, "train", "--preset", "sprite-cpu", "--out", "X")
    assert code == 2
    assert_one_error_line(err, "unknown preset 'sprite-cpu'", "did you mean 'sprites-cpu'")


def test_help_shows_defaults(capsys):
    code, out, _ = run(capsys, "eval", "--help")
    assert code == 0 and "(default: best)" in out and "(default: auto)" in out


def test_train_says_what_it_does_and_where_the_files_are(tmp_path, capsys):
    code, out, err = run(capsys, "train", "--preset", "smoke", "--set", "train.steps=3", "--set",
                         "train.warmup_steps=5", "--out", str(tmp_path / "run"))
    assert code == 0
    assert "slotlab train: preset smoke" in out and "16 train / 8 val images" in out
    assert "done: step 3" in out and f"next: slotlab eval {tmp_path / 'run'}" in out
    assert "warning: train.warmup_steps=5 is not below train.steps=3" in err  # scaled, and said
    import json

    assert json.loads((tmp_path / "run/config.json").read_text())["train"]["warmup_steps"] == 0


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_the_cpu_is_said_and_warned_about_where_it_is_emulated(native, tmp_path, capsys, monkeypatch):
    from slotlab.train import loop

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    code, out, err = run(capsys, "train", "--preset", "smoke", "--set", "train.precision=bf16", "--set",
                         "train.device=cpu", "--out", str(tmp_path / "run"))
    assert code == 0 and "threads, bf16); run directory" in out
    assert ("without native bf16" in err) is (not native)
    code, out, _ = run(capsys, "train", "--preset", "smoke", "--set", "train.device=cpu", "--out",
                       str(tmp_path / "fp32"))
    assert code == 0 and "threads, fp32); run directory" in out
