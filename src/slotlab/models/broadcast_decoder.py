"""Spatial broadcast decoder (Watters et al. 2019) with alpha compositing over slots (Slot Attention paper).

Each slot ``[D]`` is tiled on a small grid, given a position embedding, upsampled by transposed convolutions to
``H x W`` and read as 4 channels: 1 mask logit + 3 RGB. Masks are a softmax over slots; the image is the
mask-weighted sum of the slots' RGB.

With slot frames (invariant slot attention: a position ``p_k`` and scale ``s_k`` per slot), the position embedding is
that of the slot's own coordinates ``(x - p_k) / s_k`` instead of the image's, so each slot is drawn in its frame.
Plain Slot Attention can be drawn that way too, with frames read off its attention (``model.decoder_frame``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slotlab.models.encoders import SoftPositionEmbed, fourier_features
from slotlab.models.invariant_slot_attention import grid_positions


@dataclass
class DecoderOutput:
    """What every decoder's ``decode(slots)`` returns."""

    recon: torch.Tensor  # [B, 3, H, W] in about [-1, 1]
    masks: torch.Tensor | None = None  # [B, K, H, W], sums to 1 over K (None for decoders without alpha masks)
    slot_recons: torch.Tensor | None = None  # [B, K, 3, H, W], each slot's own RGB


def compose(slot_recons: torch.Tensor, mask_logits: torch.Tensor) -> DecoderOutput:
    """Alpha compositing: masks are a softmax of ``mask_logits [B, K, H, W]`` over slots, and the image is the
    mask-weighted sum of ``slot_recons [B, K, 3, H, W]``."""
    masks = mask_logits.softmax(dim=1)  # [B, K, H, W], softmax over slots
    recon = (masks.unsqueeze(2) * slot_recons).sum(dim=1)  # [B, 3, H, W]
    return DecoderOutput(recon=recon, masks=masks, slot_recons=slot_recons)


