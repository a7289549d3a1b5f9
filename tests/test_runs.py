"""Run directories stand on their own: moved anywhere, with the runs they started from deleted (issue 17)."""

from __future__ import annotations

import shutil

import pytest

from cli_helpers import run
from slotlab.config import apply_overrides, get_preset
from slotlab.generate.compose import compose
from slotlab.train.loop import train

SHORT = ["train.steps=2", "train.val_every=2", "data.num_train=8", "data.num_val=4"]


@pytest.mark.parametrize("kind", ["slot_diffusion", "autoencoder", "vqsa"])
def test_a_moved_run_works_from_anywhere_without_the_runs_it_started_from(kind, tmp_path, capsys, monkeypatch):
    origin = tmp_path / "origin"
    if kind == "slot_diffusion":
        train(apply_overrides(get_preset("vae-smoke"), SHORT), origin)
        config = apply_overrides(get_preset("slotdiffusion-smoke"), [*SHORT, f"diffusion.vae_run={origin}"])
    elif kind == "vqsa":
        train(apply_overrides(get_preset("smoke"), SHORT), origin)
        config = apply_overrides(get_preset("vqsa-smoke"), [*SHORT, f"vq.init_run={origin}"])
    else:
        config = apply_overrides(get_preset("smoke"), SHORT)
    train(config, tmp_path / "run")
    shutil.rmtree(origin, ignore_errors=True)  # the VAE run (or the run VQ-SA started from) is gone
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(tmp_path / "run", moved)
    monkeypatch.chdir(moved.parent)  # and the current directory is another one

    for command in (["eval", str(moved), "--device", "cpu"], ["report", str(moved)],
                    ["mix", str(moved), "--a", "0", "--b", "1", "--take-from-b", "0", "--device", "cpu"]):
        code, _, err = run(capsys, *command)
        assert code == 0, (command, err)
    if kind != "slot_diffusion":  # decoding a library of slots with a diffusion model is minutes on a CPU
        assert compose(moved, num_images=4, device="cpu", fid=False)["num_images"] == 4


def test_a_refused_start_names_the_holder_that_has_only_just_taken_the_lock(tmp_path):
    """The holder writes its pid just after taking the lock; a start refused in between still names that process."""
    import threading

    from slotlab.runs import RunLock

    lock_file = tmp_path / ".lock"
    lock_file.write_text("")  # the lock is taken, the pid not written yet
    threading.Timer(0.2, lambda: lock_file.write_text("4242\n")).start()
    assert RunLock(tmp_path).holder() == "process 4242"
    lock_file.write_text("")  # a holder that never writes one
    assert RunLock(tmp_path).holder(wait_s=0.1) == "another process"


def test_scoring_conditions_name_masks_other_than_the_runs_own():
    from slotlab.runs import eval_dir, scoring_conditions

    plain = {"model": {"iters": 3, "mask_posterior": False}}
    assert scoring_conditions({"iters": 3, "restarts": 1, "mask_posterior": False}, plain) == []
    assert scoring_conditions({"iters": 3, "mask_posterior": True}, plain) == ["pixel posterior masks"]
    assert scoring_conditions({"iters": 3, "mask_posterior": False},
                              {"model": {"iters": 3, "mask_posterior": True}}) == ["mixture masks"]
    assert scoring_conditions({"iters": 3}, {"model": {"iters": 3}}) == []  # evaluations of older runs
    assert eval_dir("run", restarts=8, posterior=True, draws=2).name == "val-best-R8-posterior-draws2"
