"""Data-parallel training across processes with the engine every PyTorch user has: torchrun + DDP.

``torchrun --nproc_per_node=G -m slotlab train ...`` (or ``slotlab train --devices G ...``, which launches it) starts
G processes; each one builds the same model, takes its slice of the *same* global batch, and
:class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients. Because

* the global batch of a step is the one a single process would use (``train.batch_size`` is the global batch),
* rank r takes the contiguous rows ``[r * B / G, (r + 1) * B / G)`` of it,
* per-sample noise (the Gaussian slot initialisation) is drawn for the whole global batch and sliced the same way
  (:func:`batch_randn`),

a G-process run follows the single-process run at the same global batch up to floating point (the order of the
gradient sum). Only rank 0 logs, shows progress, validates and writes checkpoints; the logged metrics are means
over the ranks. CUDA processes talk over NCCL (one GPU each, ``cuda:LOCAL_RANK``), CPU processes over gloo.

We slice the global batch ourselves rather than use :class:`torch.utils.data.DistributedSampler`: the sampler
deals each rank every G-th item of an epoch permutation, so G processes would see different batches from one
process at the same step and could not reproduce its run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from slotlab.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a data-parallel run (``world_size == 1``: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, validates and writes the run directory."""
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when the process was started any other way)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def env_rank() -> int:
    """``RANK`` set by torchrun (0 when the process was started any other way)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        raise UserError(f"environment variable RANK={os.environ['RANK']!r} is not an integer") from None


def init(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (no-op for a single process); returns this process's :class:`DistInfo`.

    Idempotent. ``device`` picks the backend: NCCL for CUDA, gloo otherwise.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    if env_world_size() <= 1:
        return DistInfo()
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"process with LOCAL_RANK={local_rank} has no GPU (found {torch.cuda.device_count()}); "
                            "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return current()


def current() -> DistInfo:
    """The :class:`DistInfo` of the initialised process group (or the single-process one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown() -> None:
    """Leave the process group (if any), so the process exits cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def main_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. building a dataset cache); the other ranks run it after, reading its work."""
    if info.enabled and not info.is_main:
        dist.barrier()
    yield
    if info.enabled and info.is_main:
        dist.barrier()


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """One GPU per process: ``cuda`` -> ``cuda:LOCAL_RANK`` in a multi-process run."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def check_batch_size(batch_size: int, info: DistInfo) -> None:
    if batch_size % info.world_size:
        raise UserError(f"train.batch_size={batch_size} (the global batch) does not split evenly over "
                        f"{info.world_size} processes")


def shard_indices(indices: np.ndarray, info: DistInfo) -> np.ndarray:
    """This rank's contiguous slice of the global batch ``indices``."""
    per_rank = len(indices) // info.world_size
    return indices[info.rank * per_rank : (info.rank + 1) * per_rank]


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def reduce_logs(logs: dict[str, torch.Tensor | float], info: DistInfo, device: torch.device,
                stop: bool = False) -> tuple[dict[str, float], bool]:
    """Read the step's logged values back to the host (one transfer), averaged over the ranks.

    Also agrees on stopping: returns ``stop=True`` on every rank when any rank was asked to stop, so all ranks leave
    the loop at the same step (a rank that left alone would leave the others waiting in the gradient all-reduce).
    """
    names = list(logs)
    values = [torch.as_tensor(logs[name], dtype=torch.float32).reshape(()).to(device) for name in names]
    if not info.enabled:
        return dict(zip(names, torch.stack(values).tolist())), stop  # the only host-device sync of a step
    packed = torch.stack([*values, torch.tensor(float(stop), device=device)])  # [len(names) + 1]
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    host = packed.tolist()
    return {name: value / info.world_size for name, value in zip(names, host)}, host[-1] > 0


# ----------------------------------------------------------------------------------------------------------------
# Launching


def torchrun_command(devices: int, train_args: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=G -m slotlab train TRAIN_ARGS``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
            "-m", "slotlab", "train", *train_args]


def launch_train(devices: int, preset: str | None, out: str | None, resume: str | None,
                 overrides: list[str], source: str | None = None, checkpoint: str = "last",
                 branch_batch_size: int = 0) -> None:
    """``slotlab train --devices G``: run ``slotlab train`` in G processes under torchrun and wait for them.

    The arguments are checked here first, so that a mistake gives one ``error:`` line rather than G of them. With
    CUDA, G may not exceed the number of GPUs; on CPU any number of gloo processes can run (torchrun gives each
    ``OMP_NUM_THREADS=1`` unless it is set).
    """
    from slotlab.config import apply_overrides, get_preset, resume_overrides

    if devices < 1:
        raise UserError(f"--devices {devices}: expected a positive number of processes")
    if torch.cuda.is_available() and devices > torch.cuda.device_count():
        raise UserError(f"--devices {devices}: only {torch.cuda.device_count()} GPU(s) visible")
    from slotlab.runs import check_new_run_dir

    if resume:
        if preset or out:
            raise UserError("--resume RUN_DIR takes no --preset or --out (the run directory has its config)")
        resume_overrides(overrides)
        args = ["--resume", resume]
    elif source:  # a branch (--from): the caller checked it (``branch_batch_size``: its config's train.batch_size)
        check_batch_size(branch_batch_size, DistInfo(0, devices))
        check_new_run_dir(Path(out))
        args = ["--from", source, "--checkpoint", checkpoint, "--out", out]
    else:
        if not preset or not out:
            raise UserError("train needs --preset P and --out RUN_DIR (or --resume RUN_DIR, or --from RUN --out NEW)")
        check_batch_size(apply_overrides(get_preset(preset), overrides).train.batch_size, DistInfo(0, devices))
        check_new_run_dir(Path(out))
        args = ["--preset", preset, "--out", out]
    for item in overrides:
        args += ["--set", item]
    returncode = subprocess.call(torchrun_command(devices, args))
    if returncode != 0:
        raise UserError(f"torchrun with {devices} processes exited with code {returncode} (see the messages above)")


__all__ = [
    "DistInfo", "check_batch_size", "current", "env_rank", "env_world_size", "init",
    "launch_train", "main_first", "rank_device", "reduce_logs", "shard_indices", "shutdown", "torchrun_command",
]
