"""``slotlab eval RUN_DIR``: score a trained run on a split and draw its masks.

Writes under ``RUN_DIR/eval/``:

* ``metrics.json``: ``ari``, ``fg_ari``, ``miou``, ``mbo``, ``mse``, ``clevrtex_mse`` (see ``docs/metrics.md``), plus
  what a task adds (VAE PSNR, set prediction AP, VQ disentanglement);
* ``per_image.csv``: every score of every image;
* ``best.png`` / ``worst.png``: the 5 images with the highest / lowest ARI (true mask | predicted mask | image |
  reconstruction, report 001's figure), ``masks.png`` the same for the first images;
* ``slots.png``: per-slot images; ``attention.png``: Slot Attention's maps at every iteration for a few images.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from slotlab.data import build_dataset, to_model_batch
from slotlab.errors import UserError
from slotlab.io import atomic_write_text, load_weights
from slotlab.metrics import ObjectDiscoveryMetrics
from slotlab.models import build_model
from slotlab.runs import load_run, pick_device

GALLERY_SIZE = 5  # images in best.png / worst.png
FIRST_IMAGES = 8  # images in masks.png
SLOT_IMAGES = 4  # images in slots.png
ATTENTION_IMAGES = 3  # images in attention.png
CSV_COLUMNS = ("index", "ari", "fg_ari", "miou", "mbo", "mse", "clevrtex_mse", "num_objects", "num_segments")


def load_trained_model(run_dir: Path, checkpoint: str = "best", device: str = "auto"):
    """Rebuild a run's model from its run directory alone; returns ``(config, model)`` in eval mode.

    ``checkpoint="best"`` falls back to ``last`` when the run has no best checkpoint yet.
    """
    run_dir = Path(run_dir)
    if checkpoint == "best" and not (run_dir / "checkpoints" / "best.pt").exists():
        checkpoint = "last"
    config, state = load_run(run_dir, checkpoint)
    model = build_model(config)
    load_weights(model, state["model"], run_dir / "checkpoints" / f"{checkpoint}.pt")
    model.to(pick_device(device)).eval()
    return config, model


@torch.no_grad()
def evaluate_run(run_dir: Path, split: str = "val", checkpoint: str = "best", limit: int = 0,
                 batch_size: int = 0, device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Score ``split`` of the run's dataset and save metrics and pictures under ``RUN_DIR/eval``.

    Args:
        run_dir: a run directory made by ``slotlab train``.
        split: ``val``, ``train`` or ``test``.
        checkpoint: ``best`` or ``last``.
        limit: score only the first ``limit`` images (0 = all).
        batch_size: evaluation batch size (0 = the training batch size).
        device: ``auto``, ``cpu``, ``cuda``, ...
        seed: seed of the slot initialisation noise.

    Returns:
        The metrics dict written to ``eval/metrics.json``.
    """
    if limit < 0:
        raise UserError(f"--limit must be 0 (all images) or positive, got {limit}")
    if batch_size < 0:
        raise UserError(f"--batch-size must be 0 (the training batch size) or positive, got {batch_size}")
    run_dir = Path(run_dir)
    config, model = load_trained_model(run_dir, checkpoint, device)
    dev = next(model.parameters()).device
    dataset = build_dataset(config.data, split)
    if len(dataset) == 0:
        raise UserError(f"the {split} split of dataset {config.data.name!r} is empty: nothing to evaluate")
    count = len(dataset) if limit == 0 else min(limit, len(dataset))
    batch_size = batch_size or config.train.batch_size
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"split": split, "num_images": count, "checkpoint": checkpoint}
    torch.manual_seed(seed)
    start = time.perf_counter()
    if config.task == "vae":  # the stage-1 image autoencoder has no slots: reconstruction PSNR instead of ARI
        from slotlab.diffusion.vae import evaluate_vae

        metrics.update(evaluate_vae(model, dataset, dev, count, batch_size, out_dir))
    elif config.task == "setpred":  # set property prediction: AP at the paper's distance thresholds, no masks
        from slotlab.metrics.set_prediction import evaluate_set_prediction

        metrics.update(evaluate_set_prediction(model, dataset, dev, count, batch_size))
    else:
        metrics.update(score_object_discovery(model, dataset, dev, count, batch_size, out_dir))
        if config.model.quantiser == "vq":  # VQ-SA: which property does each discrete variable carry
            from slotlab.metrics.disentanglement import evaluate_disentanglement

            metrics.update(evaluate_disentanglement(model, dataset, dev, count, batch_size, out_dir))
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def score_object_discovery(model: torch.nn.Module, dataset, device: torch.device, count: int, batch_size: int,
                           out_dir: Path) -> dict[str, Any]:
    """Object-discovery scores of the first ``count`` images; writes ``per_image.csv`` and the pictures.

    ``model(image)`` must return an object with ``recon [B,3,H,W]``, ``masks [B,K,H,W]``, ``slot_recons``
    (``[B,K,3,H,W]`` or None), ``attn_per_iter`` (list of ``[B,K,N]`` or None) and ``feature_size`` ``(h, w)``.
    """
    metrics = ObjectDiscoveryMetrics()
    extremes = _Extremes(GALLERY_SIZE)
    rows: list[dict[str, Any]] = []
    first = None
    for start in tqdm(range(0, count, batch_size), desc="eval", dynamic_ncols=True):
        indices = np.arange(start, min(start + batch_size, count))
        batch = to_model_batch(dataset.batch(indices), device)
        out = model(batch["image"])
        true = batch.get("mask")
        scores = metrics.update(out.masks.float(), true, out.recon.float(), batch["image"])
        scores = {name: value.cpu().numpy() for name, value in scores.items()}
        for i, index in enumerate(indices):
            rows.append({"index": int(index), **{name: value[i].item() for name, value in scores.items()}})
        rank = scores["ari"] if true is not None else -scores["mse"]  # no masks: rank by reconstruction
        extremes.add(rank, indices, batch, out)
        if first is None:
            first = (batch, out)
    _write_csv(rows, out_dir / "per_image.csv")
    _save_pictures(out_dir, first, extremes, ranked_by="ARI" if "mask" in first[0] else "MSE")
    return metrics.compute()


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
