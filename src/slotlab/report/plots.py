"""Matplotlib/numpy pictures: loss curves, mask galleries and per-slot images.

Masks are coloured with one fixed palette (id -> colour), so colours are consistent across a figure.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from slotlab.train.logging import read_metrics  # noqa: E402


def palette(num_colours: int = 256) -> np.ndarray:
    """A fixed uint8 palette ``[num_colours, 3]``; id 0 (background) is dark grey."""
    cmap = plt.get_cmap("tab20")
    colours = [np.array(cmap(i % 20)[:3]) * 255 for i in range(num_colours)]
    colours[0] = np.array([40, 40, 40])
    return np.stack(colours).astype(np.uint8)


PALETTE = palette()


def colour_ids(ids: np.ndarray) -> np.ndarray:
    """ids ``[..., H, W]`` -> uint8 RGB ``[..., H, W, 3]`` with :data:`PALETTE`."""
    return PALETTE[np.asarray(ids) % len(PALETTE)]


def to_uint8_image(images: torch.Tensor) -> np.ndarray:
    """float ``[..., 3, H, W]`` in [-1, 1] -> uint8 ``[..., H, W, 3]``."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return np.moveaxis(array, -3, -1)


def tile(rows: list[list[np.ndarray]], pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile a grid of equally sized uint8 images ``[H, W, 3]`` with white padding."""
    h, w = rows[0][0].shape[:2]
    n_cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas[pad + i * (h + pad) : pad + i * (h + pad) + h, pad + j * (w + pad) : pad + j * (w + pad) + w] = image
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return canvas


def save_png(array: np.ndarray, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def upscale_for_view(size: int) -> int:
    """An integer zoom so small images (32x32) stay readable in galleries."""
    return max(1, 128 // size)


def mask_gallery(images: torch.Tensor, true_ids: torch.Tensor | None, pred_masks: torch.Tensor,
                 recons: torch.Tensor) -> np.ndarray:
    """Rows of: true mask | predicted mask | true image | reconstruction (report 001's figure)."""
    pred_ids = pred_masks.argmax(dim=1).cpu().numpy()
    rows = []
    for i in range(images.shape[0]):
        row = []
        if true_ids is not None:
            row.append(colour_ids(true_ids[i].cpu().numpy()))
        row += [colour_ids(pred_ids[i] + 1), to_uint8_image(images[i]), to_uint8_image(recons[i])]
        rows.append(row)
    return tile(rows, scale=upscale_for_view(images.shape[-1]))


def slot_gallery(images: torch.Tensor, masks: torch.Tensor, slot_recons: torch.Tensor | None) -> np.ndarray:
    """Per image: the image, then each slot's content times its mask (on white)."""
    rows = []
    for i in range(images.shape[0]):
        row = [to_uint8_image(images[i])]
        for k in range(masks.shape[1]):
            mask = masks[i, k].unsqueeze(0)  # [1, H, W]
            content = slot_recons[i, k] if slot_recons is not None else images[i]
            row.append(to_uint8_image(content * mask + (1 - mask)))  # white where the slot is absent
        rows.append(row)
    return tile(rows, scale=upscale_for_view(images.shape[-1]))


def plot_curves(run_dir: Path) -> Path | None:
    """``RUN_DIR/curves.png``: train and val loss vs epoch, the LR, and val (FG-)ARI when logged."""
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train" and "loss" in r]
    val = [r for r in records if r["split"] == "val" and "loss" in r]
    if not train:
        return None
    has_ari = any("fg_ari" in r for r in val)
    fig, axes = plt.subplots(1, 3 if has_ari else 2, figsize=(13 if has_ari else 9, 3.4))
    ax = axes[0]
    ax.plot([r["epoch"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax.plot([r["epoch"] for r in val], [r["loss"] for r in val], "o-", label="val", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("reconstruction loss")
    ax = axes[1]
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set_xlabel("step")
    ax.set_title("learning rate")
    if has_ari:
        ax = axes[2]
        for name in ("ari", "fg_ari"):
            ax.plot([r["epoch"] for r in val if name in r], [r[name] for r in val if name in r], "o-", ms=3,
                    label=name)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("val ARI")
    fig.tight_layout()
    path = Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
