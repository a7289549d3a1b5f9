"""CNN encoders and the soft 2D position embedding that turn an image into Slot Attention inputs.

image ``[B, 3, H, W]`` -> CNN -> ``[B, C, H, W]`` -> + position embedding -> flatten -> LayerNorm + MLP ->
inputs ``[B, N, D_inputs]`` with ``N = H * W`` (stride 1 throughout, as in the paper).
"""

from __future__ import annotations

import torch
from torch import nn

from slotlab.registry import Registry

ENCODERS: Registry[nn.Module] = Registry("encoder")


def position_grid(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """The 4-channel grid ``(x, y, 1 - x, 1 - y)`` with x, y in [0, 1]: ``[H, W, 4]``."""
    ys = torch.linspace(0.0, 1.0, height, device=device)
    xs = torch.linspace(0.0, 1.0, width, device=device)
    y, x = torch.meshgrid(ys, xs, indexing="ij")  # [H, W] each
    return torch.stack([x, y, 1.0 - x, 1.0 - y], dim=-1)  # [H, W, 4]


def fourier_features(coords: torch.Tensor, octaves: int, progress: torch.Tensor | None = None) -> torch.Tensor:
    """``coords [..., 2]`` -> ``[..., 2 + 4 * octaves]``: the coordinates and ``sin, cos(2^l pi c)`` for
    ``l < octaves`` (Tancik et al. 2020), so a small ReLU network can draw sharp edges at any place.

    ``progress`` (a scalar tensor in [0, 1], None = 1) fades the octaves in from coarse to fine (BARF, Lin et al.
    2021): octave ``l`` is weighted by ``(1 - cos(pi * clamp(progress * L - l, 0, 1))) / 2``, so at 0 only the
    coordinates remain and at 1 every octave has full weight. The angles are computed in at least fp32 (in bf16,
    ``2^7 pi x`` is off by more than a full turn) and the result is returned in the dtype of ``coords``."""
    if octaves == 0:
        return coords
    work = coords.float() if coords.dtype in (torch.float16, torch.bfloat16) else coords
    scales = torch.pi * 2.0 ** torch.arange(octaves, device=coords.device, dtype=work.dtype)  # [L]
    angles = (work.unsqueeze(-1) * scales).flatten(-2)  # [..., 2L]: x at every octave, then y at every octave
    sines, cosines = angles.sin(), angles.cos()
    if progress is not None:
        octave = torch.arange(octaves, device=coords.device, dtype=work.dtype)  # [L]
        ramp = (progress.to(work.dtype) * octaves - octave).clamp(0, 1)  # [L]
        weight = ((1 - torch.cos(torch.pi * ramp)) / 2).repeat(2)  # [2L], the angles' order: x's octaves, y's
        sines, cosines = sines * weight, cosines * weight
    return torch.cat([work, sines, cosines], dim=-1).to(coords.dtype)  # [..., 2 + 4L]


class SoftPositionEmbed(nn.Module):
    """Adds a learned linear projection of :func:`position_grid` to a channels-first feature map.

    With ``octaves > 0`` the projection is of the grid's Fourier features (:func:`fourier_features` of x, y in
    [-1, 1]) instead: the decoders' option ``model.decoder_octaves``.
    """

    def __init__(self, channels: int, octaves: int = 0, fade_steps: int = 0):
        super().__init__()
        self.octaves = octaves
        self.proj = nn.Linear(2 + 4 * octaves if octaves else 4, channels)
        # The coarse-to-fine fade-in of the octaves (fourier_features) over fade_steps training steps (0 = none); its
        # stage is saved with the weights, so that a checkpoint decodes as it was trained.
        self.fade_steps = fade_steps if octaves else 0
        self.register_buffer("progress", torch.zeros(()) if self.fade_steps else None)

    def set_step(self, step: int) -> None:
        """Advance the fade-in of the octaves to training step ``step`` (a no-op without a fade)."""
        if self.fade_steps:
            self.progress.fill_(min(1.0, step / self.fade_steps))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _, _, h, w = features.shape
        grid = position_grid(h, w, features.device)  # [H, W, 4], fp32
        if self.octaves:  # [H, W, 2 + 4L], angles in fp32
            grid = fourier_features(grid[..., :2] * 2 - 1, self.octaves, self.progress)
        return features + self.proj(grid.to(features.dtype)).permute(2, 0, 1).unsqueeze(0)  # [B, C, H, W]


@ENCODERS.register("paper_cnn")
class PaperCNN(nn.Sequential):
    """The Slot Attention paper's encoder: 4 conv layers, 5x5 kernels, ReLU, stride 1."""

    def __init__(self, channels: int = 64):
        layers: list[nn.Module] = []
        in_channels = 3
        for _ in range(4):
            layers += [nn.Conv2d(in_channels, channels, 5, padding=2), nn.ReLU(inplace=True)]
            in_channels = channels
        super().__init__(*layers)
        self.out_channels = channels


class ResidualBlock(nn.Module):
    """Two 5x5 convs with a skip connection (1x1 projection when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 5, padding=2), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 5, padding=2),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


@ENCODERS.register("resnet")
class ResNetEncoder(nn.Module):
    """Report 001's deeper encoder: conv 3->16, six residual blocks growing to 32 and 64, then a projection."""

    widths = (16, 16, 32, 32, 64, 64)

    def __init__(self, channels: int = 128):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, self.widths[0], 5, padding=2), nn.ReLU(inplace=True))
        blocks, in_channels = [], self.widths[0]
        for width in self.widths:
            blocks.append(ResidualBlock(in_channels, width))
            in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.proj = nn.Conv2d(in_channels, channels, 1)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.blocks(self.stem(x)))


@ENCODERS.register("strided_cnn")
class StridedCNN(nn.Sequential):
    """The Slot Attention paper's set-prediction encoder: 4 conv 5x5 with strides 1, 2, 2, 1 (128x128 -> 32x32).

    Fewer tokens than the stride-1 encoder, which set prediction can afford since it decodes no pixels.
    """

    def __init__(self, channels: int = 64):
        layers: list[nn.Module] = []
        in_channels = 3
        for stride in (1, 2, 2, 1):
            layers += [nn.Conv2d(in_channels, channels, 5, stride=stride, padding=2), nn.ReLU(inplace=True)]
            in_channels = channels
        super().__init__(*layers)
        self.out_channels = channels


class ImageEncoder(nn.Module):
    """CNN + soft position embedding + flatten + LayerNorm + MLP: image -> Slot Attention inputs.

    Grouping modules that see the inputs from each slot's own frame (invariant slot attention) replace ``pos`` by
    the identity: no absolute position.
    """

    def __init__(self, name: str, channels: int, input_dim: int):
        super().__init__()
        self.cnn = ENCODERS.build(name, channels)
        out_channels = self.cnn.out_channels
        self.pos = SoftPositionEmbed(out_channels)
        self.norm = nn.LayerNorm(out_channels)
        self.mlp = nn.Sequential(nn.Linear(out_channels, input_dim), nn.ReLU(inplace=True),
                                 nn.Linear(input_dim, input_dim))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``image [B, 3, H, W]`` -> ``(inputs [B, N, D_inputs], (h, w))`` of the feature grid."""
        features = self.pos(self.cnn(image))  # [B, C, h, w]
        h, w = features.shape[-2:]
        tokens = features.flatten(2).transpose(1, 2)  # [B, N, C]
        return self.mlp(self.norm(tokens)), (h, w)  # [B, N, D_inputs]
