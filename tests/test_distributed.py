"""Data-parallel training (2 gloo processes on CPU follow the single-process run at the same global batch) and the
parts of the single-GPU speed path that run on CPU (batch prefetching)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from slotlab.cli import main
from slotlab.config import apply_overrides, get_preset
from slotlab.errors import UserError
from slotlab.io import load_checkpoint
from slotlab.models import noise
from slotlab.tasks import get_task
from slotlab.train import distributed
from slotlab.train.distributed import DistInfo
from slotlab.train.loop import BatchPrefetcher, Trainer, train

# Gaussian slot init (the smoke default), so the per-sample noise has to be split like the batch.
RUN = ["train.steps=6", "train.batch_size=4", "train.log_every=1", "train.val_every=3", "train.ckpt_every=3",
       "train.threads=1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    """One torchrun-like worker: the environment torchrun would set, then the real CLI."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = main(argv)
    if code:
        raise SystemExit(code)


def _run_ranks(world_size: int, argv: list[str]) -> None:
    """``slotlab ARGV`` in ``world_size`` gloo processes, as torchrun would start them."""
    _start(_rank_main, (world_size, _free_port(), argv), world_size)


def _start(fn, args: tuple, nprocs: int, timeout: float = 120.0) -> None:
    """Fork ``nprocs`` workers ``fn(rank, *args)``; fail (rather than hang) if they do not all finish in time.

    Forked workers inherit the imported modules (plugins included), so they start in milliseconds instead of
    importing torch, diffusers, ... each.
    """
    get_task(get_preset("smoke"))  # import the task module before forking
    context = mp.start_processes(fn, args=args, nprocs=nprocs, start_method="fork", join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs} ranks did not finish within {timeout:.0f} s (one waiting for another?)")


def _records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture
def one_thread():
    """Oversubscribed cores make multi-threaded tiny ops crawl; the reference run uses one thread like each rank."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_two_gloo_processes_equal_one_process_at_the_same_global_batch(tmp_path, one_thread):
    args = ["train", "--preset", "smoke", "--out", str(tmp_path / "ddp")]
    for item in RUN:
        args += ["--set", item]
    _run_ranks(2, args)
    train(apply_overrides(get_preset("smoke"), RUN), tmp_path / "single")

    ddp, single = _records(tmp_path / "ddp", "train"), _records(tmp_path / "single", "train")
    assert [r["step"] for r in ddp] == [1, 2, 3, 4, 5, 6]  # rank 0 alone logs: one record per step
    for a, b in zip(ddp, single):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-4), a["step"]
    assert len({r["loss"] for r in ddp}) > 1  # it trained: the losses moved
    ddp_val, single_val = _records(tmp_path / "ddp", "val"), _records(tmp_path / "single", "val")
    assert [r["step"] for r in ddp_val] == [3, 6]
    assert ddp_val[-1]["loss"] == pytest.approx(single_val[-1]["loss"], abs=1e-4)

    ddp_state = load_checkpoint(tmp_path / "ddp/checkpoints/last.pt")
    single_state = load_checkpoint(tmp_path / "single/checkpoints/last.pt")
    assert ddp_state["step"] == 6 and not any(k.startswith("module.") for k in ddp_state["model"])
    for name, value in single_state["model"].items():
        torch.testing.assert_close(ddp_state["model"][name], value, rtol=0, atol=1e-4, msg=name)
    assert len(list((tmp_path / "ddp/tb").iterdir())) == 1  # one TensorBoard writer (rank 0)


def test_resume_of_a_data_parallel_run_in_one_process(tmp_path, one_thread):
    """Checkpoints of a 2-process run are ordinary ones: one process resumes them and continues."""
    args = ["train", "--preset", "smoke", "--out", str(tmp_path / "run"), "--set", "train.steps=2", "--set",
            "train.threads=1"]
    _run_ranks(2, args)
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "train.steps=3"]) == 0
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] == 3
    assert [r["step"] for r in _records(tmp_path / "run", "train")] == [1, 2, 3]


def _rank_fit_signalled(rank: int, world_size: int, port: int, config, run_dir: Path, signal_step: int) -> None:
    """A worker whose rank 1 alone gets SIGTERM during step ``signal_step``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = Trainer(config, run_dir)
    if rank == 1:
        loss_fn = trainer.loss_fn

        def signalled(batch, step):
            if step == signal_step:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss_fn(batch, step)

        trainer.loss_fn = signalled
    trainer.fit()
    distributed.shutdown()


