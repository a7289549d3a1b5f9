"""Slot-conditioned latent diffusion (Part 2, SlotDiffusion): Slot Attention slots decoded by a diffusion UNet.

A run is self-contained: when it starts, the architecture of its stage-1 VAE (``diffusion.vae_run``) is copied into
its own config (``vae``) and the VAE's weights into its model, so every checkpoint holds them; evaluating, composing
or reporting the run never reads ``vae_run`` again, and the run directory can be moved anywhere.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from slotlab.config import Config
from slotlab.diffusion.slot_diffusion import SlotDiffusion, read_vae_run
from slotlab.io import load_weights
from slotlab.tasks import Task, register
from slotlab.tasks.autoencoder import ObjectDiscoveryEvaluator


@register("slot_diffusion")
class SlotDiffusionTask(Task):
    """:class:`~slotlab.diffusion.SlotDiffusion`; masks for ARI come from the last Slot Attention iteration."""

    def prepare_config(self) -> Config:
        if not self.config.diffusion.vae_run:
            return self.config
        vae_config, _, _ = read_vae_run(self.config.diffusion.vae_run)
        return replace(self.config, vae=vae_config.vae)  # the run rebuilds its VAE from its own config

    def build_model(self) -> nn.Module:
        return SlotDiffusion(self.config)

    def start_training(self, model: nn.Module, train_set: Any, fresh: bool) -> None:
        if fresh and self.config.diffusion.vae_run:  # read once; from now on the weights live in the checkpoints
            _, state, path = read_vae_run(self.config.diffusion.vae_run)
            load_weights(model.vae, state["model"], path)

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        model.after_optimizer_step(step)  # the EMA of the denoiser

    def evaluator(self, model: nn.Module, dataset: Any = None, out_dir: Path | None = None):
        return ObjectDiscoveryEvaluator(model, out_dir)

    def validator(self, model: nn.Module, dataset: Any = None):
        return ObjectDiscoveryEvaluator(model, masks_only=True)  # no sampling during training
