"""The slot autoencoder task (Part 1, and VQ-SA with ``model.quantiser=vq``): build, train, score.

Scoring (``slotlab eval`` and the trainer's validation) gives ARI, FG-ARI, mIoU, mBO and MSE of the decoder's masks,
and the same scores of Slot Attention's own masks (``attn_*``); with ``out_dir`` it also writes, under
``RUN_DIR/eval/``:

* ``per_image.csv``: every score of every image;
* ``best.png`` / ``worst.png``: the 5 images with the highest / lowest ARI (true mask | predicted mask | image |
  reconstruction, report 001's figure), ``masks.png`` the same for the first images;
* ``slots.png``: per-slot images; ``attention.png``: Slot Attention's maps at every iteration for a few images;
* VQ-SA runs: the disentanglement view (``disentanglement_*.png`` and NMI per variable and property).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slotlab.io import atomic_write_text
from slotlab.metrics import ObjectDiscoveryMetrics
from slotlab.metrics.disentanglement import disentanglement_scores, match_slots_to_objects
from slotlab.metrics.object_discovery import PLACE_SCORES
from slotlab.models import SlotAutoencoder
from slotlab.models.slot_attention import attention_masks
from slotlab.tasks import Task, register

GALLERY_SIZE = 5  # images in best.png / worst.png
FIRST_IMAGES = 8  # images in masks.png
SLOT_IMAGES = 4  # images in slots.png
ATTENTION_IMAGES = 3  # images in attention.png
CSV_COLUMNS = ("index", "ari", "fg_ari", "miou", "mbo", "mse", "clevrtex_mse", "num_objects", "num_segments",
               "object_pixels", *PLACE_SCORES)


@register("autoencoder")
class AutoencoderTask(Task):
    """Slot Attention autoencoder (:class:`~slotlab.models.SlotAutoencoder`), with VQ-SA's codes when configured."""

    def build_model(self) -> nn.Module:
        return SlotAutoencoder(self.config)

    def start_training(self, model: nn.Module, train_set: Any, fresh: bool) -> None:
        if fresh:
            model.init_fresh_run()  # two-stage VQ-SA starts from the weights of vq.init_run

    def evaluator(self, model: nn.Module, dataset: Any = None, out_dir: Path | None = None):
        extras = []
        if self.config.model.quantiser == "vq" and dataset is not None:
            extras.append(DisentanglementView(model, dataset.info, out_dir))
        return ObjectDiscoveryEvaluator(model, out_dir, extras=extras, attention_scores=True)


