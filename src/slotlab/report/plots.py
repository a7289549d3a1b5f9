"""Matplotlib/numpy pictures: loss curves, mask galleries, per-slot images and attention maps.

Masks are coloured with one fixed palette (id -> colour). In every figure that shows predicted masks next to true
ones, each slot takes the colour of the true segment the Hungarian matching (:mod:`slotlab.metrics.overlap`) gives it,
so the same object has the same colour in the true mask, the predicted mask, its per-slot image and its attention
maps; slots without a partner get colours no true segment uses.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from slotlab.io import atomic_write_bytes  # noqa: E402
from slotlab.runs import read_metrics  # noqa: E402


def palette(num_colours: int = 256) -> np.ndarray:
    """A fixed uint8 palette ``[num_colours, 3]``; id 0 (background) is dark grey, ids 1-10 ten distinct hues."""
    cmap = plt.get_cmap("tab20")
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # the 10 strong hues first, then their light twins
    colours = [np.array([40, 40, 40])] + [np.array(cmap(order[i % 20])[:3]) * 255 for i in range(num_colours - 1)]
    return np.stack(colours).astype(np.uint8)


PALETTE = palette()


def colour_ids(ids: np.ndarray) -> np.ndarray:
    """ids ``[..., H, W]`` -> uint8 RGB ``[..., H, W, 3]`` with :data:`PALETTE`."""
    return PALETTE[np.asarray(ids).astype(np.int64) % len(PALETTE)]  # int64: uint8 ids would overflow


def to_uint8_image(images: torch.Tensor) -> np.ndarray:
    """float ``[..., 3, H, W]`` in [-1, 1] -> uint8 ``[..., H, W, 3]``."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return np.moveaxis(array, -3, -1)


