"""Stage 1 of the latent diffusion decoder: a KL-regularised image autoencoder (task ``vae``).

diffusers' :class:`~diffusers.AutoencoderKL` is built from :class:`~slotlab.config.VAEConfig` (no pretrained weights:
it is trained here). With ``block_out_channels`` of length L it downsamples L - 1 times, so the default three
blocks map a 128x128x3 image to a 32x32x3 latent (report 002).

Loss (Rombach et al. 2022, without the perceptual and adversarial terms): reconstruction MSE plus ``kl_weight``
times the KL divergence of the posterior to N(0, I). Both are sums over an image's values in the paper, where
``kl_weight = 1e-6`` was tuned; here both are divided by the same ``3 * H * W``, which keeps that ratio and gives
losses of the size of a per-pixel MSE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from torch import nn
from torch.nn import functional as F

from slotlab.config import Config, VAEConfig


def norm_groups(channels: tuple[int, ...], most: int = 32) -> int:
    """The largest power of two up to ``most`` that divides every width (GroupNorm needs one)."""
    groups = most
    while groups > 1 and any(c % groups for c in channels):
        groups //= 2
    return groups


def build_autoencoder_kl(cfg: VAEConfig) -> AutoencoderKL:
    """An untrained :class:`~diffusers.AutoencoderKL` with ``len(block_out_channels) - 1`` downsamplings."""
    channels = tuple(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels, block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=cfg.layers_per_block, norm_num_groups=norm_groups(channels),
    )


@dataclass
class VAEOutput:
    """Forward pass of the image autoencoder."""

    recon: torch.Tensor  # [B, 3, H, W]
    latents: torch.Tensor  # [B, C, h, w], the posterior mean (or a sample of it when training)
    kl: torch.Tensor  # [B], KL(q(z|x) || N(0, I)) summed over the latent's values


class ImageVAE(nn.Module):
    """The image autoencoder as a slotlab task: ``compute_loss`` for the trainer, ``encode``/``decode`` for stage 2.

    Args:
        config: the run's config; its ``vae`` section sets the architecture and the KL weight.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.kl_weight = config.vae.kl_weight
        self.vae = build_autoencoder_kl(config.vae)
        self.downsample = 2 ** (len(config.vae.block_out_channels) - 1)
        self.latent_channels = config.vae.latent_channels

    def encode(self, image: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """``image [B, 3, H, W]`` in [-1, 1] -> latent ``[B, C, H/f, W/f]`` (posterior mean unless ``sample``)."""
        posterior = self.vae.encode(image).latent_dist
        return posterior.sample() if sample else posterior.mode()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents [B, C, h, w]`` -> image ``[B, 3, h*f, w*f]`` (not clamped)."""
        return self.vae.decode(latents).sample

    def forward(self, image: torch.Tensor) -> VAEOutput:
        posterior = self.vae.encode(image).latent_dist
        # Training decodes a posterior sample (the reparameterisation trick); evaluation the mean.
        latents = posterior.sample() if self.training else posterior.mode()  # [B, C, h, w]
        return VAEOutput(recon=self.decode(latents), latents=latents, kl=posterior.kl())

    def compute_loss(self, batch: dict[str, torch.Tensor], step: int = 0) -> tuple[torch.Tensor, dict]:
        """Per-value MSE + ``kl_weight`` * KL per value (see the module docstring for the scaling)."""
        image = batch["image"]
        out = self(image)
        values = image[0].numel()  # 3 * H * W
        mse = F.mse_loss(out.recon.float(), image.float())
        kl = out.kl.float().mean() / values
        loss = mse + self.kl_weight * kl
        return loss, {"mse": mse.detach(), "kl": kl.detach(), "psnr": psnr_from_mse(mse.detach())}


def psnr_from_mse(mse: torch.Tensor | float) -> torch.Tensor | float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), i.e. the usual PSNR of the same images in [0, 1]."""
    if isinstance(mse, torch.Tensor):
        return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))
    return 10.0 * math.log10(4.0 / max(mse, 1e-12))


class VAEEvaluator:
    """Reconstruction quality of a trained :class:`ImageVAE`, batch by batch.

    ``summary()`` gives ``{"mse", "psnr", "psnr_per_image", "latent_std", "latent_shape"}``: ``psnr`` from the mean
    MSE, ``psnr_per_image`` the mean of per-image PSNRs (images and reconstructions clamped to [-1, 1]);
    ``latent_std`` is the standard deviation of the latents (stage 2 divides by it). With ``out_dir`` it also saves
    ``recon.png`` (the first images over their reconstructions).
    """

    def __init__(self, model: ImageVAE, out_dir: Path | None = None):
        self.model, self.out_dir = model, out_dir
        self.squared_error, self.values, self.psnrs = 0.0, 0, []
        self.latent_sum, self.latent_sq, self.latent_n = 0.0, 0.0, 0
        self.latent_shape: list[int] = []
        self.first = None

    @torch.no_grad()
    def update(self, batch: dict[str, torch.Tensor], indices=None) -> None:
        image = batch["image"]  # [B, 3, H, W]
        latents = self.model.encode(image).float()  # [B, C, h, w]
        recon = self.model.decode(latents).float().clamp(-1.0, 1.0)  # [B, 3, H, W]
        per_image = ((recon - image) ** 2).flatten(1).mean(dim=1)  # [B]
        self.squared_error += float(per_image.sum()) * image[0].numel()
        self.values += image.numel()
        self.psnrs += psnr_from_mse(per_image).tolist()
        self.latent_sum += float(latents.sum())
        self.latent_sq += float((latents.double() ** 2).sum())
        self.latent_n += latents.numel()
        self.latent_shape = list(latents.shape[1:])
        if self.first is None:
            self.first = (image[:8], recon[:8])

    def summary(self) -> dict:
        from slotlab.report.plots import save_png, tile, to_uint8_image, upscale_for_view

        mse = self.squared_error / max(self.values, 1)
        mean = self.latent_sum / max(self.latent_n, 1)
        metrics = {"mse": mse, "psnr": psnr_from_mse(mse),
                   "psnr_per_image": float(np.mean(self.psnrs)) if self.psnrs else math.nan,
                   "latent_std": math.sqrt(max(self.latent_sq / max(self.latent_n, 1) - mean**2, 0.0)),
                   "latent_shape": self.latent_shape}
        if self.first is not None and self.out_dir is not None:
            images, recons = self.first
            out_dir = Path(self.out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            rows = [list(to_uint8_image(images)), list(to_uint8_image(recons))]  # images over their reconstructions
            save_png(tile(rows, scale=upscale_for_view(images.shape[-1])), out_dir / "recon.png")
        return metrics


__all__ = ["ImageVAE", "VAEOutput", "build_autoencoder_kl", "VAEEvaluator", "norm_groups", "psnr_from_mse"]
