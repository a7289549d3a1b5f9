"""Run directories: reading one (config, checkpoint, device, metrics), who may write one, when a folder is a run.

Everything a later command needs comes from the run directory alone: :func:`load_run` gives the resolved config and
a checkpoint, :func:`choose_checkpoint` the ``best`` one when it exists (else ``last``), :func:`read_metrics` the
logged records. This module sits below every package but ``config``, ``io``, ``registry`` and ``errors``.

* A folder becomes a **run** once its first checkpoint (``checkpoints/last.pt`` or ``best.pt``) exists. Before that
  (a start that failed, or was killed before its first checkpoint), ``slotlab train --out`` may reuse it: the
  leftovers of that start are cleared. A folder holding anything else is never written into.
* One process at a time owns a run directory: :class:`RunLock` holds an operating-system lock on ``RUN_DIR/.lock``
  (``filelock``) for the life of ``train``. A second writer gets ``error: RUN_DIR is in use by process N``; a lock
  left by a dead process is released by the system, so the next ``train`` simply takes it.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from slotlab.config import Config, config_from_dict, config_to_dict
from slotlab.errors import UserError
from slotlab.io import load_checkpoint

LOCK_NAME = ".lock"
CHECKPOINT_NAMES = ("last.pt", "best.pt")
KEPT_NAME = re.compile(r"step-[0-9]+")  # a snapshot kept every train.keep_every steps: checkpoints/step-<N>.pt
# What a start of `slotlab train` writes before its first checkpoint: safe to clear when the folder is reused.
BRANCH_RECORD = "branched_from.json"  # where a branched run (slotlab train --from) started
START_LEFTOVERS = ("config.json", "metrics.jsonl", "tb", "curves.png", "skipped_files.txt", "checkpoints",
                   BRANCH_RECORD, LOCK_NAME)


def has_checkpoint(run_dir: Path) -> bool:
    return any((Path(run_dir) / "checkpoints" / name).exists() for name in CHECKPOINT_NAMES)


def check_writable_dir(path: Path, what: str = "--out") -> None:
    """``path`` is a folder, or can become one: neither it nor a parent is a file."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{what} {path}: {folder} is a file, not a folder")


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse ``--out run_dir`` when it holds a run, or files that are not the leftovers of a failed start."""
    run_dir = Path(run_dir)
    check_writable_dir(run_dir)
    if not run_dir.exists():
        return
    if has_checkpoint(run_dir):
        raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or choose another --out")
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in START_LEFTOVERS)
    if foreign or ((run_dir / "metrics.jsonl").exists() and not (run_dir / "config.json").exists()):
        example = foreign[0] if foreign else "metrics.jsonl"
        raise UserError(f"{run_dir} is not empty and is not a slotlab run (it holds {example}); choose another --out")


def clear_start_leftovers(run_dir: Path) -> None:
    """Remove what a failed start left in ``run_dir`` (never the lock, which the caller holds)."""
    for name in START_LEFTOVERS:
        path = Path(run_dir) / name
        if name == LOCK_NAME or not os.path.lexists(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class RunLock:
    """Exclusive ownership of a run directory for one process (a context manager).

    Example:
        >>> with RunLock(Path("runs/demo")):  # doctest: +SKIP
        ...     train_the_run()
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.lock: FileLock | None = None

    def holder(self, wait_s: float = 1.0) -> str:
        """Who holds the lock: the holder writes its pid just after taking it, so wait up to ``wait_s`` for it."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                pid = self.path.read_text().strip()
            except OSError:
                pid = ""
            if pid.isdigit():
                return f"process {pid}"
            if time.monotonic() >= deadline:
                return "another process"
            time.sleep(0.02)

    def __enter__(self) -> RunLock:
        check_writable_dir(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(self.path)
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            raise UserError(f"{self.run_dir} is in use by {self.holder()} (one `slotlab train` at a time per run "
                            "directory)") from None
        self.path.write_text(f"{os.getpid()}\n")  # the contents are ours while we hold the lock
        return self

    def __exit__(self, *exc_info) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


# ---------------------------------------------------------------------------------------------------- reading a run
# glibc malloc parameters (malloc.h), and the environment variables that set them before a process starts
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_")
_kept_freed_memory = False


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory that freed tensors leave, to reuse it, instead of handing it back at once.

    A CPU training step allocates and frees dozens of large tensors. By default glibc serves each block above its
    mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns the free top of its heap to the system, so
    every step faults in (and the kernel zeroes) the same hundreds of megabytes again: on 2 cores the kernel took a
    fifth of the CPU time and the ``clevr6-cpu`` step ran at 29 images/s (its bf16 decoder activations alone are
    56 MiB blocks, seven a step). With no mmapped blocks in the main heap (where autograd and the optimizer allocate;
    a freed block is reused there) and the heap grown and kept 1 GiB beyond its use, it runs at 44 images/s
    (docs/performance.md). The process keeps the memory of its largest step, which it reaches every step anyway.

    The trainer and ``slotlab eval`` call it on a CPU once their data and model are in memory; loading a model
    (``slotlab.load``) does not, so a notebook's allocator is left alone. It leaves the allocator alone where the user
    set it (the ``MALLOC_*_`` variables, ``glibc.malloc`` tunables, ``SLOTLAB_KEEP_FREED_MEMORY=0``) and off glibc
    (macOS, musl). With a preloaded tcmalloc or jemalloc the settings are made but idle. Under strict overcommit
    (``vm.overcommit_memory=2``) or an address-space limit, the 1 GiB pad makes the heap ask for that much more at a
    time: ``SLOTLAB_KEEP_FREED_MEMORY=0`` turns it off. Returns whether the settings are in force.
    """
    global _kept_freed_memory
    users_own = (any(v in os.environ for v in _MALLOC_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
                 or os.environ.get("SLOTLAB_KEEP_FREED_MEMORY", "1") == "0")
    if _kept_freed_memory or users_own or not sys.platform.startswith("linux"):
        return _kept_freed_memory
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 1 << 30))
    _kept_freed_memory = all([mallopt(param, value) == 1 for param, value in settings])  # a list: make all three
    return _kept_freed_memory


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; otherwise the named device (checked)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name!r} but CUDA is not available")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise UserError(f"unknown train.device {name!r} (auto, cpu, cuda, cuda:N, mps)")
    return torch.device(name)



