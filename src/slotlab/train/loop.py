"""One training loop for every task: ``config -> dataset -> model -> loss -> metrics -> run dir``.

Run directory layout::

    RUN_DIR/config.json              resolved config
    RUN_DIR/checkpoints/last.pt      latest state (atomic), used by --resume
    RUN_DIR/checkpoints/best.pt      lowest validation loss
    RUN_DIR/checkpoints/step-<N>.pt  kept snapshots, every train.keep_every steps (branch or evaluate from them)
    RUN_DIR/metrics.jsonl            train / val records
    RUN_DIR/tb/                      TensorBoard scalars
    RUN_DIR/curves.png               train and val loss (and LR) vs epoch

Every step's randomness (slot initialisation noise, data order) is a pure function of ``(seed, step)``, so a run
resumed from a checkpoint produces exactly the losses of an uninterrupted one.

Speed (the CUDA recipe): bf16 autocast, channels-last convolutions, ``torch.compile`` of the loss
(``train.compile``), fused Adam, the next uint8 batch gathered and pinned on a background thread and copied without
blocking, normalisation on the GPU, and no host-device synchronisation inside a step: losses are read back only at
logging, validation and checkpoint steps. Several processes (``torchrun``) train data-parallel, see
:mod:`slotlab.train.distributed`.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from slotlab.config import Config, apply_overrides, config_to_dict, resume_overrides, save_config
from slotlab.data import ArrayDataset, build_dataset, to_model_batch
from slotlab.errors import UserError
from slotlab.io import (
    atomic_write_bytes,
    atomic_write_text,
    checkpoint_bytes,
    first_line,
    load_weights,
    non_finite_weights,
)
from slotlab.models.noise import batch_shard
from slotlab.runs import (
    BRANCH_RECORD,
    RunLock,
    check_new_run_dir,
    checkpoint_path,
    clear_start_leftovers,
    has_checkpoint,
    is_exported,
    keep_freed_memory,
    load_run,
    pick_device,
)
from slotlab.tasks import get_task
from slotlab.train import distributed
from slotlab.train.logging import MetricsLog
from slotlab.train.schedule import lr_at


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class FiniteGuard:
    """Remembers the first step whose loss or gradient norm was not finite, without a host-device sync.

    :meth:`update` runs after every step on the device; :meth:`check` reads the record back (one sync) and raises
    :class:`TrainingError`. The trainer checks every step on CPU (a sync costs nothing there) and before every log,
    validation and checkpoint on a GPU, so no checkpoint ever holds the weights of a bad step, and the error names the
    step that went wrong even when it is found later.
    """

    NAMES = ("loss", "grad_norm")

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((len(self.NAMES),), -1, dtype=torch.long, device=device)  # per name, -1 = none

    def update(self, logs: dict[str, torch.Tensor], step: int) -> None:
        for i, name in enumerate(self.NAMES):
            if name in logs:
                bad = ~torch.isfinite(logs[name].detach().float())
                fresh = bad & (self.first_bad[i] < 0)
                self.first_bad[i] = torch.where(fresh, torch.tensor(step, device=self.first_bad.device),
                                                self.first_bad[i])

    def bad_step(self) -> tuple[str, int] | None:
        """``(name, step)`` of the first non-finite value, or None."""
        found = [(step, name) for name, step in zip(self.NAMES, self.first_bad.tolist()) if step >= 0]
        return (min(found)[1], min(found)[0]) if found else None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 autocast roughly halves the
    training step of the memory-bound broadcast decoder; elsewhere oneDNN emulates it, slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu functions (torch >= 2.3)
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast with ``bf16`` (CUDA or CPU) or ``auto`` on CUDA; nothing otherwise (fp32)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"unknown train.precision {precision!r} (auto, bf16, fp32)")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the batch used at ``step``: epochs are seeded permutations, batches never straddle epochs."""
    batches_per_epoch = max(1, num_items // batch_size)
    epoch, position = divmod(step, batches_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    if num_items < batch_size:
        return np.resize(order, batch_size)
    return order[position * batch_size : (position + 1) * batch_size]


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device | None = None) -> torch.optim.Optimizer:
    """Adam over the trainable parameters; the fused CUDA kernel (one launch per step) on a GPU.

    With ``cfg.decoder_lr_scale != 1`` the parameters under ``decoder.`` form a second group whose learning rate is
    the schedule's times that scale (each group's ``lr_scale``, applied by the trainer every step).
    """
    fused = device is not None and device.type == "cuda"
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if cfg.decoder_lr_scale == 1.0:
        return torch.optim.Adam([p for _, p in named], lr=cfg.lr, fused=fused)
    decoder = [p for name, p in named if name.startswith("decoder.")]
    rest = [p for name, p in named if not name.startswith("decoder.")]
    if not decoder:
        raise UserError("train.decoder_lr_scale: this model has no parameters under 'decoder.'")
    groups = [{"params": rest, "lr_scale": 1.0}, {"params": decoder, "lr_scale": cfg.decoder_lr_scale}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=cfg.lr, fused=fused)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move ``model`` to ``device`` with channels-last (NHWC) convolution weights; on CUDA also fast kernels.

    Channels-last lets cuDNN run the bf16 convolutions on tensor cores without layout transposes, and oneDNN on the
    CPU run the small-channel convolutions of the encoder and the full-resolution decoder about 1.5x faster (measured
    in benchmarks/train_step.py). The uint8 batch arrives as ``[B, H, W, 3]``, so the permuted image
    :func:`~slotlab.data.to_model_batch` makes is already NHWC.
    """
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution algorithms once
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast
        torch.backends.cudnn.allow_tf32 = True
    if device.type in ("cuda", "cpu"):
        model = model.to(memory_format=torch.channels_last)
    return model


class LossModule(torch.nn.Module):
    """``forward(batch, step) = model.compute_loss(batch, step)``: DDP and ``torch.compile`` wrap the loss through it.

    DDP synchronises gradients only for work done inside its ``forward``, so the loss must be computed there.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        return self.model.compute_loss(batch, step)


def build_loss_fn(model: torch.nn.Module, cfg, device: torch.device, dist_info: distributed.DistInfo):
    """``loss_fn(batch, step) -> (loss, logs)`` for training: the model's loss, data-parallel and compiled as set."""
    if not dist_info.enabled and not cfg.compile:
        return model.compute_loss
    loss_module: torch.nn.Module = LossModule(model)
    if dist_info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        loss_module = torch.nn.parallel.DistributedDataParallel(loss_module, device_ids=device_ids)
    if cfg.compile:
        loss_module = torch.compile(loss_module)  # forward and (through AOTAutograd) backward
    return loss_module


class BatchPrefetcher:
    """Gathers (and pins) the uint8 batch of step ``s + 1`` on a background thread while step ``s`` runs.

    Batches are a pure function of the step, so prefetching changes nothing but the time; anything random (slot
    noise, augmentation) still happens on the main thread after the step's seed is set.
    """

    def __init__(self, fetch):
        self.fetch = fetch
        self.executor: ThreadPoolExecutor | None = None
        self.pending: dict[int, Future] = {}

    def get(self, step: int) -> dict[str, torch.Tensor]:
        if self.executor is None:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slotlab-prefetch")
        future = self.pending.pop(step, None) or self.executor.submit(self.fetch, step)
        self.pending = {step + 1: self.executor.submit(self.fetch, step + 1)}
        return future.result()

    def close(self) -> None:
        """Stop the thread (a later :meth:`get` starts a new one)."""
        self.pending.clear()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None


class Trainer:
    """Holds the state of one run; :meth:`fit` trains until ``config.train.steps``."""

    def __init__(self, config: Config, run_dir: Path, state: dict[str, Any] | None = None,
                 state_path: Path | None = None):
        self.task = get_task(config)
        if state is None:  # a new run: the task may complete its config (a diffusion run copies its VAE's)
            config = fit_warmup(self.task.prepare_config())
            self.task = get_task(config)
        self.config = config
        self.run_dir = Path(run_dir)
        cfg = config.train
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        device = pick_device(cfg.device)
        if device.type == "cpu" and cfg.precision == "bf16" and not cpu_has_native_bf16():
            print("warning: train.precision=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is emulated and "
                  "slower than fp32: consider --set train.precision=fp32", file=sys.stderr)
        self.dist = distributed.init(device)  # a no-op unless started by torchrun
        self.device = distributed.rank_device(device, self.dist)
        distributed.check_batch_size(cfg.batch_size, self.dist)
        torch.manual_seed(cfg.seed)
        with distributed.main_first(self.dist):  # under torchrun rank 0 prepares (caches) the data, the others reuse it
            self.train_set: ArrayDataset = build_dataset(config.data, "train")
            self.val_set: ArrayDataset = build_dataset(config.data, "val")
        if len(self.train_set) == 0:
            raise UserError(f"the train split of dataset {config.data.name!r} is empty")
        skipped = list(dict.fromkeys(self.train_set.info.get("skipped_files", [])
                                     + self.val_set.info.get("skipped_files", [])))
        if skipped and self.dist.is_main:  # data.skip_bad=true: say which files were left out, and why
            atomic_write_text(self.run_dir / "skipped_files.txt", "\n".join(skipped) + "\n")
        self.model = prepare_model(self.task.build_model(), self.device)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # after the data and the model: only the steps' tensors come and go from here on
        self.step = 0
        self.best_val = math.inf
        self.train_seconds = 0.0  # time spent in training steps so far (over every session of the run)
        self.saved_steps: dict[str, int] = {}  # checkpoint name -> step it holds
        if state is not None:  # resumed from this run's last.pt, or branched from another run's ``state_path``
            last = state_path or self.run_dir / "checkpoints" / "last.pt"
            try:
                load_weights(self.model, state["model"], last)
            except UserError as exc:
                if state_path is None or non_finite_weights(state["model"]):  # a diverged source: said as it is
                    raise
                raise UserError(f"--from {state_path}: its weights do not fit the branch's model (a --set key changed "
                                f"the architecture): {exc}") from None
            self._load_optimizer(state["optimizer"], last, branched=state_path is not None)
            self.step = int(state["step"])
            self.best_val = float(state.get("best_val", math.inf))
            self.train_seconds = float(state.get("train_seconds", 0.0))
            if state_path is None:
                self.saved_steps["last"] = self.step
        # The task checks the data and, for a new run, may start from trained weights (VQ-SA, the diffusion VAE).
        self.task.start_training(self.model, self.train_set, fresh=state is None)
        # The training loss: model.compute_loss, wrapped in DDP for torchrun and compiled with train.compile.
        self.loss_fn = build_loss_fn(self.model, cfg, self.device, self.dist)
        # Overlapping the data gather with the step pays on a GPU; on CPU it would only take cores from the step.
        self.prefetcher = BatchPrefetcher(self.fetch_batch) if self.device.type == "cuda" else None
        self.log = MetricsLog(self.run_dir, cfg.loggers, config_to_dict(config)) if self.dist.is_main else None
        self.stop_signal: str | None = None
        self.preview = None  # the mask picture of the last validation (for the trackers)
        self.guard = FiniteGuard(self.device)
        self.check_every_step = self.device.type != "cuda"  # a host-device sync costs nothing on the CPU

    def _load_optimizer(self, saved: Any, path: Path, branched: bool) -> None:
        """Load the checkpoint's optimiser moments (``saved``, from ``path``) under this config's group settings.

        The settings (learning rate, fused, ...) are this config's: a branch's own, or this machine's on a resume
        moved to another device. They go in before the loading, which places the step counters where these settings
        want them (a fused Adam on a GPU: on the GPU).
        """
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if isinstance(groups, list) and len(groups) == len(settings):
            saved = {**saved, "param_groups": [{**group, **fresh} for group, fresh in zip(groups, settings)]}
        elif branched and isinstance(groups, list):
            raise UserError(f"--from {path}: a branch cannot turn train.decoder_lr_scale on or off (the optimiser's "
                            "parameter groups differ); another scale than the source's is fine")
        try:
            self.optimizer.load_state_dict(saved)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise UserError(f"checkpoint {path}: optimizer state does not fit the model ({first_line(exc)})") from None

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "config": config_to_dict(self.config),
            "best_val": self.best_val,
            "train_seconds": self.train_seconds,
        }

    def check_finite(self) -> None:
        """Raise :class:`TrainingError` if any step so far had a non-finite loss or gradient norm, or if the weights
        are not finite; names the bad step and the last good checkpoint, which stays on disk."""
        bad = self.guard.bad_step()
        if bad is not None:
            name, step = bad
            raise TrainingError(f"the {name.replace('_', ' ')} became non-finite at step {step}; training stopped "
                                f"there. {self._kept_checkpoint()}")
        weights = non_finite_weights(self.model.state_dict())
        if weights:
            raise TrainingError(f"the weights became non-finite by step {self.step} ({weights[0]}); training stopped "
                                f"there. {self._kept_checkpoint()}")

    def _kept_checkpoint(self) -> str:
        folder = self.run_dir / "checkpoints"
        if "last" in self.saved_steps:
            return (f"The last good checkpoint, {folder / 'last.pt'} (step {self.saved_steps['last']}), is kept; "
                    "lower train.lr or raise train.grad_clip before resuming.")
        return "No checkpoint had been written yet."

    def save(self, *names: str) -> None:
        """Write checkpoints ``names`` (atomically, the state serialised once), only after checking that the run is
        still finite."""
        self.check_finite()
        data = checkpoint_bytes(self.state_dict())
        for name in names:
            atomic_write_bytes(self.run_dir / "checkpoints" / f"{name}.pt", data)
            self.saved_steps[name] = self.step

    # ------------------------------------------------------------------------------------------------ steps
    def fetch_batch(self, step: int) -> dict[str, torch.Tensor]:
        """The raw uint8 batch of ``step`` (this process's slice of the global batch), pinned for a CUDA copy."""
        cfg = self.config.train
        indices = batch_indices(len(self.train_set), cfg.batch_size, step, cfg.seed)
        raw = self.train_set.batch(distributed.shard_indices(indices, self.dist))
        if self.device.type == "cuda":
            raw = {name: value.pin_memory() for name, value in raw.items()}
        return raw

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimisation step on the batch of ``self.step``; the logs stay on the device (no sync)."""
        cfg = self.config.train
        torch.manual_seed(step_seed(cfg.seed, self.step))
        raw = self.prefetcher.get(self.step) if self.prefetcher else self.fetch_batch(self.step)
        batch = to_model_batch(raw, self.device, non_blocking=True)  # normalised on the device
        budget = self.budget_progress()
        lr = lr_at(self.step, cfg, budget)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.model.train()
        if hasattr(self.model, "set_step"):  # step-dependent schedules inside the model (the decoder's octave fade)
            self.model.set_step(self.step)
        if hasattr(self.model, "set_progress"):  # fraction-of-training switches inside the model (mask agreement)
            self.model.set_progress(self.training_progress(budget))
        with autocast_context(self.device, cfg.precision), batch_shard(self.dist.rank, self.dist.world_size):
            loss, logs = self.loss_fn(batch, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:  # returns the norm as a device tensor: no sync
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.task.after_optimizer_step(self.model, self.step)
        logs["loss"] = loss.detach()
        logs["lr"] = torch.tensor(lr)
        return logs

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean val loss over the first ``val_batches`` batches of the val split, plus the task's validation scores
        (ARI, FG-ARI, mIoU, mBO, MSE for slot models)."""
        cfg = self.config.train
        self.model.eval()
        losses, scorer = [], self.task.validator(self.model, self.val_set)
        rng_state = torch.get_rng_state()
        torch.manual_seed(cfg.seed + 12345)  # the same slot noise at every validation
        for indices, batch in self.val_set.batches(cfg.val_batches * cfg.batch_size, cfg.batch_size, self.device):
            with autocast_context(self.device, cfg.precision):
                loss, _ = self.model.compute_loss(batch, self.step)
                scorer.update(batch, indices)
            losses.append(float(loss))
        torch.set_rng_state(rng_state)
        result = {"loss": float(np.mean(losses)) if losses else math.nan}
        result.update({name: value for name, value in scorer.summary().items() if isinstance(value, (int, float))})
        self.preview = getattr(scorer, "preview", None)  # the mask picture the trackers get
        return result

    # ------------------------------------------------------------------------------------------------ loop
    def _on_signal(self, signum, _frame) -> None:
        """SIGTERM / first Ctrl-C: finish the step, save ``last``, exit. A second Ctrl-C interrupts at once."""
        self.stop_signal = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def budget_progress(self) -> float | None:
        """Fraction of ``train.time_budget`` used so far (None without a budget)."""
        budget = self.config.train.time_budget
        return self.train_seconds / (budget * 60.0) if budget > 0 else None

    def training_progress(self, budget: float | None) -> float:
        """Fraction of training done: of ``train.steps``, or of ``train.time_budget`` (``budget``, from
        :meth:`budget_progress`) when that runs out first: the clock the cosine learning rate ends with (the cosine
        itself counts its progress from the end of the warm-up, so the two differ over the warm-up's steps)."""
        by_steps = self.step / max(1, self.config.train.steps)
        return by_steps if budget is None else max(by_steps, budget)

    def out_of_time(self) -> bool:
        progress = self.budget_progress()
        return progress is not None and progress >= 1.0

    def fit(self) -> dict[str, Any]:
        """Train until ``train.steps`` (or ``train.time_budget``); returns the last validation record (empty on ranks
        other than 0). An error ends the trackers' runs as failed (Ctrl-C: killed) before it propagates."""
        try:
            return self._fit()
        except BaseException as error:
            if self.log is not None:
                try:
                    self.log.close("killed" if isinstance(error, KeyboardInterrupt) else "failed")
                except Exception as close_error:  # noqa: BLE001 - said, but never in place of the error itself
                    warnings.warn(f"could not close the tracker runs: {close_error}", stacklevel=2)
            raise

    def _fit(self) -> dict[str, Any]:
        cfg = self.config.train
        main = self.dist.is_main
        if main:
            self.log.truncate_after(self.step)
            print(self.describe(), flush=True)
            self.log.open()
        # Signals only set a flag, so a step is never cut in half: the saved state is always that of a whole step.
        previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        # With a time budget the bar counts steps without a total (the budget, not train.steps, ends the run).
        progress = tqdm(total=None if cfg.time_budget else cfg.steps, initial=self.step, desc="train",
                        dynamic_ncols=True, mininterval=1.0, disable=not main)
        last_val: dict[str, Any] = {}
        window_start, window_images = time.perf_counter(), 0
        own_clock = not self.dist.enabled
        budget_stop = False
        try:
            while self.step < cfg.steps and not (own_clock and self.out_of_time()):
                step_start = time.perf_counter()
                logs = self.train_step()
                self.step += 1
                self.guard.update(logs, self.step)
                if self.check_every_step:
                    self.check_finite()
                self.train_seconds += time.perf_counter() - step_start
                window_images += cfg.batch_size
                progress.update(1)
                is_last = self.step == cfg.steps or (own_clock and self.out_of_time())
                is_log = self.step % cfg.log_every == 0 or is_last
                is_val = self.step % cfg.val_every == 0 or is_last
                is_kept = cfg.keep_every > 0 and self.step % cfg.keep_every == 0
                is_ckpt = self.step % cfg.ckpt_every == 0 or is_last or is_kept
                # Data-parallel ranks end on rank 0's clock, where they agree to stop (below).
                stop = self.stop_signal is not None or (not own_clock and main and self.out_of_time())
                if is_log or is_val or is_ckpt:
                    # The step's values come back to the host only here (averaged over the ranks), after the
                    # finiteness check: a checkpoint never holds the weights of a bad step. The ranks also agree here
                    # on stopping, so that all of them leave at the same step.
                    self.check_finite()
                    values, stop = distributed.reduce_logs(logs, self.dist, self.device, stop)
                    if is_log and main:
                        elapsed = time.perf_counter() - window_start
                        values["images_per_s"] = window_images / max(elapsed, 1e-9)
                        values["epoch"] = self.step * cfg.batch_size / len(self.train_set)
                        values["train_minutes"] = self.train_seconds / 60.0
                        window_start, window_images = time.perf_counter(), 0
                        self.log.log(self.step, "train", values)
                        used = {"min": f"{self.train_seconds / 60:.1f}/{cfg.time_budget:g}"} if cfg.time_budget else {}
                        progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.0f}",
                                             **used)
                elif self.dist.enabled:
                    stop = False  # another rank may have been signalled later: wait for the next agreement
                if is_val and main:
                    last_val = self.validate_and_log()
                if is_ckpt and main:
                    self.save("last", *([f"step-{self.step}"] if is_kept else []))
                if stop:
                    budget_stop = self.stop_signal is None and main and self.out_of_time()
                    if not budget_stop:
                        self.stop_signal = self.stop_signal or "a signal to another rank"
                    break
        finally:  # (a second Ctrl-C raises KeyboardInterrupt mid-step: the last periodic checkpoint is kept as is)
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            progress.close()
            if self.prefetcher is not None:
                self.prefetcher.close()
        if self.stop_signal:
            if main:
                self.save("last")  # checks finiteness first: a diverged run never overwrites its good checkpoint
                print(f"stopped by {self.stop_signal} at step {self.step}; checkpoint saved. "
                      f"Resume with: slotlab train --resume {self.run_dir}")
        elif main and self.out_of_time():
            if budget_stop and self.saved_steps.get("last") != self.step:  # end like a finished run
                last_val = self.validate_and_log()
                self.save("last")
            print(f"train.time_budget of {cfg.time_budget:g} minutes used up at step {self.step}")
        if main:
            self.log.close("killed" if self.stop_signal else "finished")
            from slotlab.report.plots import plot_curves

            plot_curves(self.run_dir)
            if not self.stop_signal:
                print(self.summary(last_val), flush=True)
        return last_val

    def describe(self) -> str:
        """The start-up line: what is trained, on what, where, for how long."""
        config, cfg = self.config, self.config.train
        length = f"{cfg.time_budget:g} minutes of training" if cfg.time_budget else f"{cfg.steps} steps"
        start = f" from step {self.step}" if self.step else ""
        return (f"slotlab train: preset {config.preset} (task {config.task}, {config.model.num_slots} slots) on "
                f"{config.data.name} {config.data.resolution}x{config.data.resolution}: {len(self.train_set)} train / "
                f"{len(self.val_set)} val images; {length}{start} at batch {cfg.batch_size}; device {self.device} "
                f"({torch.get_num_threads()} threads, {self.precision_name()}); run directory {self.run_dir}"
                + "".join(f"\n  {name} split by {dataset.info['split_by']}"
                          for name, dataset in (("train", self.train_set), ("val", self.val_set))
                          if "split_by" in dataset.info)
                + (f"\n  cache: {self.train_set.info['cache_dir']}" if self.train_set.info.get("cache_dir") else ""))

    def precision_name(self) -> str:
        """``bf16`` when training runs under bf16 autocast, else ``fp32``."""
        autocast = autocast_context(self.device, self.config.train.precision)
        return "bf16" if isinstance(autocast, torch.autocast) else "fp32"

    def summary(self, last_val: dict[str, Any]) -> str:
        """The closing lines: where the run stands, where its files are, what to run next."""
        scores = ", ".join(f"{name} {last_val[name]:.4f}" for name in ("loss", "fg_ari", "ari", "mbo", "psnr")
                           if isinstance(last_val.get(name), float))
        return (f"done: step {self.step}, {self.train_seconds / 60:.1f} training minutes"
                f"{f'; last validation: {scores}' if scores else ''}\n"
                f"files: {self.run_dir}/config.json, checkpoints/best.pt and last.pt, metrics.jsonl, curves.png, tb/\n"
                f"next: slotlab eval {self.run_dir} && slotlab report {self.run_dir}")

    def validate_and_log(self) -> dict[str, Any]:
        """Validate, append the record to the log, and save ``best`` when the val loss is the lowest so far."""
        record = self.validate()
        record["epoch"] = self.step * self.config.train.batch_size / len(self.train_set)
        record["train_minutes"] = self.train_seconds / 60.0
        self.log.log(self.step, "val", record)
        if self.preview is not None:
            self.log.picture(self.step, "val/masks", self.preview)
        if record["loss"] < self.best_val:
            self.best_val = record["loss"]
            self.save("best")
        return record