class BackgroundDecoder(nn.Module):
    """Draws one slot as a smooth background (``model.background_grid``): an MLP maps the slot to RGB and a mask
    logit on a ``grid x grid`` map, upsampled bilinearly to ``H x W``.

    On a coarse grid it can paint the floor, the sky, a colour gradient, but not a small object: an object left to
    the background slot costs its whole error, so an object slot has to take it.
    """

    def __init__(self, slot_dim: int, resolution: int, grid: int, hidden_dim: int):
        super().__init__()
        self.resolution, self.grid = resolution, grid
        self.mlp = nn.Sequential(nn.Linear(slot_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, 4 * grid * grid))

    def draw(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``slots [B, K, D]`` -> RGB ``[B, K, 3, H, W]`` and mask logit ``[B, K, H, W]``, smooth on the grid."""
        b, k, _ = slots.shape
        coarse = self.mlp(slots).view(b * k, 4, self.grid, self.grid)  # [B*K, 4, g, g]
        out = F.interpolate(coarse, size=(self.resolution, self.resolution), mode="bilinear",
                            align_corners=False).view(b, k, 4, self.resolution, self.resolution)  # [B, K, 4, H, W]
        return out[:, :, 1:], out[:, :, 0]


class SpatialBroadcastDecoder(nn.Module):
    """Decode ``slots [B, K, D]`` to an image ``[B, 3, H, W]`` with per-slot masks.

    Args:
        slot_dim: D.
        resolution: output side H = W; must be ``grid * 2**n``.
        channels: width of the transposed convolutions.
        grid: side of the grid each slot is broadcast to (8 in the paper's CLEVR decoder; the full resolution in its
            multi-dSprites decoder, where no upsampling happens and the small receptive field ties a slot to a place).
        kernel: kernel size of the stride-1 layers at full resolution.
        full_res_layers: number of stride-1 layers (each ``kernel`` x ``kernel``) before the 3x3 output layer.
        frames: draw each slot in its own frame (invariant slot attention): ``decode`` then takes positions, scales.
        octaves: 0 = the paper's linear position embedding; L > 0 = a linear map of Fourier features with L octaves
            of the (image or frame) coordinates.
        octave_fade_steps: with octaves, fade them in from coarse to fine over this many training steps (BARF's
            schedule, see :func:`~slotlab.models.encoders.fourier_features`; :meth:`set_step` advances it). 0 = all
            octaves from the start.
        slot_edges: add to the first layer a term linear in the pixel's (x, y) whose two weights per channel come
            from the slot (``slot_edges``, a linear map): see :meth:`edge_term`.
    """

    def __init__(self, slot_dim: int, resolution: int, channels: int = 64, grid: int = 8, kernel: int = 5,
                 full_res_layers: int = 1, frames: bool = False, octaves: int = 0, octave_fade_steps: int = 0,
                 slot_edges: bool = False):
        super().__init__()
        upsamplings = math.log2(resolution / grid)
        if upsamplings < 0 or not upsamplings.is_integer():
            raise ValueError(f"decoder: resolution {resolution} is not grid {grid} times a power of two")
        self.grid = grid
        self.octaves = octaves
        self.pos = SoftPositionEmbed(slot_dim, octaves, octave_fade_steps)  # holds the fade and its stage
        # Slot frames: a linear embedding of (the Fourier features of) the slot's own (x, y) coordinates.
        self.frame_embed = nn.Linear(2 + 4 * octaves, slot_dim) if frames else None
        layers: list[nn.Module] = []
        in_channels = slot_dim
        for _ in range(int(upsamplings)):
            layers += [nn.ConvTranspose2d(in_channels, channels, 5, stride=2, padding=2, output_padding=1),
                       nn.ReLU(inplace=True)]
            in_channels = channels
        for _ in range(full_res_layers):
            layers += [nn.ConvTranspose2d(in_channels, channels, kernel, stride=1, padding=kernel // 2),
                       nn.ReLU(inplace=True)]
            in_channels = channels
        layers += [nn.ConvTranspose2d(in_channels, 4, 3, stride=1, padding=1)]
        self.net = nn.Sequential(*layers)
        first_channels = self.net[0].out_channels
        self.slot_edges = nn.Linear(slot_dim, 2 * first_channels) if slot_edges else None
        # Without upsampling the first layer is a stride-1 convolution of a constant map (the slot) plus a map shared
        # by all slots (the position embedding): computed exactly from per-slot kernel sums (see broadcast_conv).
        self.factorised = upsamplings == 0

    def set_step(self, step: int) -> None:
        """Advance the coarse-to-fine fade-in of the Fourier octaves to training step ``step``."""
        self.pos.set_step(step)

    def forward(self, slots: torch.Tensor, positions: torch.Tensor | None = None,
                scales: torch.Tensor | None = None) -> DecoderOutput:
        return self.decode(slots, positions, scales)

    def decode(self, slots: torch.Tensor, positions: torch.Tensor | None = None,
               scales: torch.Tensor | None = None) -> DecoderOutput:
        """``slots [B, K, D]`` (with ``positions`` and ``scales [B, K, 2]`` for a framed decoder) -> image, masks."""
        return compose(*self.draw(slots, positions, scales))

    def draw(self, slots: torch.Tensor, positions: torch.Tensor | None = None,
             scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each slot drawn alone: its RGB ``[B, K, 3, H, W]`` and mask logit ``[B, K, H, W]`` (before the softmax)."""
        b, k, d = slots.shape
        framed = self.frame_embed is not None
        if framed and (positions is None or scales is None):
            raise ValueError("this decoder draws slots in their frames: pass positions and scales")
        # All B*K slots go through the convolutions as one batch.
        flat = slots.reshape(b * k, d)  # [B*K, D]
        if self.factorised and framed and not self.octaves:  # an affine embedding of the frame: exact shortcut
            hidden = framed_broadcast_conv(self.net[0], flat, self.frame_embed, positions.reshape(b * k, 2),
                                           scales.reshape(b * k, 2), self.grid)
        elif self.factorised:
            hidden = broadcast_conv(self.net[0], flat, self.pos, self.grid)  # [B*K, C, g, g]
        else:
            grid = flat[:, :, None, None].expand(-1, -1, self.grid, self.grid)  # [B*K, D, g, g]
            if framed:
                rel = frame_coordinates(positions.reshape(b * k, 2), scales.reshape(b * k, 2), self.grid)
                rel = fourier_features(rel, self.octaves, self.pos.progress)  # [B*K, g, g, 2 + 4L]
                hidden = self.net[0](grid + self.frame_embed(rel).permute(0, 3, 1, 2))  # [B*K, C, h, w]
            else:
                hidden = self.net[0](self.pos(grid))  # [B*K, C, h, w]
        if self.slot_edges is not None:
            hidden = hidden + self.edge_term(flat, hidden.shape[-1])
        out = self.net[1:](hidden)  # [B*K, 4, H, W]
        out = out.reshape(b, k, 4, *out.shape[-2:])  # [B, K, 4, H, W]
        return out[:, :, 1:], out[:, :, 0]  # [B, K, 3, H, W], [B, K, H, W]

    def edge_term(self, slots: torch.Tensor, side: int) -> torch.Tensor:
        """``[N, C, side, side]``: for each slot and first-layer channel c, ``u_c x + v_c y`` with ``(u_c, v_c)`` a
        linear function of the slot.

        In the paper's decoder the first layer is ``a_c(slot) + b_c . (x, y)``: the slot moves each channel's edge
        (where it crosses zero) but every slot shares its direction ``b_c``, so a slot draws its outline from the same
        C directions as every other slot. With this term each slot turns them too, and a square at any rotation is
        four channels' edges.
        """
        n = slots.shape[0]
        directions = self.slot_edges(slots).view(n, -1, 2)  # [N, C, 2]: (u_c, v_c)
        xy = grid_positions(side, side, slots.device).to(slots.dtype)  # [S*S, 2]: (x, y) in [-1, 1]
        return (directions @ xy.t()).view(n, -1, side, side)  # [N, C, S, S]


def broadcast_conv(conv: nn.ConvTranspose2d, vectors: torch.Tensor, pos: SoftPositionEmbed, side: int) -> torch.Tensor:
    """``conv(pos(broadcast(vectors)))`` for a stride-1 ``conv``, without building the broadcast maps.

    A zero-padded convolution of a map that is constant (``v``) inside the image adds up, at each pixel, the kernel
    taps that fall inside: ``sum_{taps valid here} W_tap v``. So each vector needs only its k*k tap projections
    ``W_tap v`` (a small matmul), spread over the pixels by a fixed 0/1 tap-validity table; the position embedding,
    the same for every vector, is convolved once. Exact (same result as the plain path) with about D times fewer
    multiply-adds for the first layer: ``N*C*k*k*(D + H*W)`` instead of ``N*C*k*k*D*H*W``.

    Args:
        conv: stride-1 ``ConvTranspose2d(D, C, k, padding=k // 2)``.
        vectors: ``[N, D]`` (the B*K slots).
        pos: the decoder's position embedding (its linear map of the 4-channel grid).
        side: H = W of the output.
    """
    n, d = vectors.shape
    kernel = conv.kernel_size[0]
    # A stride-1 transposed convolution is a convolution with the kernel flipped and in/out swapped.
    weight = conv.weight.transpose(0, 1).flip(-1, -2)  # [C, D, k, k]
    taps = torch.einsum("cdt,nd->nct", weight.flatten(2), vectors)  # [N, C, k*k]: W_tap v for every tap
    ones = vectors.new_ones(1, 1, side, side)
    valid = F.unfold(ones, kernel, padding=kernel // 2)[0]  # [k*k, H*W]: 1 where the tap lands inside the image
    constant_part = (taps @ valid).view(n, -1, side, side)  # [N, C, H, W]
    position_map = pos(vectors.new_zeros(1, d, side, side))  # [1, D, H, W]: the embedding alone
    shared_part = F.conv2d(position_map, weight, conv.bias, padding=kernel // 2)  # [1, C, H, W]
    return constant_part + shared_part  # [N, C, H, W]


def frame_coordinates(positions: torch.Tensor, scales: torch.Tensor, side: int) -> torch.Tensor:
    """Each slot's own coordinates ``(x - p) / s`` on a ``side x side`` grid of pixel centres in [-1, 1]:
    ``[N, side, side, 2]`` for ``positions``, ``scales [N, 2]`` (x, y)."""
    centres = (torch.arange(side, device=positions.device, dtype=positions.dtype) + 0.5) / side * 2 - 1
    y, x = torch.meshgrid(centres, centres, indexing="ij")  # [S, S] each
    grid = torch.stack([x, y], dim=-1)  # [S, S, 2]
    return (grid[None] - positions[:, None, None]) / scales[:, None, None]  # [N, S, S, 2]


def framed_broadcast_conv(conv: nn.ConvTranspose2d, vectors: torch.Tensor, embed: nn.Linear, positions: torch.Tensor,
                          scales: torch.Tensor, side: int) -> torch.Tensor:
    """``conv(broadcast(v) + embed(frame coordinates))`` for a stride-1 ``conv``, without building the maps.

    The embedding of a slot's coordinates is affine in the pixel position: ``A ((x - p) / s) + b`` is
    ``(A_x / s_x) x + (A_y / s_y) y + (b - A (p / s))``. So the convolution is the one of a constant map,
    ``v + b - A (p / s)`` (kernel taps, as :func:`broadcast_conv`), plus ``1 / s_x`` times the convolution of the map
    ``A_x x`` and ``1 / s_y`` times that of ``A_y y``: two maps shared by every slot, convolved once. Exact.

    Args:
        conv: stride-1 ``ConvTranspose2d(D, C, k, padding=k // 2)``.
        vectors: ``[N, D]`` slots; embed: ``Linear(2, D)``; positions, scales: ``[N, 2]`` (x, y); side: H = W.
    """
    n, d = vectors.shape
    kernel = conv.kernel_size[0]
    weight = conv.weight.transpose(0, 1).flip(-1, -2)  # [C, D, k, k], the equivalent convolution
    constants = vectors + embed.bias - (positions / scales) @ embed.weight.t()  # [N, D]
    taps = torch.einsum("cdt,nd->nct", weight.flatten(2), constants)  # [N, C, k*k]
    valid = F.unfold(vectors.new_ones(1, 1, side, side), kernel, padding=kernel // 2)[0]  # [k*k, H*W]
    constant_part = (taps @ valid).view(n, -1, side, side)  # [N, C, H, W]
    centres = (torch.arange(side, device=vectors.device, dtype=vectors.dtype) + 0.5) / side * 2 - 1  # [S]
    x_map = embed.weight[:, 0, None, None] * centres[None, None, :]  # [D, 1, S]: A_x x
    y_map = embed.weight[:, 1, None, None] * centres[None, :, None]  # [D, S, 1]: A_y y
    axis_maps = torch.stack([x_map.expand(-1, side, -1), y_map.expand(-1, -1, side)])  # [2, D, H, W]
    axis_part = F.conv2d(axis_maps, weight, padding=kernel // 2)  # [2, C, H, W]
    inverse = 1.0 / scales  # [N, 2]
    return (constant_part + inverse[:, 0, None, None, None] * axis_part[0] + inverse[:, 1, None, None, None]
            * axis_part[1] + conv.bias[None, :, None, None])  # [N, C, H, W]