def choose_checkpoint(run_dir: Path, checkpoint: str = "best") -> str:
    """``checkpoint``, except that ``best`` falls back to ``last`` for a run that has not validated yet."""
    if is_exported(run_dir):
        return "exported"
    if checkpoint == "best" and not (Path(run_dir) / "checkpoints" / "best.pt").exists():
        return "last"
    return checkpoint


def weights_file(run_dir: Path, checkpoint: str = "best") -> Path:
    """The file the weights of ``checkpoint`` come from: ``checkpoints/<name>.pt`` (``best`` falling back to
    ``last``), or ``model.safetensors`` of an exported folder."""
    if is_exported(run_dir):
        return Path(run_dir) / EXPORTED_WEIGHTS
    return Path(run_dir) / "checkpoints" / f"{choose_checkpoint(run_dir, checkpoint)}.pt"


def kept_checkpoints(run_dir: Path) -> list[str]:
    """The names of the snapshots ``train.keep_every`` kept (``step-<N>``), by step."""
    found = [path.stem for path in (Path(run_dir) / "checkpoints").glob("step-*.pt") if KEPT_NAME.fullmatch(path.stem)]
    return sorted(found, key=lambda name: int(name.removeprefix("step-")))


def checkpoint_path(run_dir: Path, checkpoint: str = "last") -> Path:
    """``RUN_DIR/checkpoints/<checkpoint>.pt``, checked to exist; ``checkpoint`` is ``last``, ``best`` or a kept
    ``step-<N>``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"missing run directory {run_dir}")
    if checkpoint not in ("last", "best") and not KEPT_NAME.fullmatch(checkpoint):
        raise UserError(f"unknown checkpoint {checkpoint!r} (last, best or step-<N>)")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.exists():
        if KEPT_NAME.fullmatch(checkpoint):
            kept = kept_checkpoints(run_dir)
            raise UserError(f"run directory {run_dir} has no checkpoint {checkpoint}.pt; kept snapshots: "
                            f"{', '.join(kept) if kept else 'none (train.keep_every was 0)'}")
        raise UserError(f"run directory {run_dir} has no checkpoint {checkpoint}.pt (not trained yet?)")
    return path


EXPORTED_WEIGHTS = "model.safetensors"  # what `slotlab export` writes next to config.json


def is_exported(run_dir: Path) -> bool:
    """An exported model folder (``config.json`` + ``model.safetensors``) rather than a run directory."""
    return (Path(run_dir) / EXPORTED_WEIGHTS).is_file() and not has_checkpoint(run_dir)


def load_run(run_dir: Path, checkpoint: str = "last") -> tuple[Config, dict[str, Any]]:
    """The config and the named checkpoint (``last`` or ``best``) of a run directory.

    An exported folder (:func:`export_run`) has one set of weights: ``checkpoint`` is ignored there, and the
    returned state holds ``model`` and ``config`` only.
    """
    if is_exported(run_dir):
        return load_exported(run_dir)
    path = checkpoint_path(run_dir, checkpoint)
    state = load_checkpoint(path)
    config = config_from_dict(state["config"], Config, str(path))
    return config, state


def read_stage_run(run_dir: str, key: str, task: str) -> tuple[Config, dict[str, Any], Path]:
    """The config, checkpoint (``best``, else ``last``) and weights file of the first-stage run a second stage starts
    from (a VAE for slot diffusion, a dVAE for SLATE); ``key`` names the config key that points at it in errors."""
    path = Path(run_dir)
    try:
        checkpoint = choose_checkpoint(path, "best")
        config, state = load_run(path, checkpoint)
    except UserError as exc:
        raise UserError(f"{key}={run_dir!r}: {exc}") from None
    if config.task != task:
        raise UserError(f"{key}={run_dir!r} is a {config.task!r} run, not a {task} run")
    return config, state, weights_file(path, checkpoint)


def load_exported(folder: Path) -> tuple[Config, dict[str, Any]]:
    """Config and weights of an exported model folder (safetensors: data only, no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from slotlab.config import load_config

    folder = Path(folder)
    config = load_config(folder / "config.json")
    try:
        weights = load_file(folder / EXPORTED_WEIGHTS)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"corrupt model weights {folder / EXPORTED_WEIGHTS}: {str(exc)[:200]}") from None
    return config, {"model": weights, "config": config_to_dict(config), "step": 0}