def _own(run_dir: Path):
    """The run directory's lock, held by the process that writes it (rank 0 under torchrun)."""
    return RunLock(run_dir) if distributed.env_rank() == 0 else nullcontext()


def fit_warmup(config: Config) -> Config:
    """A warm-up as long as the run would never reach the peak LR: scale it to a tenth of the run, and say so."""
    cfg = config.train
    if cfg.time_budget or cfg.warmup_steps < cfg.steps:
        return config
    warmup = cfg.steps // 10
    print(f"warning: train.warmup_steps={cfg.warmup_steps} is not below train.steps={cfg.steps}: the warm-up is "
          f"scaled to {warmup} steps (a tenth of the run)", file=sys.stderr)
    return replace(config, train=replace(cfg, warmup_steps=warmup))


def train(config: Config, run_dir: Path) -> Trainer:
    """Start a new run in ``run_dir`` and train it.

    ``run_dir`` must not hold a run (a checkpoint) or files of anything else; the leftovers of a start that failed
    before its first checkpoint are cleared. The directory is locked for the whole run (:class:`~slotlab.runs.RunLock`).
    """
    return _start(config, Path(run_dir))


def branch(source: Path, run_dir: Path, overrides: list[str] | None = None, checkpoint: str = "last") -> Trainer:
    """Start a new run in ``run_dir`` from the ``checkpoint`` of the run in ``source``, with ``overrides`` of any key,
    and train it: ``slotlab train --from SOURCE --out RUN_DIR --set KEY=VALUE``.

    The new run goes on where that checkpoint left the source (weights, optimiser, step and training time, so the
    learning-rate schedule and the time budget continue) under the changed config, for a late switch (the mask
    agreement from a given step) or a fine-tune on other data. Its ``metrics.jsonl`` starts with the source's records
    up to that step, so its curves show the whole history; ``branched_from.json`` names the source, checkpoint, step
    and overrides; its ``best`` checkpoint is the best since the branch. The source is only read. A changed key that
    the weights cannot follow (another architecture) is refused by the weights' loading, before anything is trained.
    """
    source, overrides = Path(source), list(overrides or [])
    config, state, path = prepare_branch(source, Path(run_dir), overrides, checkpoint)
    state = {**state, "best_val": math.inf}  # the new run's best is over its own validations
    origin = {"run": str(source.resolve()), "checkpoint": checkpoint, "step": int(state["step"]),
              "overrides": overrides}
    return _start(config, Path(run_dir), state, path, origin)


