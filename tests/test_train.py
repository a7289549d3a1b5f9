"""Training loop: one step of every preset, exact resume, signals, non-finite loss, atomic checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slotlab.config import PROCEDURAL_DATASETS, apply_overrides, get_preset, list_presets
from slotlab.errors import UserError
from slotlab.io import load_checkpoint
from slotlab.train.loop import Trainer, TrainingError, branch, resume, train
from slotlab.train.schedule import lr_at

SMOKE = ["train.log_every=1", "train.ckpt_every=1", "train.val_every=2"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["split"] == "train"]


def test_smoke_run_writes_the_run_directory(tmp_path):
    train(apply_overrides(get_preset("smoke"), SMOKE), tmp_path / "run")
    run = tmp_path / "run"
    for name in ("config.json", "checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl", "curves.png"):
        assert (run / name).exists(), name
    assert load_checkpoint(run / "checkpoints/last.pt")["step"] == 2
    assert any((run / "tb").iterdir())


def test_the_trainer_advances_the_decoders_octave_fade_every_step(tmp_path):
    config = apply_overrides(get_preset("smoke"), SMOKE + ["train.steps=3", "model.decoder_octaves=2",
                                                         "model.decoder_octave_fade=4"])
    train(config, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["model"]["decoder.pos.progress"].item() == 0.5  # set to step 2 / 4 before the last step


def test_the_trainer_starts_the_mask_agreement_at_its_fraction_of_the_steps(tmp_path):
    config = apply_overrides(get_preset("smoke"), SMOKE + ["train.steps=4", "model.mask_agreement=0.1",
                                                         "model.mask_agreement_from=0.5"])
    train(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    with_agreement = [r["step"] for r in records if r["split"] == "train" and "mask_agreement" in r]
    assert with_agreement == [3, 4]  # the steps that start at 2 and 3 of 4 (progress 0.5 and 0.75)


def test_the_mask_agreement_follows_the_steps_when_they_run_out_before_the_time_budget(tmp_path):
    config = apply_overrides(get_preset("smoke"), SMOKE + ["train.steps=4", "train.time_budget=600",
                                                         "model.mask_agreement=0.1", "model.mask_agreement_from=0.5"])
    train(config, tmp_path / "run")  # 4 steps use a tiny part of 600 minutes: the steps bind, as for the cosine
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train" and "mask_agreement" in r] == [3, 4]


def test_a_pixel_sampling_mlp_decoder_run_trains_and_resumes_exactly(tmp_path):
    base = apply_overrides(get_preset("smoke"), SMOKE + ["train.steps=4", "model.decoder_kind=mlp",
                                                       "model.decoder_pixels=0.3"])
    train(base, tmp_path / "full")
    train(apply_overrides(base, ["train.steps=2"]), tmp_path / "split")
    resume(tmp_path / "split", ["train.steps=4"])
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


def test_decoder_lr_scale_gives_the_decoder_its_own_learning_rate_and_resumes_exactly(tmp_path):
    base = apply_overrides(get_preset("smoke"), SMOKE + ["train.steps=4", "train.decoder_lr_scale=3",
                                                       "train.schedule=constant", "train.lr=1e-3"])
    train(base, tmp_path / "full")
    groups = load_checkpoint(tmp_path / "full/checkpoints/last.pt")["optimizer"]["param_groups"]
    assert sorted(group["lr"] for group in groups) == pytest.approx([1e-3, 3e-3])
    train(apply_overrides(base, ["train.steps=2"]), tmp_path / "split")
    resume(tmp_path / "split", ["train.steps=4"])
    assert losses(tmp_path / "split") == losses(tmp_path / "full")


def test_resume_equals_uninterrupted_run(tmp_path):
    base = apply_overrides(get_preset("smoke"), SMOKE + ["train.steps=6"])
    train(base, tmp_path / "full")
    train(apply_overrides(base, ["train.steps=3"]), tmp_path / "split")
    resume(tmp_path / "split", ["train.steps=6"])
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    full = load_checkpoint(tmp_path / "full/checkpoints/last.pt")["model"]
    split = load_checkpoint(tmp_path / "split/checkpoints/last.pt")["model"]
    for name in full:
        torch.testing.assert_close(split[name], full[name], rtol=0, atol=0)


def test_a_branch_with_only_more_steps_equals_the_uninterrupted_run_and_leaves_its_source_alone(tmp_path):
    base = apply_overrides(get_preset("smoke"), SMOKE + ["train.steps=6"])
    train(base, tmp_path / "full")
    train(apply_overrides(base, ["train.steps=3"]), tmp_path / "source")
    source_metrics = (tmp_path / "source/metrics.jsonl").read_bytes()
    branch(tmp_path / "source", tmp_path / "branch", ["train.steps=6"])
    assert losses(tmp_path / "branch") == losses(tmp_path / "full")  # the source's history, then the same steps
    full = load_checkpoint(tmp_path / "full/checkpoints/last.pt")["model"]
    branched = load_checkpoint(tmp_path / "branch/checkpoints/last.pt")["model"]
    for name in full:
        torch.testing.assert_close(branched[name], full[name], rtol=0, atol=0)
    assert (tmp_path / "source/metrics.jsonl").read_bytes() == source_metrics
    assert load_checkpoint(tmp_path / "source/checkpoints/last.pt")["step"] == 3
    origin = json.loads((tmp_path / "branch/branched_from.json").read_text())
    assert (origin["step"], origin["checkpoint"], origin["overrides"]) == (3, "last", ["train.steps=6"])


def test_kept_snapshots_are_the_uninterrupted_runs_state_and_a_branch_starts_from_one(tmp_path):
    base = apply_overrides(get_preset("smoke"), SMOKE + ["train.steps=6", "train.ckpt_every=100"])
    train(apply_overrides(base, ["train.keep_every=2"]), tmp_path / "kept")
    names = sorted(path.name for path in (tmp_path / "kept/checkpoints").iterdir())
    assert names == ["best.pt", "last.pt", "step-2.pt", "step-4.pt", "step-6.pt"]
    train(apply_overrides(base, ["train.steps=2"]), tmp_path / "two")  # the same run, stopped at step 2
    snapshot = load_checkpoint(tmp_path / "kept/checkpoints/step-2.pt")
    stopped = load_checkpoint(tmp_path / "two/checkpoints/last.pt")
    assert snapshot["step"] == 2
    for name in stopped["model"]:
        torch.testing.assert_close(snapshot["model"][name], stopped["model"][name], rtol=0, atol=0)
    branch(tmp_path / "kept", tmp_path / "branch", ["train.keep_every=0"], "step-2")
    assert losses(tmp_path / "branch") == losses(tmp_path / "kept")  # steps 3-6 again, from the snapshot
    assert json.loads((tmp_path / "branch/branched_from.json").read_text())["checkpoint"] == "step-2"
    with pytest.raises(UserError, match="kept snapshots: step-2, step-4, step-6"):
        branch(tmp_path / "kept", tmp_path / "other", [], "step-3")
    with pytest.raises(UserError, match="none"):
        branch(tmp_path / "two", tmp_path / "other", ["train.steps=4"], "step-2")
    assert not (tmp_path / "other").exists()


def test_a_branch_changes_a_model_key_that_resume_refuses(tmp_path):
    base = apply_overrides(get_preset("smoke"), SMOKE + ["train.steps=2"])
    train(base, tmp_path / "source")
    with pytest.raises(UserError, match="--from"):  # --resume points at the branch
        resume(tmp_path / "source", ["model.mask_agreement=0.1"])
    branch(tmp_path / "source", tmp_path / "branch", ["train.steps=4", "model.mask_agreement=0.1"])
    records = [json.loads(line) for line in (tmp_path / "branch/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train" and "mask_agreement" in r] == [3, 4]
    assert json.loads((tmp_path / "branch/config.json").read_text())["model"]["mask_agreement"] == 0.1


def test_a_branch_the_weights_cannot_follow_is_refused_and_leaves_nothing(tmp_path):
    train(apply_overrides(get_preset("smoke"), SMOKE), tmp_path / "source")
    with pytest.raises(UserError, match="does not fit"):
        branch(tmp_path / "source", tmp_path / "branch", ["train.steps=4", "model.slot_dim=24"])
    assert not (tmp_path / "branch").exists()
    with pytest.raises(UserError, match="same folder"):
        branch(tmp_path / "source", tmp_path / "source", ["train.steps=4"])


def test_a_branch_takes_its_own_optimiser_settings_resumes_and_refuses_nothing_to_train(tmp_path):
    base = apply_overrides(get_preset("smoke"), SMOKE + ["train.steps=2", "train.decoder_lr_scale=3",
                                                       "train.schedule=constant", "train.lr=1e-3"])
    train(base, tmp_path / "source")
    with pytest.raises(UserError, match="nothing left to train"):
        branch(tmp_path / "source", tmp_path / "none", ["train.steps=2"])
    with pytest.raises(UserError, match="decoder_lr_scale"):
        branch(tmp_path / "source", tmp_path / "off", ["train.steps=3", "train.decoder_lr_scale=1"])
    branch(tmp_path / "source", tmp_path / "branch", ["train.steps=3", "train.decoder_lr_scale=2"], "best")
    groups = load_checkpoint(tmp_path / "branch/checkpoints/last.pt")["optimizer"]["param_groups"]
    assert sorted(group["lr"] for group in groups) == pytest.approx([1e-3, 2e-3])  # the branch's scale, not 3
    resume(tmp_path / "branch", ["train.steps=4"])
    assert [step for step, _ in losses(tmp_path / "branch")] == [1, 2, 3, 4]
    assert not (tmp_path / "none").exists() and not (tmp_path / "off").exists()


def test_a_resume_loads_the_moments_under_this_machines_optimiser_settings(tmp_path, monkeypatch):
    # A run saved by the plain Adam of a CPU, resumed where Adam is fused (a GPU): torch places the step counters
    # while it loads, by the settings of the groups it loads, so these must already be this machine's (a fused
    # Adam on a GPU with its counters left on the CPU fails at its first step).
    from slotlab.train import loop

    train(apply_overrides(get_preset("smoke"), SMOKE), tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["optimizer"]["param_groups"]
    assert not any(group["fused"] for group in saved)
    monkeypatch.setattr(loop, "build_optimizer", lambda model, cfg, device=None: torch.optim.Adam(
        model.parameters(), lr=cfg.lr, fused=True))
    loaded = []
    load = torch.optim.Adam.load_state_dict

    def spy(self, state_dict):
        loaded.append([group["fused"] for group in state_dict["param_groups"]])
        return load(self, state_dict)

    monkeypatch.setattr(torch.optim.Adam, "load_state_dict", spy)
    resume(tmp_path / "run", ["train.steps=3"])
    assert loaded == [[True]]
    assert [step for step, _ in losses(tmp_path / "run")] == [1, 2, 3]


def test_test_iters_change_validation_and_leave_training_alone(tmp_path):
    base = apply_overrides(get_preset("smoke"), SMOKE + ["train.steps=4"])
    train(base, tmp_path / "plain")
    train(apply_overrides(base, ["model.test_iters=9"]), tmp_path / "nine")
    assert losses(tmp_path / "nine") == losses(tmp_path / "plain")  # training runs model.iters either way

    def validation(run_dir: Path) -> list[float]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["split"] == "val"]

    assert len(validation(tmp_path / "plain")) == 2
    assert validation(tmp_path / "nine") != validation(tmp_path / "plain")  # validation runs model.test_iters


def test_training_into_an_existing_run_is_refused(tmp_path):
    train(apply_overrides(get_preset("smoke"), SMOKE), tmp_path / "run")
    before = (tmp_path / "run/checkpoints/last.pt").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        train(get_preset("smoke"), tmp_path / "run")
    assert (tmp_path / "run/checkpoints/last.pt").read_bytes() == before


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = apply_overrides(get_preset("smoke"), SMOKE + ["train.steps=5"])
    trainer = Trainer(config, tmp_path / "run")
    original = trainer.model.compute_loss

    def exploding(batch, step):
        loss, logs = original(batch, step)
        return (loss * float("nan") if step >= 3 else loss), logs

    trainer.loss_fn = exploding
    with pytest.raises(TrainingError, match="at step 4"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_lr_schedules():
    cfg = get_preset("smoke").train
    exp = apply_overrides(get_preset("smoke"), ["train.warmup_steps=10", "train.decay_steps=100"]).train
    assert lr_at(4, exp) == pytest.approx(exp.lr * 0.5 * 0.5 ** (4 / 100))
    assert lr_at(100, exp) == pytest.approx(exp.lr * 0.5)
    cos = apply_overrides(get_preset("smoke"), ["train.schedule=warmup_cosine", "train.warmup_steps=10",
                                                "train.steps=110"]).train
    assert lr_at(9, cos) == pytest.approx(cos.lr)
    assert lr_at(60, cos) == pytest.approx(cos.lr / 2)
    assert lr_at(110, cos) == pytest.approx(0.0)
    assert cfg.lr > 0


def _presets_with_procedural_data() -> list[str]:
    return [name for name in list_presets() if get_preset(name).data.name in PROCEDURAL_DATASETS]


@pytest.mark.parametrize("name", _presets_with_procedural_data())
def test_every_preset_with_procedural_data_runs_one_step(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SLOTLAB_CACHE_DIR", str(tmp_path / "cache"))
    config = apply_overrides(get_preset(name), [
        "train.steps=1", "train.batch_size=2", "train.val_batches=1", "train.compile=false",
        "data.num_train=4", "data.num_val=2", "slate.dvae_run=",  # SLATE on an untrained dVAE
    ])
    trainer = Trainer(config, tmp_path)
    logs = trainer.train_step()
    assert torch.isfinite(logs["loss"])


def _run_cli(args: list[str], log: Path) -> subprocess.Popen:
    """Run the CLI in a subprocess; output goes to a file (a pipe nobody reads would block the progress bar)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log.open("w") as handle:
        return subprocess.Popen([sys.executable, "-m", "slotlab", *args], stdout=handle, stderr=subprocess.STDOUT,
                                text=True, env=env)