def eval_dir(run_dir: Path, split: str = "val", checkpoint: str = "best", limit: int = 0, iters: int = 0,
             seed: int = 0, draws: int = 1, restarts: int = 0, posterior: bool | None = None) -> Path:
    """Where ``slotlab eval`` keeps the results of one split, checkpoint, image count, number of test-time
    iterations, restarts and slot draws: ``RUN_DIR/eval/<split>-<checkpoint>`` (``-first<N>`` with a limit,
    ``-T<iters>`` with iterations other than the run's own test-time ones, ``model.test_iters`` or else
    ``model.iters``, ``-R<restarts>`` with restarts other than the run's ``model.test_restarts``, ``-seed<S>`` with
    another noise seed than 0, ``-draws<N>`` with more than one draw of the initial slots, ``-posterior`` or
    ``-mixture`` with other masks than the run's ``model.mask_posterior``), e.g. ``eval/val-best``,
    ``eval/val-best-T15``, ``eval/val-best-R8`` or ``eval/val-best-draws5``."""
    suffix = ((f"-first{limit}" if limit else "") + (f"-T{iters}" if iters else "")
              + (f"-R{restarts}" if restarts else "")
              + ({True: "-posterior", False: "-mixture", None: ""}[posterior])
              + (f"-seed{seed}" if seed else "") + (f"-draws{draws}" if draws > 1 else ""))
    return Path(run_dir) / "eval" / f"{split}-{checkpoint}{suffix}"


def scoring_conditions(metrics: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """How an evaluation's ``metrics`` were scored, where it differs from one pass of the trained model (``config``
    as a dict): ``T=<n>`` (test-time iterations), ``best of <R> restarts`` (``--restarts``, ``model.test_restarts``),
    ``mean of <N> draws`` (``--draws``), ``pixel posterior masks`` or ``mixture masks`` (``--posterior``)."""
    conditions = []
    if metrics.get("iters") not in (None, config.get("model", {}).get("iters")):  # model.test_iters or eval --iters
        conditions.append(f"T={metrics['iters']}")
    if (metrics.get("restarts") or 1) > 1:
        conditions.append(f"best of {metrics['restarts']} restarts")
    own_posterior = config.get("model", {}).get("mask_posterior", False)
    if metrics.get("mask_posterior", own_posterior) != own_posterior:  # eval --posterior on/off
        conditions.append("pixel posterior masks" if metrics["mask_posterior"] else "mixture masks")
    if (metrics.get("draws") or 1) > 1:  # the scores are means over N draws of the initial slots
        conditions.append(f"mean of {metrics['draws']} draws")
    return conditions


def find_eval(run_dir: Path) -> Path | None:
    """The evaluation a report shows: the full val split of the best checkpoint when there is one, else the latest
    evaluation (or the single ``eval/`` folder of runs evaluated by an older slotlab)."""
    root = Path(run_dir) / "eval"
    preferred = [eval_dir(run_dir, "val", name) for name in ("best", "last", "exported")]
    for folder in preferred:
        if (folder / "metrics.json").is_file():
            return folder
    # the latest, preferring evaluations with the run's own number of iterations to those with another (-T<n>)
    found = sorted(root.glob("*/metrics.json"),
                   key=lambda path: (re.search(r"-T\d+(-|$)", path.parent.name) is None, path.stat().st_mtime))
    if found:
        return found[-1].parent
    return root if (root / "metrics.json").is_file() else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl``; a torn or damaged line (e.g. from a full disk) is dropped with a
    warning on stderr."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records, dropped = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            dropped.append(number)
    if dropped:
        print(f"warning: {path}: dropped {len(dropped)} damaged line(s) (line {dropped[0]}"
              f"{' ...' if len(dropped) > 1 else ''})", file=sys.stderr)
    return records


__all__ = ["RunLock", "check_new_run_dir", "check_writable_dir", "checkpoint_path", "choose_checkpoint",
           "clear_start_leftovers", "has_checkpoint", "is_exported", "load_exported", "load_run",
           "pick_device", "read_metrics", "weights_file", "eval_dir", "find_eval"]