def prepare_branch(source: Path, run_dir: Path, overrides: list[str], checkpoint: str = "last"
                   ) -> tuple[Config, dict[str, Any], Path]:
    """The checks of :func:`branch` before anything is written: the branch's config, the source's checkpoint state
    and its path. Refuses a source that is the new run's folder or an exported model, and a branch with nothing left
    to train (the source's step at ``train.steps``, or its time budget used up)."""
    source, run_dir = Path(source), Path(run_dir)
    if source.resolve() == run_dir.resolve():
        raise UserError(f"--from {source} and --out {run_dir} are the same folder: use --resume to continue a run")
    if is_exported(source):
        raise UserError(f"--from {source} is an exported model (weights only, no optimiser or step): branch from the "
                        "run directory it was exported from")
    path = checkpoint_path(source, checkpoint)
    config, state = load_run(source, checkpoint)
    config = apply_overrides(config, overrides)
    step, cfg = int(state["step"]), config.train
    if step >= cfg.steps:
        raise UserError(f"--from {path} is at step {step} and train.steps={cfg.steps}: nothing left to train "
                        "(raise it: --set train.steps=N)")
    minutes = float(state.get("train_seconds", 0.0)) / 60.0
    if cfg.time_budget and minutes >= cfg.time_budget:
        raise UserError(f"--from {path} has trained {minutes:.1f} minutes of train.time_budget={cfg.time_budget:g}: "
                        "nothing left to train (raise it: --set train.time_budget=MINUTES)")
    return config, state, path


