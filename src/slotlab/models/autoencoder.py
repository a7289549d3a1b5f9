"""The Slot Attention autoencoder: CNN encoder -> grouping -> spatial broadcast decoder, trained by MSE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from slotlab.config import Config
from slotlab.models.broadcast_decoder import DecoderOutput, SpatialBroadcastDecoder
from slotlab.models.encoders import ImageEncoder
from slotlab.models.slot_attention import GroupingOutput, build_grouping


@dataclass
class AutoencoderOutput:
    """Forward pass of a slot autoencoder."""

    recon: torch.Tensor  # [B, 3, H, W]
    masks: torch.Tensor  # [B, K, H, W], sums to 1 over K
    slot_recons: torch.Tensor  # [B, K, 3, H, W]
    slots: torch.Tensor  # [B, K, D]
    attn: torch.Tensor  # [B, K, N], last iteration
    attn_per_iter: list[torch.Tensor] | None = None  # T x [B, K, N]
    feature_size: tuple[int, int] | None = None  # (h, w) of the attention grid, N = h * w


class SlotAutoencoder(nn.Module):
    """Object discovery by reconstruction (Locatello et al. 2020, section 3).

    ``encode(image) -> GroupingOutput``, ``decode(slots) -> DecoderOutput``, ``forward(image) -> AutoencoderOutput``.
    """

    def __init__(self, config: Config):
        super().__init__()
        cfg = config.model
        self.config = config
        self.encoder = ImageEncoder(cfg.encoder, cfg.encoder_channels, cfg.input_dim)
        self.grouping = build_grouping(cfg)
        self.decoder = SpatialBroadcastDecoder(cfg.slot_dim, config.data.resolution, cfg.decoder_channels,
                                               cfg.decoder_grid)
        self.num_slots = cfg.num_slots

    def encode(self, image: torch.Tensor, num_slots: int | None = None) -> tuple[GroupingOutput, tuple[int, int]]:
        """``image [B, 3, H, W]`` -> slots ``[B, K, D]`` and attention ``[B, K, N]``, plus the feature grid size."""
        inputs, feature_size = self.encoder(image)  # [B, N, D_inputs]
        return self.grouping(inputs, num_slots=num_slots), feature_size

    def decode(self, slots: torch.Tensor) -> DecoderOutput:
        """``slots [B, K, D]`` -> image, masks and per-slot images."""
        return self.decoder.decode(slots)

    def forward(self, image: torch.Tensor, num_slots: int | None = None) -> AutoencoderOutput:
        grouped, feature_size = self.encode(image, num_slots)
        decoded = self.decode(grouped.slots)
        return AutoencoderOutput(
            recon=decoded.recon, masks=decoded.masks, slot_recons=decoded.slot_recons, slots=grouped.slots,
            attn=grouped.attn, attn_per_iter=grouped.attn_per_iter, feature_size=feature_size,
        )

    def compute_loss(self, batch: dict[str, torch.Tensor], step: int = 0) -> tuple[torch.Tensor, dict]:
        """MSE between the image and its reconstruction, averaged over batch, pixels and channels."""
        out = self(batch["image"])
        loss = F.mse_loss(out.recon.float(), batch["image"].float())
        return loss, {"mse": loss.detach()}

    @torch.no_grad()
    def predict_masks(self, image: torch.Tensor) -> torch.Tensor:
        """Soft object masks ``[B, K, H, W]`` for scoring (ARI etc.)."""
        return self(image).masks
