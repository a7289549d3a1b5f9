"""SLATE's two stages as tasks: ``dvae`` (the discrete VAE over 4x4 patches) and ``slate`` (slots decoded by an
autoregressive transformer over the dVAE's tokens).

A ``slate`` run is self-contained, like a slot-diffusion run: when it starts, the architecture of its dVAE
(``slate.dvae_run``) is copied into its own config and the dVAE's weights into its model, so every checkpoint holds
them and the run never reads ``dvae_run`` again.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from slotlab.config import Config
from slotlab.diffusion.vae import VAEEvaluator
from slotlab.errors import UserError
from slotlab.io import load_weights
from slotlab.models import DiscreteVAE, Slate
from slotlab.runs import read_stage_run
from slotlab.tasks import Task, register
from slotlab.tasks.autoencoder import ObjectDiscoveryEvaluator

DVAE_KEYS = ("vocab_size", "dvae_channels", "tau_start", "tau_end", "tau_steps")


def read_dvae_run(run_dir: str) -> tuple[Config, dict, Path]:
    """The config, checkpoint (``best``, else ``last``) and weights file of a ``task=dvae`` run directory."""
    return read_stage_run(run_dir, "slate.dvae_run", "dvae")


@register("dvae")
class DiscreteVAETask(Task):
    """:class:`~slotlab.models.DiscreteVAE` trained by reconstruction from relaxed tokens; scored by MSE and PSNR of
    the reconstruction from its argmax tokens (what stage 2 sees)."""

    def build_model(self) -> nn.Module:
        return DiscreteVAE(self.config)

    def evaluator(self, model: nn.Module, dataset: Any = None, out_dir: Path | None = None) -> VAEEvaluator:
        return VAEEvaluator(model, out_dir)


@register("slate")
class SlateTask(Task):
    """:class:`~slotlab.models.Slate`; masks for ARI come from the last Slot Attention iteration."""

    def prepare_config(self) -> Config:
        if not self.config.slate.dvae_run:
            return self.config
        dvae_config, _, _ = read_dvae_run(self.config.slate.dvae_run)
        if dvae_config.data.resolution != self.config.data.resolution:
            raise UserError(f"slate.dvae_run={self.config.slate.dvae_run!r} was trained at "
                            f"{dvae_config.data.resolution}x{dvae_config.data.resolution}, this run is at "
                            f"data.resolution={self.config.data.resolution}")
        dvae = {key: getattr(dvae_config.slate, key) for key in DVAE_KEYS}
        return replace(self.config, slate=replace(self.config.slate, **dvae))  # rebuilt from the run's own config

    def build_model(self) -> nn.Module:
        return Slate(self.config)

    def start_training(self, model: nn.Module, train_set: Any, fresh: bool) -> None:
        if fresh and self.config.slate.dvae_run:  # read once; from now on the weights live in the checkpoints
            _, state, path = read_dvae_run(self.config.slate.dvae_run)
            load_weights(model.dvae, state["model"], path)

    def evaluator(self, model: nn.Module, dataset: Any = None, out_dir: Path | None = None):
        return ObjectDiscoveryEvaluator(model, out_dir)

    def validator(self, model: nn.Module, dataset: Any = None):
        return ObjectDiscoveryEvaluator(model, masks_only=True)  # no sampling during training
