"""The stage-1 image autoencoder of the latent diffusion decoder (Part 2): diffusers' AutoencoderKL, scored by PSNR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slotlab.diffusion.vae import ImageVAE, VAEEvaluator
from slotlab.tasks import Task, register


@register("vae")
class VAETask(Task):
    """:class:`~slotlab.diffusion.vae.ImageVAE` trained by reconstruction + KL; no slots, so no masks to score."""

    def build_model(self) -> nn.Module:
        return ImageVAE(self.config)

    def evaluator(self, model: nn.Module, dataset: Any = None, out_dir: Path | None = None) -> VAEEvaluator:
        return VAEEvaluator(model, out_dir)