def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step(tmp_path, capfd):
    # Logging (where the ranks agree) every 2 steps: rank 1 is signalled in step 3 (0-based 2), all stop after step 4.
    config = apply_overrides(get_preset("smoke"), ["train.steps=50", "train.log_every=2", "train.ckpt_every=50",
                                                   "train.val_every=50", "train.threads=1"])
    _start(_rank_fit_signalled, (2, _free_port(), config, tmp_path / "run", 2), 2)
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] == 4
    assert "stopped by a signal to another rank at step 4" in capfd.readouterr().out


def test_batch_noise_is_the_same_however_the_batch_is_split():
    torch.manual_seed(7)
    whole = noise.batch_randn(6, 3, 5)  # [6, 3, 5]
    parts = []
    for rank in range(3):
        torch.manual_seed(7)  # every rank holds the same RNG state
        with noise.batch_shard(rank, 3):
            parts.append(noise.batch_randn(2, 3, 5))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    with noise.batch_shard(1, 3):
        pass
    torch.manual_seed(7)
    torch.testing.assert_close(noise.batch_randn(6, 3, 5), whole, rtol=0, atol=0)  # the context was left


def test_each_rank_takes_its_contiguous_slice_of_the_global_batch():
    indices = np.arange(10, 18)
    slices = [distributed.shard_indices(indices, DistInfo(rank, 4)) for rank in range(4)]
    assert [s.tolist() for s in slices] == [[10, 11], [12, 13], [14, 15], [16, 17]]
    with pytest.raises(UserError, match="batch_size=6"):
        distributed.check_batch_size(6, DistInfo(0, 4))


@pytest.mark.parametrize("args, message", [
    (["--devices", "0", "--preset", "smoke", "--out", "X"], "--devices 0"),
    (["--devices", "2", "--preset", "smoke", "--out", "X", "--set", "train.batch_size=3"], "batch_size=3"),
    (["--devices", "2", "--preset", "nope", "--out", "X"], "unknown preset"),
    (["--devices", "2", "--resume", "X", "--preset", "smoke"], "--resume"),
])
def test_bad_devices_arguments_fail_before_launching(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("torchrun must not be started"))
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "X").exists()


@pytest.mark.slow
def test_slotlab_train_devices_2_runs_under_torchrun(tmp_path):
    """The real launcher: ``slotlab train --devices 2`` -> torchrun -> 2 gloo workers -> one run directory."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "slotlab", "train", "--devices", "2", "--preset", "smoke", "--out", str(out),
         "--set", "train.steps=2"], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(out / "checkpoints/last.pt")["step"] == 2
    assert [r["step"] for r in _records(out, "train")] == [1, 2]


def test_prefetcher_returns_each_steps_batch_and_restarts_after_close():
    fetched = []

    def fetch(step):
        fetched.append(step)
        return {"step": torch.tensor(step)}

    prefetcher = BatchPrefetcher(fetch)
    assert [int(prefetcher.get(s)["step"]) for s in (0, 1, 2, 7, 8)] == [0, 1, 2, 7, 8]  # 7: a jump, as on resume
    prefetcher.close()
    assert int(prefetcher.get(9)["step"]) == 9
    prefetcher.close()
    assert set(fetched) >= {0, 1, 2, 3, 7, 8, 9}  # step s + 1 was gathered ahead


def test_prefetching_does_not_change_the_run(tmp_path, one_thread):
    """On CUDA the next batch is gathered on a thread; forced on here, the losses must be the very same."""
    config = apply_overrides(get_preset("smoke"), RUN)
    runs = {}
    for name, prefetch in (("plain", False), ("prefetched", True)):
        trainer = Trainer(config, tmp_path / name)
        trainer.prefetcher = BatchPrefetcher(trainer.fetch_batch) if prefetch else None
        trainer.fit()
        runs[name] = [r["loss"] for r in _records(tmp_path / name, "train")]
    assert runs["prefetched"] == runs["plain"] and len(runs["plain"]) == 6
