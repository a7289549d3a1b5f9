"""Reconstruction error: MSE as a per-value mean and as the CLEVRTex per-image sum.

* ``mse``: mean squared error per pixel and channel, images in the model's [-1, 1] range (the training loss).
* ``clevrtex_mse``: the CLEVRTex evaluator's ``MSE``: images mapped to [0, 1], squared error summed over channels and
  pixels of each image, then averaged over images. On [0, 1] the error is a quarter of that on [-1, 1].
"""

from __future__ import annotations

import torch


def mse_per_image(recon: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Mean squared error ``[B]`` per value, both ``[B, 3, H, W]`` in [-1, 1]."""
    return ((recon.float() - image.float()) ** 2).flatten(1).mean(dim=1)


def clevrtex_mse_per_image(recon: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """CLEVRTex ``MSE`` ``[B]``: squared error summed over each image on [0, 1] pixels; inputs in [-1, 1]."""
    recon01 = (recon.float() + 1) / 2  # [B, 3, H, W] in [0, 1]
    image01 = (image.float() + 1) / 2  # [B, 3, H, W]
    return ((recon01 - image01) ** 2).flatten(1).sum(dim=1)


class MSEMetric:
    """Accumulates ``mse`` and ``clevrtex_mse`` over batches: ``update(recon, image)`` then ``compute()``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.mse_sum = 0.0
        self.clevrtex_sum = 0.0
        self.count = 0

    def update(self, recon: torch.Tensor, image: torch.Tensor) -> None:
        """Add a batch of reconstructions and images, both ``[B, 3, H, W]`` in [-1, 1]."""
        self.mse_sum += float(mse_per_image(recon, image).sum())
        self.clevrtex_sum += float(clevrtex_mse_per_image(recon, image).sum())
        self.count += int(image.shape[0])

    def compute(self) -> dict[str, float]:
        return {"mse": self.mse_sum / max(self.count, 1), "clevrtex_mse": self.clevrtex_sum / max(self.count, 1)}