def _wait_for_checkpoint(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if path.exists() and load_checkpoint(path)["step"] >= 3:
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at {path} (process returned {process.poll()})")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, sig):
    args = ["--preset", "smoke", "--set", "train.steps=400", "--set", "train.log_every=1",
            "--set", "train.ckpt_every=1", "--set", "train.val_every=1000"]
    reference = _run_cli(["train", *args, "--out", str(tmp_path / "ref")], tmp_path / "ref.log")
    interrupted = _run_cli(["train", *args, "--out", str(tmp_path / "run")], tmp_path / "run.log")
    _wait_for_checkpoint(tmp_path / "run/checkpoints/last.pt", interrupted)
    interrupted.send_signal(sig)
    interrupted.wait(timeout=60)
    if sig == signal.SIGTERM:
        log = (tmp_path / "run.log").read_text()
        assert interrupted.returncode == 0 and "Traceback" not in log and "stopped by SIGTERM" in log
    stopped_at = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"]
    resumed = _run_cli(["train", "--resume", str(tmp_path / "run")], tmp_path / "resume.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-2000:]
    assert reference.wait(timeout=300) == 0
    assert stopped_at < 400
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


def _presets_with_data_on_disk() -> list[str]:
    # The first stages (VAE, dVAE) come first: slot diffusion and SLATE start from their runs.
    names = [name for name in list_presets() if get_preset(name).data.name == "clevrtex"]
    return sorted(names, key=lambda name: get_preset(name).task not in ("vae", "dvae"))


def test_every_preset_with_rendered_data_runs_one_step(tmp_path):
    """The GPU recipes take one step on a few tiny rendered scenes.

    Only batch size, data root and resolution (32 instead of 128, to keep CPU time small) are changed; the
    architecture, grouping, task and losses are the presets' own.
    """
    from slotlab.data.render import render_dataset

    for variant in ("clevr", "tex"):
        render_dataset(variant, 10, tmp_path / "data", seed=0, workers=1, size="60x80")
    vae_runs: dict[tuple[str, str], Path] = {}
    for name in _presets_with_data_on_disk():
        preset = get_preset(name)
        overrides = [f"data.root={tmp_path / 'data'}", "train.steps=1", "train.batch_size=2", "train.val_batches=1",
                     "train.compile=false", "train.device=cpu", "data.cache=false", "data.resolution=32"]
        if preset.task == "slot_diffusion":
            overrides.append(f"diffusion.vae_run={vae_runs['vae', preset.data.variant]}")
        if preset.task == "slate":
            overrides.append(f"slate.dvae_run={vae_runs['dvae', preset.data.variant]}")
        run_dir = tmp_path / name
        trainer = Trainer(apply_overrides(preset, overrides), run_dir)
        logs = trainer.train_step()
        assert torch.isfinite(logs["loss"]), name
        if preset.task in ("vae", "dvae"):
            trainer.save("last")
            vae_runs[preset.task, preset.data.variant] = run_dir


def test_time_budget_stops_the_run_on_time_and_ends_the_cosine_there(tmp_path):
    config = apply_overrides(get_preset("smoke"), [
        "train.steps=1000000", "train.time_budget=0.04", "train.schedule=warmup_cosine", "train.warmup_steps=2",
        "train.log_every=5", "train.ckpt_every=1000", "train.val_every=1000", "train.lr=0.001"])
    start = time.perf_counter()
    trainer = train(config, tmp_path / "run")
    assert time.perf_counter() - start < 0.04 * 60 + 20  # start-up and the final validation on top of 2.4 s
    assert 2.4 <= trainer.train_seconds < 2.4 + 5.0  # stopped after the step that used the budget up
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if r["split"] == "train"][-1]
    assert last_train["step"] == trainer.step == load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"]
    assert records[-1]["split"] == "val" and records[-1]["step"] == trainer.step  # validated at the end
    # The schedule ends with the budget: the next step would get min_lr, and the lr fell on the way.
    assert lr_at(trainer.step, trainer.config.train, trainer.budget_progress()) == 0.0
    assert last_train["lr"] < 0.7 * 0.001
    peak = max(r["lr"] for r in records if r["split"] == "train")
    assert peak > 0.5 * 0.001
    resumed = resume(tmp_path / "run")  # the budget is used up: nothing more to do
    assert resumed.step == trainer.step


def test_the_cosine_follows_time_when_a_budget_runs_out_first():
    cfg = apply_overrides(get_preset("smoke"), ["train.schedule=warmup_cosine", "train.warmup_steps=10",
                                                "train.steps=1000000", "train.time_budget=10"]).train
    assert lr_at(20, cfg, budget_progress=0.5) == pytest.approx(cfg.lr / 2)
    assert lr_at(20, cfg, budget_progress=1.0) == pytest.approx(0.0)
    assert lr_at(20, cfg, budget_progress=None) == pytest.approx(cfg.lr, rel=1e-3)
