"""Tasks: what a run trains and how it is scored, one registered object per kind of run.

A :class:`Task` says how to build its model, what to check and prepare when training starts, and how to evaluate
batches (an :class:`Evaluator`: ``update(batch)`` per batch, ``summary()`` at the end). The trainer
(:mod:`slotlab.train`) and ``slotlab eval`` (:mod:`slotlab.evaluate`) call only this interface; they name no task.

==================  =================================================  =====================================
``config.task``     model                                              evaluation
==================  =================================================  =====================================
``autoencoder``     :class:`~slotlab.models.SlotAutoencoder` (+ VQ-SA)  ARI, FG-ARI, mIoU, mBO, MSE (+ NMI)
``vae``             :class:`~slotlab.diffusion.vae.ImageVAE`            MSE, PSNR
``slot_diffusion``  :class:`~slotlab.diffusion.SlotDiffusion`           ARI, FG-ARI, mIoU, mBO, MSE
``setpred``         :class:`~slotlab.models.set_prediction.SetPredictionModel`  AP at distance thresholds
``dvae``            :class:`~slotlab.models.DiscreteVAE` (SLATE stage 1)  MSE, PSNR
``slate``           :class:`~slotlab.models.Slate`                      ARI, FG-ARI, mIoU, mBO, MSE
==================  =================================================  =====================================

Task modules are imported only when their task is asked for, so that heavy optional parts (diffusers) load only for
the runs that need them.

May import the layers below it: ``diffusion``, ``models``, ``metrics``, ``report``, ``data``, ``runs``, ``config``,
``io``, ``registry``, ``errors``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from slotlab.config import Config
from slotlab.errors import UserError
from slotlab.io import load_weights
from slotlab.runs import choose_checkpoint, load_run, pick_device, weights_file

TASK_MODULES = {
    "autoencoder": "slotlab.tasks.autoencoder",
    "vae": "slotlab.tasks.vae",
    "slot_diffusion": "slotlab.tasks.slot_diffusion",
    "setpred": "slotlab.tasks.set_prediction",
    "dvae": "slotlab.tasks.slate",
    "slate": "slotlab.tasks.slate",
}
_TASKS: dict[str, type[Task]] = {}


class Evaluator(Protocol):
    """Scores a model batch by batch: ``update`` for each batch of a split, ``summary`` once at the end."""

    def update(self, batch: dict[str, torch.Tensor], indices: Any) -> None: ...

    def summary(self) -> dict[str, Any]: ...


class Task:
    """One kind of run (subclass and :func:`register`).

    Args:
        config: the run's resolved config.
    """

    name = ""

    def __init__(self, config: Config):
        self.config = config

    def prepare_config(self) -> Config:
        """The config a new run is saved with: a task may copy in what the run needs later (default: unchanged)."""
        return self.config

    def build_model(self) -> nn.Module:
        """A freshly initialised model offering ``compute_loss(batch, step) -> (loss, logs)``."""
        raise NotImplementedError

    def start_training(self, model: nn.Module, train_set: Any, fresh: bool) -> None:
        """Called once before training (``fresh``: a new run, not a resumed one): check the data, load weights."""

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimiser step (e.g. to update an EMA)."""

    def evaluator(self, model: nn.Module, dataset: Any = None, out_dir: Path | None = None) -> Evaluator:
        """An evaluator for ``model`` on batches of ``dataset`` (for its ``info``); with ``out_dir`` it also writes
        its pictures and tables there."""
        raise NotImplementedError

    def validator(self, model: nn.Module, dataset: Any = None) -> Evaluator:
        """The evaluator of the trainer's periodic validation (default: :meth:`evaluator` without pictures)."""
        return self.evaluator(model, dataset)


def register(name: str):
    """Class decorator: ``@register("autoencoder") class AutoencoderTask(Task)``."""

    def decorator(cls: type[Task]) -> type[Task]:
        cls.name = name
        _TASKS[name] = cls
        return cls

    return decorator


def get_task(config: Config) -> Task:
    """The :class:`Task` of ``config.task``."""
    if config.task not in TASK_MODULES:
        raise UserError(f"unknown task {config.task!r} (known: {', '.join(sorted(TASK_MODULES))})")
    importlib.import_module(TASK_MODULES[config.task])
    return _TASKS[config.task](config)


def build_model(config: Config) -> nn.Module:
    """The freshly initialised model of ``config.task``."""
    return get_task(config).build_model()


def load_trained_model(run_dir: Path, checkpoint: str = "best", device: str = "auto") -> tuple[Config, nn.Module]:
    """Rebuild a run's model from its run directory alone; returns ``(config, model)`` in eval mode.

    ``checkpoint="best"`` falls back to ``last`` when the run has no best checkpoint yet.
    """
    run_dir = Path(run_dir)
    checkpoint = choose_checkpoint(run_dir, checkpoint)
    config, state = load_run(run_dir, checkpoint)
    model = build_model(config)
    load_weights(model, state["model"], weights_file(run_dir, checkpoint))
    model.to(pick_device(device)).eval()
    return config, model


def names() -> list[str]:
    return sorted(TASK_MODULES)


__all__ = ["Evaluator", "Task", "build_model", "get_task", "load_trained_model", "names", "register"]
