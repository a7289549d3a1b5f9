"""SlotDiffusion (Wu et al. 2023; report 002, part 2): Slot Attention with a latent diffusion decoder.

    image -> CNN encoder + Slot Attention -> slots [B, K, D]
    image -> frozen VAE encoder -> z_0 [B, C, h, w] (scaled to unit variance)
    z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps,   t ~ U{0, ..., T-1}
    loss = || eps - UNet(z_t, t, cross-attention to the slots) ||^2

The loss trains the UNet and, through the cross-attention, the encoder and Slot Attention end to end; the VAE stays
frozen. ``decode(slots)`` samples ``z_0`` with DDPM or DDIM (:mod:`slotlab.diffusion.sampling`) from an exponential
moving average of the UNet's weights, and decodes it with the VAE. The decoder has no alpha masks, so object masks
are Slot Attention's last-iteration attention maps, upsampled to the image.

The model offers :class:`~slotlab.models.SlotAutoencoder`'s interface, so ``slotlab eval``, ``compose``, ``mix`` and
``report`` work with it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from slotlab.config import Config
from slotlab.diffusion.sampling import SAMPLERS, check_steps, sample, sampling_scheduler, train_scheduler
from slotlab.diffusion.vae import ImageVAE, norm_groups
from slotlab.errors import UserError
from slotlab.models import AutoencoderOutput, DecoderOutput, GroupingOutput, ImageEncoder, build_grouping
from slotlab.models.slot_attention import attention_masks


class IdentityLatents(nn.Module):
    """Stand-in for the VAE when ``diffusion.vae_run`` is empty: diffusion runs on the pixels (tests, smoke runs)."""

    downsample = 1
    latent_channels = 3

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def read_vae_run(run_dir: str) -> tuple[Config, dict, Path]:
    """The config, checkpoint (``best``, else ``last``) and weights file of a ``task=vae`` run directory."""
    from slotlab.runs import read_stage_run

    return read_stage_run(run_dir, "diffusion.vae_run", "vae")


def build_denoiser(config: Config, latent_size: int, latent_channels: int) -> UNet2DConditionModel:
    """diffusers' conditional UNet: residual blocks, sinusoidal time embedding, cross-attention to the slots.

    Every level has a transformer block (self-attention over latent positions, cross-attention from the latent
    positions to the K slots) after its residual blocks; ``len(unet_channels) - 1`` downsamplings.
    """
    cfg = config.diffusion
    channels = tuple(cfg.unet_channels)
    if any(c % cfg.attention_head_dim for c in channels):
        raise UserError(f"diffusion.unet_channels={channels}: every width must be a multiple of "
                        f"diffusion.attention_head_dim={cfg.attention_head_dim}")
    if latent_size % 2 ** (len(channels) - 1):
        raise UserError(f"latent side {latent_size} cannot be halved {len(channels) - 1} times "
                        f"(diffusion.unet_channels={channels})")
    heads = tuple(c // cfg.attention_head_dim for c in channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels),
        block_out_channels=channels, layers_per_block=cfg.layers_per_block,
        cross_attention_dim=config.model.slot_dim,
        attention_head_dim=heads,  # diffusers reads this as the number of heads (its issue #2011)
        norm_num_groups=norm_groups(channels),
    )


class SlotDiffusion(nn.Module):
    """Slot Attention encoder + slot-conditioned latent diffusion decoder.

    Args:
        config: the run's config (``model``: encoder and Slot Attention; ``diffusion``: UNet, noise schedule,
            sampling, EMA).
        vae: the frozen stage-1 autoencoder; by default an :class:`ImageVAE` of ``config.vae`` (whose weights come
            with the run's checkpoint, or from ``diffusion.vae_run`` when a run starts), or identity latents when
            ``diffusion.vae_run`` is empty (tests). Passing one builds the model around it (benchmarks, tests).
    """

    def __init__(self, config: Config, vae: nn.Module | None = None):
        super().__init__()
        cfg, diff = config.model, config.diffusion
        if diff.sampler not in SAMPLERS:
            raise UserError(f"unknown diffusion.sampler {diff.sampler!r} (known: {', '.join(SAMPLERS)})")
        self.config = config
        self.num_slots = cfg.num_slots
        self.slot_size = cfg.slot_dim  # what encode() hands out per slot
        self.encoder = ImageEncoder(cfg.encoder, cfg.encoder_channels, cfg.input_dim)
        self.grouping = build_grouping(cfg)
        if getattr(self.grouping, "frames", False):
            raise UserError(f"model.grouping={cfg.grouping!r} (slots with frames) is not available for slot diffusion "
                            "yet")
        if vae is None:
            vae = ImageVAE(config) if diff.vae_run else IdentityLatents()
        self.vae = vae.requires_grad_(False).eval()
        resolution = config.data.resolution
        if resolution % vae.downsample:
            raise UserError(f"data.resolution={resolution} is not a multiple of the VAE's downsampling "
                            f"{vae.downsample}")
        self.latent_shape = (vae.latent_channels, resolution // vae.downsample, resolution // vae.downsample)
        self.denoiser = build_denoiser(config, self.latent_shape[1], vae.latent_channels)
        # Sampling uses an exponential moving average of the UNet's weights; its copy is a non-trainable submodule,
        # so it lives in the checkpoint's state_dict and the optimizer never sees it.
        self.ema = AveragedModel(self.denoiser, multi_avg_fn=get_ema_multi_avg_fn(diff.ema_decay)).requires_grad_(False)
        # Unconditional "slots" for classifier-free guidance, used only when training drops the conditioning.
        self.null_slots = nn.Parameter(torch.zeros(1, 1, cfg.slot_dim)) if diff.cond_dropout > 0 else None
        self.scheduler = train_scheduler(diff)
        # Latents are divided by their standard deviation, measured on the first training batch (LDM's
        # scale_by_std); 0 = not measured yet.
        self.register_buffer("latent_scale", torch.zeros(()))
        self._scale_checked = False

    # ------------------------------------------------------------------------------------------------ pieces
    def train(self, mode: bool = True) -> SlotDiffusion:
        super().train(mode)
        self.vae.eval()  # frozen: always in inference mode
        return self

    def encode(self, image: torch.Tensor, num_slots: int | None = None) -> tuple[GroupingOutput, tuple[int, int]]:
        """``image [B, 3, H, W]`` -> slots ``[B, K, D]`` and attention ``[B, K, N]``, plus the feature grid size."""
        inputs, feature_size = self.encoder(image)  # [B, N, D_inputs]
        return self.grouping(inputs, num_slots=num_slots), feature_size

    def _scale(self) -> torch.Tensor:
        return torch.where(self.latent_scale > 0, self.latent_scale, torch.ones_like(self.latent_scale))

    @torch.no_grad()
    def image_to_latents(self, image: torch.Tensor) -> torch.Tensor:
        """``image [B, 3, H, W]`` -> scaled latents ``z_0 [B, C, h, w]`` (float32)."""
        return self.vae.encode(image).float() * self._scale()  # [B, C, h, w]

    def latents_to_image(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]`` -> image ``[B, 3, H, W]`` clamped to [-1, 1]."""
        return self.vae.decode(latents / self._scale()).float().clamp(-1.0, 1.0)

    def _condition(self, slots: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        if drop is None or self.null_slots is None:
            return slots
        null = self.null_slots.to(slots.dtype).expand_as(slots)  # [B, K, D]
        return torch.where(drop[:, None, None], null, slots)  # [B, K, D]

    # ------------------------------------------------------------------------------------------------ training
    def compute_loss(self, batch: dict[str, torch.Tensor], step: int = 0) -> tuple[torch.Tensor, dict]:
        """Epsilon-prediction MSE at a uniformly drawn timestep (Ho et al. 2020, Algorithm 1)."""
        image = batch["image"]
        grouped, _ = self.encode(image)
        if self.training and not self._scale_checked:  # reads the buffer back once per process, not every step
            if not bool(self.latent_scale > 0):
                with torch.no_grad():
                    self.latent_scale.fill_(1.0 / self.vae.encode(image).float().std().clamp_min(1e-6))
            self._scale_checked = True
        z0 = self.image_to_latents(image)  # [B, C, h, w]
        noise = torch.randn_like(z0)  # [B, C, h, w]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (z0.shape[0],), device=z0.device)  # [B]
        zt = self.scheduler.add_noise(z0, noise, t)  # [B, C, h, w]
        drop = None
        if self.training and self.null_slots is not None:
            drop = torch.rand(z0.shape[0], device=z0.device) < self.config.diffusion.cond_dropout  # [B]
        cond = self._condition(grouped.slots, drop)  # [B, K, D]
        pred = self.denoiser(zt, t, encoder_hidden_states=cond).sample  # [B, C, h, w]
        loss = F.mse_loss(pred.float(), noise)
        return loss, {"mse": loss.detach()}

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Called by the trainer after every optimizer step: update the EMA of the denoiser."""
        self.ema.update_parameters(self.denoiser)

    # ------------------------------------------------------------------------------------------------ sampling
    def sampling_denoiser(self, use_ema: bool = True) -> nn.Module:
        """The EMA UNet once it has been updated, else the trained one."""
        if use_ema and int(self.ema.n_averaged) > 0:
            return self.ema.module
        return self.denoiser

    @torch.no_grad()
    def decode(self, slots: torch.Tensor, steps: int | None = None, sampler: str | None = None,
               eta: float | None = None, guidance_scale: float | None = None,
               generator: torch.Generator | None = None, seed: int | None = None,
               use_ema: bool = True) -> DecoderOutput:
        """Sample an image for each slot set.

        Args:
            slots: ``[B, K, D]``.
            steps: denoising steps (default: ``diffusion.sample_steps`` for DDIM, ``num_train_timesteps`` for DDPM).
            sampler: ``ddpm`` (ancestral) or ``ddim`` (default: ``diffusion.sampler``).
            eta: DDIM noise (default ``diffusion.eta``).
            guidance_scale: classifier-free guidance weight (default ``diffusion.guidance_scale``; 1 = off).
            generator: random source of the noise; ``seed`` makes a CPU generator; neither: torch's global one.
            use_ema: sample with the EMA weights.

        Returns:
            :class:`DecoderOutput` with ``recon [B, 3, H, W]`` in [-1, 1] and no masks (see :meth:`predict_masks`).
        """
        cfg = self.config.diffusion
        sampler = sampler or cfg.sampler
        if steps is None:
            steps = cfg.num_train_timesteps if sampler == "ddpm" else cfg.sample_steps
        check_steps(steps, cfg)
        guidance = cfg.guidance_scale if guidance_scale is None else guidance_scale
        if guidance != 1.0 and self.null_slots is None:
            raise UserError(f"guidance_scale={guidance} needs a model trained with diffusion.cond_dropout > 0")
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        denoiser = self.sampling_denoiser(use_ema)
        cond = slots.to(self.latent_scale.device, torch.float32)  # [B, K, D]
        if guidance != 1.0:
            null = self.null_slots.expand_as(cond)  # [B, K, D]
            cond = torch.cat([cond, null])  # [2B, K, D]: one pass for the conditional and unconditional noise

        def eps_fn(zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if guidance == 1.0:
                return denoiser(zt, t, encoder_hidden_states=cond).sample  # [B, C, h, w]
            eps_cond, eps_uncond = denoiser(torch.cat([zt, zt]), torch.cat([t, t]),
                                            encoder_hidden_states=cond).sample.chunk(2)
            return eps_uncond + guidance * (eps_cond - eps_uncond)  # [B, C, h, w]

        latents = sample(eps_fn, (slots.shape[0], *self.latent_shape), sampling_scheduler(cfg, sampler), steps,
                         eta=cfg.eta if eta is None else eta, generator=generator, device=cond.device)
        return DecoderOutput(recon=self.latents_to_image(latents))

    # ------------------------------------------------------------------------------------------------ interface
    def forward(self, image: torch.Tensor, num_slots: int | None = None) -> AutoencoderOutput:
        """Encode, then sample a reconstruction with the configured sampler (``diffusion.sample_steps`` steps)."""
        grouped, feature_size = self.encode(image, num_slots)
        decoded = self.decode(grouped.slots)
        masks = attention_masks(grouped.attn, feature_size, tuple(image.shape[-2:]))  # [B, K, H, W]
        return AutoencoderOutput(
            recon=decoded.recon, masks=masks, slot_recons=None, slots=grouped.slots, attn=grouped.attn,
            attn_per_iter=grouped.attn_per_iter, feature_size=feature_size,
        )

    @torch.no_grad()
    def predict_masks(self, image: torch.Tensor) -> torch.Tensor:
        """Object masks ``[B, K, H, W]`` from the last Slot Attention iteration (no sampling: cheap)."""
        grouped, feature_size = self.encode(image)
        return attention_masks(grouped.attn, feature_size, tuple(image.shape[-2:]))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["IdentityLatents", "SlotDiffusion", "attention_masks", "build_denoiser", "count_parameters",
           "read_vae_run"]
