"""Per-pixel MLP broadcast decoder: the spatial broadcast decoder with 1x1 "convolutions", decodable pixel by pixel.

Each slot ``[D]`` plus the position embedding of a pixel goes through an MLP to 4 numbers (1 mask logit + 3 RGB);
masks are a softmax over slots and the image is the mask-weighted sum of the slots' RGB, as in
:class:`~slotlab.models.SpatialBroadcastDecoder`. Since no pixel looks at its neighbours, any subset of pixels can be
decoded alone: :meth:`PixelMLPDecoder.decode_pixels` decodes a random fraction of them for a cheaper training step
(``model.decoder_pixels``), the MSE over that sample being an unbiased estimate of the full one.

The first layer is computed factorised: ``W (slot + pos) = W slot + W pos``, one small matmul per slot and one per
pixel, added as a broadcast.
"""

from __future__ import annotations

import torch
from torch import nn

from slotlab.models.broadcast_decoder import DecoderOutput
from slotlab.models.encoders import SoftPositionEmbed


class PixelMLPDecoder(nn.Module):
    """Decode ``slots [B, K, D]`` to an image ``[B, 3, H, W]`` with per-slot masks, one pixel at a time.

    Args:
        slot_dim: D.
        resolution: output side H = W.
        channels: width of the hidden layers.
        layers: hidden layers (each Linear + ReLU); the first one is factorised over slots and pixels.
        octaves: 0 = the paper's linear position embedding of (x, y, 1-x, 1-y); L > 0 = Fourier features of (x, y).
        octave_fade_steps: with octaves, fade them in from coarse to fine over this many steps (see
            :class:`~slotlab.models.encoders.SoftPositionEmbed`); 0 = all at once.
    """

    def __init__(self, slot_dim: int, resolution: int, channels: int = 64, layers: int = 3, octaves: int = 0,
                 octave_fade_steps: int = 0):
        super().__init__()
        if layers < 1:
            raise ValueError("the MLP decoder needs at least one hidden layer")
        self.resolution = resolution
        self.pos = SoftPositionEmbed(slot_dim, octaves, octave_fade_steps)  # holds the fade and its stage
        self.first = nn.Linear(slot_dim, channels)
        hidden: list[nn.Module] = [nn.ReLU(inplace=True)]
        for _ in range(layers - 1):
            hidden += [nn.Linear(channels, channels), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*hidden, nn.Linear(channels, 4))

    def set_step(self, step: int) -> None:
        """Advance the coarse-to-fine fade-in of the Fourier octaves to training step ``step``."""
        self.pos.set_step(step)

    def forward(self, slots: torch.Tensor) -> DecoderOutput:
        return self.decode(slots)

    def decode_pixels(self, slots: torch.Tensor, pixels: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``slots [B, K, D]`` -> ``(recon [B, P, 3], masks [B, K, P], slot_recons [B, K, P, 3])`` at the pixels
        ``pixels [P]`` (indices into the row-major ``H * W`` image; None = all of them)."""
        side = self.resolution
        position = self.pos(slots.new_zeros(1, slots.shape[-1], side, side))  # [1, D, H, W]: the embedding alone
        position = position.flatten(2)[0].t()  # [H*W, D]
        if pixels is not None:
            position = position[pixels]  # [P, D]
        # W (slot + pos) + b, factorised: [B, K, 1, C] + [P, C] -> [B, K, P, C]
        hidden = self.first(slots).unsqueeze(2) + nn.functional.linear(position, self.first.weight)
        out = self.net(hidden)  # [B, K, P, 4]
        slot_recons, mask_logits = out[..., 1:], out[..., 0]  # [B, K, P, 3], [B, K, P]
        masks = mask_logits.softmax(dim=1)  # [B, K, P], softmax over slots
        recon = (masks.unsqueeze(-1) * slot_recons).sum(dim=1)  # [B, P, 3]
        return recon, masks, slot_recons

    def decode(self, slots: torch.Tensor) -> DecoderOutput:
        """``slots [B, K, D]`` -> the whole image, its masks and each slot's RGB."""
        b, k, _ = slots.shape
        side = self.resolution
        recon, masks, slot_recons = self.decode_pixels(slots)
        return DecoderOutput(
            recon=recon.transpose(1, 2).reshape(b, 3, side, side),  # [B, 3, H, W]
            masks=masks.reshape(b, k, side, side),  # [B, K, H, W]
            slot_recons=slot_recons.transpose(2, 3).reshape(b, k, 3, side, side),  # [B, K, 3, H, W]
        )
