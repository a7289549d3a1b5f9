"""The dataset interface every slotlab dataset follows.

All datasets hold (or memory-map) their prepared split as uint8 arrays, so a batch is one fancy-index away and
conversion to float happens on the model's device:

* ``images``: uint8 ``[N, H, W, 3]``
* ``masks``: uint8 ``[N, H, W]`` object ids, 0 = background (absent for datasets without masks)
* ``extras``: optional per-image arrays (e.g. object properties for set prediction), first axis N

``dataset[i]`` gives the documented item dict ``{"image": float [3,H,W] in [-1,1], "mask": int64 [H,W]}``;
``dataset.batch(indices)`` gives the raw uint8 batch for the training loop, and :func:`to_model_batch` converts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm import tqdm


class ArrayDataset(torch.utils.data.Dataset):
    """A split held as uint8 arrays (numpy arrays or memory maps)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray | None = None,
                 extras: dict[str, np.ndarray] | None = None, info: dict[str, Any] | None = None):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
        if masks is not None and masks.shape != images.shape[:3]:
            raise ValueError(f"masks {masks.shape} do not match images {images.shape}")
        self.images = images
        self.masks = masks
        self.extras = extras or {}
        self.info = info or {}

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])

    def batch(self, indices: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw uint8 batch: ``image [B,H,W,3]``, ``mask [B,H,W]`` and any extras, as CPU tensors."""
        idx = np.asarray(indices, dtype=np.int64)
        out = {"image": torch.from_numpy(np.ascontiguousarray(self.images[idx]))}
        if self.masks is not None:
            out["mask"] = torch.from_numpy(np.ascontiguousarray(self.masks[idx]))
        for name, array in self.extras.items():
            out[name] = torch.from_numpy(np.ascontiguousarray(array[idx]))
        return out

    def batches(self, count: int, batch_size: int, device: torch.device | str = "cpu", desc: str = "",
                start: int = 0) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """Images ``start .. start + count - 1`` in order, as ``(indices, model batch on device)`` pairs.

        The one batched loop of slotlab: evaluation, validation, slot libraries and compositions all use it. A
        ``desc`` shows a progress bar.
        """
        stop = min(start + count, len(self))
        steps = range(start, stop, batch_size)
        for first in tqdm(steps, desc=desc, dynamic_ncols=True, disable=not desc, mininterval=1.0):
            indices = np.arange(first, min(first + batch_size, stop))
            yield indices, to_model_batch(self.batch(indices), device)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        raw = self.batch(np.array([index]))
        item = to_model_batch(raw, torch.device("cpu"))
        return {name: value[0] for name, value in item.items()}


def to_model_batch(raw: dict[str, torch.Tensor], device: torch.device | str,
                   non_blocking: bool = False) -> dict[str, torch.Tensor]:
    """Move a raw uint8 batch to ``device`` and convert there: image -> float [B,3,H,W] in [-1,1], mask -> int64."""
    out = {}
    for name, value in raw.items():
        value = value.to(device, non_blocking=non_blocking)
        if name == "image":
            value = value.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # [B,3,H,W] in [-1,1]
        elif name == "mask":
            value = value.long()  # [B,H,W]
        out[name] = value
    return out


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``[B,3,H,W]`` in [-1,1] -> uint8 ``[B,H,W,3]`` (for saving PNGs and FID)."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()
