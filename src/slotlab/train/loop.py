"""One training loop for every task: ``config -> dataset -> model -> loss -> metrics -> run dir``.

Run directory layout::

    RUN_DIR/config.json              resolved config
    RUN_DIR/checkpoints/last.pt      latest state (atomic), used by --resume
    RUN_DIR/checkpoints/best.pt      lowest validation loss
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

import math
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from slotlab.config import Config, config_from_dict, config_to_dict, save_config
from slotlab.data import ArrayDataset, build_dataset, to_model_batch
from slotlab.errors import UserError
from slotlab.metrics import ARIMetric
from slotlab.models import build_model
from slotlab.train import distributed
from slotlab.train.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from slotlab.train.logging import MetricsLog
from slotlab.train.schedule import lr_at


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


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


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA (``auto`` or ``bf16``), nothing elsewhere."""
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
    """Adam over the trainable parameters; the fused CUDA kernel (one launch per step) on a GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.lr, fused=device is not None and device.type == "cuda")


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move ``model`` to ``device``; on CUDA also use channels-last (NHWC) convolution weights and fast kernels.

    Channels-last lets cuDNN run the bf16 convolutions on tensor cores without layout transposes. The uint8 batch
    arrives as ``[B, H, W, 3]``, so the permuted image :func:`~slotlab.data.to_model_batch` makes is already NHWC.
    """
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution algorithms once
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast
        torch.backends.cudnn.allow_tf32 = True
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

    def __init__(self, config: Config, run_dir: Path, state: dict[str, Any] | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        cfg = config.train
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        device = pick_device(cfg.device)
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
        self.model = prepare_model(build_model(config), self.device)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.step = 0
        self.best_val = math.inf
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
            self.best_val = float(state.get("best_val", math.inf))
        elif hasattr(self.model, "init_fresh_run"):  # optional hook, new runs only: e.g. start from a trained run
            self.model.init_fresh_run()
        # The training loss: model.compute_loss, wrapped in DDP for torchrun and compiled with train.compile.
        self.loss_fn = build_loss_fn(self.model, cfg, self.device, self.dist)
        # Overlapping the data gather with the step pays on a GPU; on CPU it would only take cores from the step.
        self.prefetcher = BatchPrefetcher(self.fetch_batch) if self.device.type == "cuda" else None
        self.log = MetricsLog(self.run_dir) if self.dist.is_main else None
        self.stop_signal: str | None = None

    # ------------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "config": config_to_dict(self.config),
            "best_val": self.best_val,
        }

    def save(self, name: str) -> None:
        save_checkpoint(self.run_dir / "checkpoints" / f"{name}.pt", self.state_dict())

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
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with autocast_context(self.device, cfg.precision), distributed.batch_shard(self.dist):
            loss, logs = self.loss_fn(batch, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:  # returns the norm as a device tensor: no sync
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if hasattr(self.model, "after_optimizer_step"):
            self.model.after_optimizer_step(self.step)
        logs["loss"] = loss.detach()
        logs["lr"] = torch.tensor(lr)
        return logs

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean val loss over ``val_batches`` fixed batches, plus ARI / FG-ARI when the model predicts masks."""
        cfg = self.config.train
        self.model.eval()
        losses, ari_metric = [], ARIMetric()
        has_masks = self.val_set.masks is not None and hasattr(self.model, "predict_masks")
        rng_state = torch.get_rng_state()
        torch.manual_seed(cfg.seed + 12345)  # the same slot noise at every validation
        for i in range(cfg.val_batches):
            indices = np.arange(i * cfg.batch_size, (i + 1) * cfg.batch_size) % max(1, len(self.val_set))
            if i * cfg.batch_size >= len(self.val_set):
                break
            batch = to_model_batch(self.val_set.batch(indices), self.device)
            with autocast_context(self.device, cfg.precision):
                loss, _ = self.model.compute_loss(batch, self.step)
                if has_masks:
                    ari_metric.update(self.model.predict_masks(batch["image"]).float(), batch["mask"])
            losses.append(float(loss))
        torch.set_rng_state(rng_state)
        result = {"loss": float(np.mean(losses)) if losses else math.nan}
        if has_masks and ari_metric.count:
            result.update(ari_metric.compute())
        return result

    # ------------------------------------------------------------------------------------------------ loop
    def _on_signal(self, signum, _frame) -> None:
        """SIGTERM / first Ctrl-C: finish the step, save ``last``, exit. A second Ctrl-C interrupts at once."""
        self.stop_signal = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _check_finite(self, values: dict[str, float]) -> None:
        for name in ("loss", "grad_norm"):  # a non-finite gradient norm would turn the weights into NaN
            if name in values and not math.isfinite(values[name]):
                raise TrainingError(
                    f"{name} is {values[name]} at step {self.step}; stopped, keeping the last good checkpoint in "
                    f"{self.run_dir / 'checkpoints'}")

    def fit(self) -> dict[str, Any]:
        """Train until ``train.steps``; returns the last validation record (empty on ranks other than 0)."""
        cfg = self.config.train
        main = self.dist.is_main
        if main:
            self.log.truncate_after(self.step)
        # Signals only set a flag, so a step is never cut in half: the saved state is always that of a whole step.
        previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        progress = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True, mininterval=1.0,
                        disable=not main)
        last_val: dict[str, Any] = {}
        window_start, window_images = time.perf_counter(), 0
        try:
            while self.step < cfg.steps:
                logs = self.train_step()
                self.step += 1
                window_images += cfg.batch_size
                progress.update(1)
                is_log = self.step % cfg.log_every == 0 or self.step == cfg.steps
                is_val = self.step % cfg.val_every == 0 or self.step == cfg.steps
                is_ckpt = self.step % cfg.ckpt_every == 0 or self.step == cfg.steps
                stop = self.stop_signal is not None
                if is_log or is_val or is_ckpt:
                    # The step's values come back to the host only here (averaged over the ranks), and are checked
                    # before anything is validated or saved: a checkpoint never holds the weights of a bad step.
                    # The ranks also agree here on stopping, so that all of them leave at the same step.
                    values, stop = distributed.reduce_logs(logs, self.dist, self.device, stop)
                    self._check_finite(values)
                    if is_log and main:
                        elapsed = time.perf_counter() - window_start
                        values["images_per_s"] = window_images / max(elapsed, 1e-9)
                        values["epoch"] = self.step * cfg.batch_size / len(self.train_set)
                        window_start, window_images = time.perf_counter(), 0
                        self.log.log(self.step, "train", values)
                        progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.0f}")
                elif self.dist.enabled:
                    stop = False  # another rank may have been signalled later: wait for the next agreement
                if is_val and main:
                    last_val = self.validate()
                    last_val["epoch"] = self.step * cfg.batch_size / len(self.train_set)
                    self.log.log(self.step, "val", last_val)
                    if last_val["loss"] < self.best_val:
                        self.best_val = last_val["loss"]
                        self.save("best")
                if is_ckpt and main:
                    self.save("last")
                if stop:
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
                self.save("last")
                print(f"stopped by {self.stop_signal} at step {self.step}; checkpoint saved. "
                      f"Resume with: slotlab train --resume {self.run_dir}")
        if main:
            self.log.close()
            from slotlab.report.plots import plot_curves

            plot_curves(self.run_dir)
        return last_val


def train(config: Config, run_dir: Path) -> Trainer:
    """Start a new run in ``run_dir`` (which must not hold a run already) and train it."""
    run_dir = Path(run_dir)
    if (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists():
        raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or choose another --out")
    try:
        # Under torchrun every rank has checked run_dir above before rank 0 writes to it: the ranks meet in DDP's
        # set-up inside Trainer() first.
        trainer = Trainer(config, run_dir)
        if trainer.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, run_dir / "config.json")
        trainer.fit()
    finally:
        distributed.shutdown()
    return trainer


def load_run(run_dir: Path, checkpoint: str = "last") -> tuple[Config, dict[str, Any]]:
    """The config and the named checkpoint (``last`` or ``best``) of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"missing run directory {run_dir}")
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.exists():
        raise UserError(f"run directory {run_dir} has no checkpoint {checkpoint}.pt (not trained yet?)")
    state = load_checkpoint(path)
    config = config_from_dict(state["config"], Config, str(path))
    return config, state


def resume(run_dir: Path, overrides: list[str] | None = None) -> Trainer:
    """Continue a run from ``checkpoints/last.pt``; overrides may change e.g. ``train.steps``."""
    from slotlab.config import apply_overrides

    run_dir = Path(run_dir)
    config, state = load_run(run_dir, "last")
    config = apply_overrides(config, overrides or [])
    try:
        trainer = Trainer(config, run_dir, state)
        if trainer.dist.is_main:
            save_config(config, run_dir / "config.json")
        trainer.fit()
    finally:
        distributed.shutdown()
    return trainer