def mask_preview(images: torch.Tensor, masks: torch.Tensor, recons: torch.Tensor | None = None,
                 true_masks: torch.Tensor | None = None, count: int = 4) -> np.ndarray:
    """One uint8 picture ``[H', W', 3]`` for the trackers: a row per image (the first ``count``) with the image, its
    reconstruction (if any), the predicted masks (argmax over slots ``masks [B, K, H, W]``) and the true ones (if
    any)."""
    count = min(count, images.shape[0])
    pictures = to_uint8_image(images[:count])
    columns = [list(pictures)]
    if recons is not None:
        columns.append(list(to_uint8_image(recons[:count])))
    columns.append(list(colour_ids(masks[:count].float().argmax(1).cpu().numpy() + 1)))
    if true_masks is not None:
        columns.append(list(colour_ids(true_masks[:count].cpu().numpy())))
    return tile([list(row) for row in zip(*columns)], scale=max(1, 128 // images.shape[-1]))


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
    """Write a uint8 ``[H, W, 3]`` array as a PNG (atomically: a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def save_figure(fig: plt.Figure, path: Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as a PNG (atomically) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def upscale_for_view(size: int) -> int:
    """An integer zoom so small images (32x32) stay readable in galleries."""
    return max(1, 128 // size)


# ------------------------------------------------------------------------------------------------ slot colours
def slot_colours(pred_ids: np.ndarray, true_ids: np.ndarray | None, num_slots: int) -> np.ndarray:
    """Palette index ``[K]`` for each slot of one image, matched to the true segments' colours.

    Args:
        pred_ids: predicted slot ids ``[H, W]``.
        true_ids: true ids ``[H, W]`` (0 = background) or None (then slot k gets colour k + 1).
        num_slots: K.
    """
    if true_ids is None:
        return np.arange(1, num_slots + 1)
    num_true = int(true_ids.max()) + 1
    table = np.bincount(true_ids.ravel().astype(np.int64) * num_slots + pred_ids.ravel(),
                        minlength=num_true * num_slots).reshape(num_true, num_slots)  # [T, K]
    union = table.sum(1, keepdims=True) + table.sum(0, keepdims=True) - table
    iou = np.where(union > 0, table / np.maximum(union, 1), 0.0)  # [T, K]
    rows, cols = linear_sum_assignment(iou, maximize=True)
    colours = np.full(num_slots, -1)
    for true_id, slot in zip(rows, cols):
        if iou[true_id, slot] > 0:
            colours[slot] = true_id
    spare = iter(range(num_true, num_true + num_slots))  # colours no true segment uses
    return np.array([c if c >= 0 else next(spare) for c in colours])


def _coloured_masks(pred_ids: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Predicted ids ``[H, W]`` -> RGB ``[H, W, 3]`` with the per-slot colours."""
    return colour_ids(colours[pred_ids])


def _tint(weights: np.ndarray, colour_index: int) -> np.ndarray:
    """A map in [0, 1] ``[h, w]`` -> uint8 RGB: white at 0, the slot's colour at 1."""
    colour = PALETTE[colour_index % len(PALETTE)].astype(np.float64)  # [3]
    return (255 - np.clip(weights, 0, 1)[..., None] * (255 - colour)).round().astype(np.uint8)  # [h, w, 3]


# ------------------------------------------------------------------------------------------------ galleries
def _labelled_grid(cells: list[list[np.ndarray | None]], column_titles: Sequence[str], row_labels: Sequence[str],
                   frames: list[list[int | None]] | None = None, title: str = "", cell_size: int = 96,
                   pad: int = 6) -> plt.Figure:
    """One figure of a grid of RGB cells with column titles and row labels (one axes: fast to draw).

    Cells of any size are scaled (nearest) to ``cell_size``; ``None`` leaves a cell white; ``frames[i][j]`` draws a
    border in that palette colour around a cell.
    """
    num_rows, num_cols = len(cells), max(len(row) for row in cells)
    step = cell_size + pad
    canvas = np.full((num_rows * step + pad, num_cols * step + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            y, x = pad + i * step, pad + j * step
            frame = None if frames is None else frames[i][j]
            if frame is not None:
                border = pad // 2
                canvas[y - border : y + cell_size + border, x - border : x + cell_size + border] = \
                    PALETTE[frame % len(PALETTE)]
            if cell is not None:
                resized = Image.fromarray(cell).resize((cell_size, cell_size), Image.NEAREST)
                canvas[y : y + cell_size, x : x + cell_size] = np.asarray(resized)
    dpi = 100
    fig = plt.figure(figsize=((canvas.shape[1] + 110) / dpi, (canvas.shape[0] + (60 if title else 35)) / dpi), dpi=dpi)
    ax = fig.add_axes((100 / (canvas.shape[1] + 110), 0.0, canvas.shape[1] / (canvas.shape[1] + 110),
                       canvas.shape[0] / (canvas.shape[0] + (60 if title else 35))))
    ax.imshow(canvas, interpolation="nearest")
    centres = pad + cell_size / 2 + step * np.arange(num_cols)
    ax.xaxis.tick_top()
    ax.set_xticks(centres[: len(column_titles)], list(column_titles), fontsize=9)
    ax.set_yticks(pad + cell_size / 2 + step * np.arange(num_rows), list(row_labels), fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 8 / fig.get_figheight() / dpi)
    return fig


def _cell_size(image_size: int) -> int:
    return max(image_size, 96)


def mask_rows_figure(images: torch.Tensor, true_ids: torch.Tensor | None, pred_masks: torch.Tensor,
                     recons: torch.Tensor, row_labels: Sequence[str] | None = None, title: str = "") -> plt.Figure:
    """Report 001's figure: rows of true mask | predicted mask | true image | reconstruction.

    Args:
        images: ``[B, 3, H, W]`` in [-1, 1].
        true_ids: ``[B, H, W]`` or None (datasets without masks: that column is left out).
        pred_masks: ``[B, K, H, W]`` masks or ids ``[B, H, W]``.
        recons: ``[B, 3, H, W]`` in [-1, 1].
        row_labels: one label per row (e.g. the image index and its ARI).
        title: figure title.
    """
    num_slots = pred_masks.shape[1] if pred_masks.dim() == 4 else int(pred_masks.max()) + 1
    pred_ids = (pred_masks.argmax(dim=1) if pred_masks.dim() == 4 else pred_masks).cpu().numpy()
    columns = (["true mask"] if true_ids is not None else []) + ["predicted mask", "image", "reconstruction"]
    rows = []
    for i in range(images.shape[0]):
        truth = None if true_ids is None else true_ids[i].cpu().numpy()
        colours = slot_colours(pred_ids[i], truth, num_slots)
        rows.append(([colour_ids(truth)] if truth is not None else []) + [
            _coloured_masks(pred_ids[i], colours), to_uint8_image(images[i]), to_uint8_image(recons[i])])
    labels = row_labels if row_labels is not None else [f"#{i}" for i in range(len(rows))]
    return _labelled_grid(rows, columns, labels, title=title, cell_size=_cell_size(images.shape[-1]))


def slots_figure(images: torch.Tensor, true_ids: torch.Tensor | None, masks: torch.Tensor,
                 slot_recons: torch.Tensor | None, recons: torch.Tensor) -> plt.Figure:
    """Per image: image | predicted mask | reconstruction | each slot's content times its mask (on white).

    Each slot's cell is framed in its mask colour. Without per-slot reconstructions (diffusion decoder) the slot
    cells show the input image under the slot's mask.
    """
    num_slots = masks.shape[1]
    pred_ids = masks.argmax(dim=1).cpu().numpy()
    rows, frames = [], []
    for i in range(images.shape[0]):
        colours = slot_colours(pred_ids[i], None if true_ids is None else true_ids[i].cpu().numpy(), num_slots)
        row = [to_uint8_image(images[i]), _coloured_masks(pred_ids[i], colours), to_uint8_image(recons[i])]
        for k in range(num_slots):
            mask = masks[i, k].unsqueeze(0).float()  # [1, H, W]
            content = slot_recons[i, k].float() if slot_recons is not None else images[i].float()
            row.append(to_uint8_image(content * mask + (1 - mask)))  # white where the slot is absent
        rows.append(row)
        frames.append([None, None, None] + [int(c) for c in colours])
    columns = ["image", "masks", "recon"] + [f"slot {k}" for k in range(num_slots)]
    return _labelled_grid(rows, columns, [f"#{i}" for i in range(len(rows))], frames,
                          cell_size=_cell_size(images.shape[-1]))


MAX_ATTENTION_ROWS = 8  # iterations shown per image in attention.png


def shown_iterations(iterations: int) -> list[int]:
    """The (0-based) iterations ``attention_figure`` shows: all of them, or ``MAX_ATTENTION_ROWS`` evenly spaced
    ones from the first to the last."""
    if iterations <= MAX_ATTENTION_ROWS:
        return list(range(iterations))
    return sorted({round(i * (iterations - 1) / (MAX_ATTENTION_ROWS - 1)) for i in range(MAX_ATTENTION_ROWS)})


def attention_figure(images: torch.Tensor, true_ids: torch.Tensor | None, masks: torch.Tensor,
                     attn_per_iter: Sequence[torch.Tensor], feature_size: tuple[int, int]) -> plt.Figure:
    """Slot Attention's attention maps at every iteration: one block of rows per image, one row per iteration.

    With more than :data:`MAX_ATTENTION_ROWS` iterations (``slotlab eval --iters 40``) only that many are shown,
    evenly spaced from the first to the last. Column 0 shows the image (first row) and the final predicted mask
    (second row); the other columns show slot k's attention over the feature grid, white at 0 and the slot's mask
    colour at 1 (attention sums to 1 over slots).
    """
    num_slots = masks.shape[1]
    h, w = feature_size
    pred_ids = masks.argmax(dim=1).cpu().numpy()
    rows, labels = [], []
    for i in range(images.shape[0]):
        colours = slot_colours(pred_ids[i], None if true_ids is None else true_ids[i].cpu().numpy(), num_slots)
        firsts = [to_uint8_image(images[i]), _coloured_masks(pred_ids[i], colours)]
        for row, t in enumerate(shown_iterations(len(attn_per_iter))):
            attn = attn_per_iter[t]
            maps = attn[i].float().reshape(num_slots, h, w).cpu().numpy()  # [K, h, w]
            rows.append([firsts[row] if row < len(firsts) else None] + [_tint(maps[k], int(colours[k]))
                                                                    for k in range(num_slots)])
            labels.append(f"#{i} iter {t + 1}")
    columns = ["image / masks"] + [f"slot {k}" for k in range(num_slots)]
    return _labelled_grid(rows, columns, labels, cell_size=_cell_size(images.shape[-1]))


def mask_gallery(images: torch.Tensor, true_ids: torch.Tensor | None, pred_masks: torch.Tensor,
                 recons: torch.Tensor) -> np.ndarray:
    """Rows of: true mask | predicted mask | true image | reconstruction, as one uint8 array (no labels)."""
    num_slots = pred_masks.shape[1]
    pred_ids = pred_masks.argmax(dim=1).cpu().numpy()
    rows = []
    for i in range(images.shape[0]):
        truth = None if true_ids is None else true_ids[i].cpu().numpy()
        row = [] if truth is None else [colour_ids(truth)]
        row += [_coloured_masks(pred_ids[i], slot_colours(pred_ids[i], truth, num_slots)), to_uint8_image(images[i]),
                to_uint8_image(recons[i])]
        rows.append(row)
    return tile(rows, scale=upscale_for_view(images.shape[-1]))


def slot_gallery(images: torch.Tensor, masks: torch.Tensor, slot_recons: torch.Tensor | None) -> np.ndarray:
    """Per image: the image, then each slot's content times its mask (on white), as one uint8 array."""
    rows = []
    for i in range(images.shape[0]):
        row = [to_uint8_image(images[i])]
        for k in range(masks.shape[1]):
            mask = masks[i, k].unsqueeze(0)  # [1, H, W]
            content = slot_recons[i, k] if slot_recons is not None else images[i]
            row.append(to_uint8_image(content * mask + (1 - mask)))  # white where the slot is absent
        rows.append(row)
    return tile(rows, scale=upscale_for_view(images.shape[-1]))


# ------------------------------------------------------------------------------------------------ curves
def plot_curves(run_dir: Path) -> Path | None:
    """``RUN_DIR/curves.png``: train and val loss vs epoch, the LR, and val ARI / FG-ARI when logged.

    Returns the path, or None when the run has no training records yet.
    """
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    val = [r for r in records if r.get("split") == "val" and "loss" in r]
    if not train:
        return None
    has_ari = any("ari" in r or "fg_ari" in r for r in val)
    fig, axes = plt.subplots(1, 3 if has_ari else 2, figsize=(13 if has_ari else 9, 3.4))
    ax = axes[0]
    ax.plot([r.get("epoch", r["step"]) for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax.plot([r.get("epoch", r["step"]) for r in val], [r["loss"] for r in val], "o-", label="val", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if all(r["loss"] > 0 for r in train + val):
        ax.set_yscale("log")
    ax.legend()
    ax.set_title("loss")
    ax = axes[1]
    ax.plot([r["step"] for r in train if "lr" in r], [r["lr"] for r in train if "lr" in r])
    ax.set_xlabel("step")
    ax.set_title("learning rate")
    if has_ari:
        ax = axes[2]
        for name, label in (("ari", "ARI"), ("fg_ari", "FG-ARI"), ("attn_fg_ari", "FG-ARI, attention masks")):
            points = [(r.get("epoch", r["step"]), r[name]) for r in val if name in r]
            if points:
                ax.plot(*zip(*points), "o-" if name != "attn_fg_ari" else "o--", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("val ARI (objects emerge)")
    fig.tight_layout()
    return save_figure(fig, Path(run_dir) / "curves.png", dpi=110)