def _start(config: Config, run_dir: Path, state: dict[str, Any] | None = None, state_path: Path | None = None,
           origin: dict[str, Any] | None = None) -> Trainer:
    """A new run in ``run_dir``: from scratch, or (``state``) branched from another run (``origin``: where from) at
    its checkpoint ``state_path``."""
    check_new_run_dir(run_dir)  # every rank, before rank 0 writes anything
    created = not run_dir.exists()
    try:
        with _own(run_dir):
            # Only the owner of the lock may clean up: a process refused by the lock must not remove the folder of
            # the run that holds it, even when both saw the folder missing before they started.
            try:
                if distributed.env_rank() == 0:
                    check_new_run_dir(run_dir)  # again, now that no other process can be writing it
                    clear_start_leftovers(run_dir)
                # Under torchrun the ranks meet in DDP's set-up inside Trainer(), after every rank checked run_dir.
                trainer = Trainer(config, run_dir, state, state_path)
                if trainer.dist.is_main:
                    save_config(trainer.config, run_dir / "config.json")
                    if origin is not None:  # a branch: where it came from, and the source's history (fit() drops
                        # the records past the branch's step, as for a resumed run)
                        atomic_write_text(run_dir / BRANCH_RECORD, json.dumps(origin, indent=1) + "\n")
                        source_metrics = Path(origin["run"]) / "metrics.jsonl"
                        if source_metrics.exists():
                            shutil.copyfile(source_metrics, run_dir / "metrics.jsonl")
                trainer.fit()
            except BaseException:
                if created and distributed.env_rank() == 0 and not has_checkpoint(run_dir):
                    shutil.rmtree(run_dir, ignore_errors=True)  # a start that failed leaves nothing behind
                raise
    finally:
        distributed.shutdown()
    return trainer


def resume(run_dir: Path, overrides: list[str] | None = None) -> Trainer:
    """Continue a run from ``checkpoints/last.pt``.

    Only the overrides in :data:`~slotlab.config.RESUME_SAFE_KEYS` are accepted (``train.steps``, logging,
    validation, checkpointing, device, ...): anything else would make the run a mix of two configurations.
    """
    run_dir = Path(run_dir)
    overrides = resume_overrides(overrides or [])
    checkpoint_path(run_dir, "last")  # a run to resume, before the lock creates anything
    try:
        with _own(run_dir):
            config, state = load_run(run_dir, "last")
            config = apply_overrides(config, overrides)
            trainer = Trainer(config, run_dir, state)
            if trainer.dist.is_main:
                save_config(config, run_dir / "config.json")
            trainer.fit()
    finally:
        distributed.shutdown()
    return trainer
