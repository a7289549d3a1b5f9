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
"""

from __future__ import annotations

import math
import signal
import time
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
from slotlab.train.checkpoint import load_checkpoint, save_checkpoint
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


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.lr)


class Trainer:
    """Holds the state of one run; :meth:`fit` trains until ``config.train.steps``."""

    def __init__(self, config: Config, run_dir: Path, state: dict[str, Any] | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        cfg = config.train
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.train_set: ArrayDataset = build_dataset(config.data, "train")
        self.val_set: ArrayDataset = build_dataset(config.data, "val")
        if len(self.train_set) == 0:
            raise UserError(f"the train split of dataset {config.data.name!r} is empty")
        self.model = build_model(config).to(self.device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.step = 0
        self.best_val = math.inf
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
            self.best_val = float(state.get("best_val", math.inf))
        # torch.compile of the loss (forward pass) for the CUDA recipe; off by default and on CPU tests.
        self.loss_fn = torch.compile(self.model.compute_loss) if cfg.compile else self.model.compute_loss
        self.log = MetricsLog(self.run_dir)
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
    def train_step(self) -> dict[str, torch.Tensor]:
        cfg = self.config.train
        torch.manual_seed(step_seed(cfg.seed, self.step))
        indices = batch_indices(len(self.train_set), cfg.batch_size, self.step, cfg.seed)
        batch = to_model_batch(self.train_set.batch(indices), self.device, non_blocking=True)
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with autocast_context(self.device, cfg.precision):
            loss, logs = self.loss_fn(batch, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
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
        self.stop_signal = signal.Signals(signum).name

    def fit(self) -> dict[str, Any]:
        """Train until ``train.steps``; returns the last validation record."""
        cfg = self.config.train
        self.log.truncate_after(self.step)
        previous_handler = signal.signal(signal.SIGTERM, self._on_signal)
        progress = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True, mininterval=1.0)
        last_val: dict[str, Any] = {}
        window_start, window_images = time.perf_counter(), 0
        try:
            while self.step < cfg.steps:
                logs = self.train_step()
                self.step += 1
                window_images += cfg.batch_size
                progress.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    values = {k: float(v) for k, v in logs.items()}  # the only host-device sync of the step
                    if not math.isfinite(values["loss"]):
                        raise TrainingError(
                            f"loss is {values['loss']} at step {self.step}; stopped, keeping the last good "
                            f"checkpoint in {self.run_dir / 'checkpoints'}")
                    elapsed = time.perf_counter() - window_start
                    values["images_per_s"] = window_images / max(elapsed, 1e-9)
                    values["epoch"] = self.step * cfg.batch_size / len(self.train_set)
                    window_start, window_images = time.perf_counter(), 0
                    self.log.log(self.step, "train", values)
                    progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.0f}")
                if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                    last_val = self.validate()
                    last_val["epoch"] = self.step * cfg.batch_size / len(self.train_set)
                    self.log.log(self.step, "val", last_val)
                    if last_val["loss"] < self.best_val:
                        self.best_val = last_val["loss"]
                        self.save("best")
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    self.save("last")
                if self.stop_signal:
                    break
        except KeyboardInterrupt:
            self.stop_signal = "SIGINT"
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
            progress.close()
        if self.stop_signal:
            self.save("last")
            print(f"stopped by {self.stop_signal} at step {self.step}; checkpoint saved. "
                  f"Resume with: slotlab train --resume {self.run_dir}")
        self.log.close()
        from slotlab.report.plots import plot_curves

        plot_curves(self.run_dir)
        return last_val


def train(config: Config, run_dir: Path) -> Trainer:
    """Start a new run in ``run_dir`` (which must not hold a run already) and train it."""
    run_dir = Path(run_dir)
    if (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists():
        raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or choose another --out")
    trainer = Trainer(config, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.json")
    trainer.fit()
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
    trainer = Trainer(config, run_dir, state)
    save_config(config, run_dir / "config.json")
    trainer.fit()
    return trainer