class ObjectDiscoveryEvaluator:
    """ARI, FG-ARI, mIoU, mBO and MSE of a slot model; with ``out_dir``, ``per_image.csv`` and the pictures.

    ``model(image)`` must return an object with ``recon [B,3,H,W]``, ``masks [B,K,H,W]``, ``slot_recons``
    (``[B,K,3,H,W]`` or None), ``attn_per_iter`` (list of ``[B,K,N]`` or None) and ``feature_size`` ``(h, w)``.
    With ``masks_only`` it calls ``model.predict_masks(image)`` instead (no reconstruction, no MSE): the cheap
    validation of decoders that sample. ``extras`` get ``(batch, indices, out)`` of every batch (VQ-SA codes).
    With ``attention_scores`` the masks that Slot Attention's last iteration draws (``out.attn``, upsampled to the
    image) are scored too, as ``attn_ari``, ``attn_fg_ari``, ``attn_miou`` and ``attn_mbo``: the decoder's alpha masks
    are the Slot Attention paper's choice, the attention masks that of models without them (SLATE, DINOSAUR).
    Where the reconstruction is composed with the attention masks (``model.recon_masks=attention``) the decoder's
    own masks, which draw from slots alone, are scored as ``decoder_ari``, ``decoder_fg_ari``, ``decoder_miou`` and
    ``decoder_mbo``.
    """

    def __init__(self, model: torch.nn.Module, out_dir: Path | None = None, masks_only: bool = False,
                 extras: list | None = None, attention_scores: bool = False):
        self.model, self.out_dir, self.masks_only = model, out_dir, masks_only
        self.extras = extras or []
        self.metrics = ObjectDiscoveryMetrics()
        self.attention_metrics = ObjectDiscoveryMetrics() if attention_scores else None
        self.decoder_metrics: ObjectDiscoveryMetrics | None = None  # made on the first output with decoder_masks
        self.extremes = _Extremes(GALLERY_SIZE)
        self.rows: list[dict[str, Any]] = []
        self.first = None
        self.preview: np.ndarray | None = None  # the trackers' mask picture of the first batch

    def update(self, batch: dict[str, torch.Tensor], indices: np.ndarray) -> None:
        true = batch.get("mask")
        if self.masks_only:
            if true is None and self.preview is not None:
                return  # nothing to score, and the picture is taken: no need to run the encoder
            masks = self.model.predict_masks(batch["image"]).float()
            if true is not None:
                self.metrics.update(masks, true)
            self._keep_preview(batch["image"], masks, None, true)
            return
        out = self.model(batch["image"])
        self._keep_preview(batch["image"], out.masks, out.recon, true)
        for extra in self.extras:
            extra.update(batch, indices, out)
        if self.attention_metrics is not None and true is not None and out.feature_size is not None:
            attention = attention_masks(out.attn.float(), out.feature_size, tuple(true.shape[-2:]))  # [B, K, H, W]
            self.attention_metrics.update(attention, true)
        if getattr(out, "decoder_masks", None) is not None and true is not None:
            if self.decoder_metrics is None:
                self.decoder_metrics = ObjectDiscoveryMetrics()
            self.decoder_metrics.update(out.decoder_masks.float(), true)
        if self.out_dir is None:
            self.metrics.update(out.masks.float(), true, out.recon.float(), batch["image"])
            return
        scores = self.metrics.update(out.masks.float(), true, out.recon.float(), batch["image"])
        scores = {name: value.cpu().numpy() for name, value in scores.items()}
        for i, index in enumerate(indices):
            self.rows.append({"index": int(index), **{name: value[i].item() for name, value in scores.items()}})
        rank = scores["ari"] if true is not None else -scores["mse"]  # no masks: rank by reconstruction
        self.extremes.add(rank, indices, batch, out)
        if self.first is None:
            self.first = (batch, out)

    def _keep_preview(self, images, masks, recons, true) -> None:
        if self.preview is None:
            from slotlab.report.plots import mask_preview

            self.preview = mask_preview(images, masks, recons, true)

    def summary(self) -> dict[str, Any]:
        metrics = self.metrics.compute()  # empty without images; ARI alone for masks_only
        if self.out_dir is not None and self.rows:
            _write_csv(self.rows, self.out_dir / "per_image.csv")
            ranked_by = "ARI" if "mask" in self.first[0] else "MSE"
            _save_pictures(self.out_dir, self.first, self.extremes, ranked_by)
        for prefix, other in (("attn", self.attention_metrics), ("decoder", self.decoder_metrics)):
            if other is not None:
                scores = other.compute()
                metrics.update({f"{prefix}_{name}": scores[name] for name in ("ari", "fg_ari", "miou", "mbo")
                                if name in scores})
        for extra in self.extras:
            metrics.update(extra.summary())
        return metrics


class DisentanglementView:
    """VQ-SA: which object property each discrete latent variable carries (a consumer of the evaluator's outputs).

    Slots are matched to true objects by mask IoU (Hungarian); see :mod:`slotlab.metrics.disentanglement`.
    """

    def __init__(self, model: torch.nn.Module, info: dict[str, Any], out_dir: Path | None, min_iou: float = 0.5):
        self.quantiser = model.quantiser
        self.names = list(info.get("property_names", []))
        self.values = {name: list(info["property_values"][name]) for name in self.names}
        self.out_dir, self.min_iou = out_dir, min_iou
        self.codes, self.props, self.ious, self.objects = [], [], [], 0

    def update(self, batch: dict[str, torch.Tensor], indices: np.ndarray, out) -> None:
        if not self.names or "obj_props" not in batch or "mask" not in batch:
            return
        image, slot, row, iou = match_slots_to_objects(out.masks.float(), batch["mask"], self.min_iou)
        props = batch["obj_props"].cpu().numpy()  # [B, M, P]
        self.codes.append(out.codes.cpu().numpy()[image, slot])  # [n, L]
        self.props.append(props[image, row])  # [n, P]
        self.ious.append(iou)
        self.objects += int((props[..., 0] >= 0).sum())

    def summary(self) -> dict[str, Any]:
        if not self.codes:
            return {"disentanglement": "skipped: the dataset has no object masks and properties"}
        return disentanglement_scores(np.concatenate(self.codes), np.concatenate(self.props),
                                      np.concatenate(self.ious), self.objects, self.names, self.values,
                                      self.quantiser.codebook_size, self.out_dir, self.min_iou)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = [c for c in CSV_COLUMNS if c in rows[0]]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


class _Extremes:
    """Keeps the ``size`` highest- and lowest-scoring images seen so far (on the CPU), for best.png / worst.png."""

    def __init__(self, size: int):
        self.size = size
        self.items: list[tuple[float, int, dict[str, torch.Tensor | None]]] = []

    def add(self, scores: np.ndarray, indices: np.ndarray, batch: dict[str, torch.Tensor], out) -> None:
        order = np.argsort(scores, kind="stable")
        keep = set(order[: self.size].tolist()) | set(order[-self.size :].tolist())
        for i in sorted(keep):
            self.items.append((float(scores[i]), int(indices[i]), {
                "image": batch["image"][i].cpu(), "mask": batch["mask"][i].cpu() if "mask" in batch else None,
                "masks": out.masks[i].float().cpu(), "recon": out.recon[i].float().cpu()}))
        self.items.sort(key=lambda item: (item[0], item[1]))
        if len(self.items) > 2 * self.size:
            self.items = self.items[: self.size] + self.items[-self.size :]

    def best(self) -> list:
        return self.items[::-1][: self.size]

    def worst(self) -> list:
        return self.items[: self.size]


def _stack(items: list, key: str) -> torch.Tensor | None:
    values = [payload[key] for _, _, payload in items]
    return None if values[0] is None else torch.stack(values)


def _save_pictures(out_dir: Path, first, extremes: _Extremes, ranked_by: str) -> None:
    from slotlab.report.plots import attention_figure, mask_rows_figure, save_figure, slots_figure

    batch, out = first
    true = batch.get("mask")
    for name, items in (("best", extremes.best()), ("worst", extremes.worst())):
        labels = [f"#{index}\n{ranked_by} {score if ranked_by == 'ARI' else -score:.3f}" for score, index, _ in items]
        fig = mask_rows_figure(_stack(items, "image"), _stack(items, "mask"), _stack(items, "masks"),
                               _stack(items, "recon"), labels, title=f"{name} {len(items)} by {ranked_by}")
        save_figure(fig, out_dir / f"{name}.png")
    n = min(FIRST_IMAGES, batch["image"].shape[0])
    fig = mask_rows_figure(batch["image"][:n], None if true is None else true[:n], out.masks[:n].float(),
                           out.recon[:n].float(), [f"#{i}" for i in range(n)], title="first images")
    save_figure(fig, out_dir / "masks.png")
    n = min(SLOT_IMAGES, batch["image"].shape[0])
    slot_recons = None if out.slot_recons is None else out.slot_recons[:n].float()  # None: diffusion decoder
    fig = slots_figure(batch["image"][:n], None if true is None else true[:n], out.masks[:n].float(), slot_recons,
                       out.recon[:n].float())
    save_figure(fig, out_dir / "slots.png")
    if getattr(out, "attn_per_iter", None) and getattr(out, "feature_size", None):
        n = min(ATTENTION_IMAGES, batch["image"].shape[0])
        fig = attention_figure(batch["image"][:n], None if true is None else true[:n], out.masks[:n].float(),
                               [attn[:n] for attn in out.attn_per_iter], tuple(out.feature_size))
        save_figure(fig, out_dir / "attention.png")
