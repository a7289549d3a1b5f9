"""``slotlab eval RUN_DIR``: score a trained run on a split and draw its masks.

Writes ``RUN_DIR/eval/metrics.json`` (``ari``, ``fg_ari``, ``mse``, ...) and pictures under ``RUN_DIR/eval/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from slotlab.data import build_dataset, to_model_batch
from slotlab.metrics import ARIMetric
from slotlab.models import build_model
from slotlab.train.checkpoint import atomic_write_text
from slotlab.train.loop import load_run, pick_device


def load_trained_model(run_dir: Path, checkpoint: str = "best", device: str = "auto"):
    """Rebuild a run's model from its run directory alone; returns ``(config, model)`` in eval mode.

    ``checkpoint="best"`` falls back to ``last`` when the run has no best checkpoint yet.
    """
    run_dir = Path(run_dir)
    if checkpoint == "best" and not (run_dir / "checkpoints" / "best.pt").exists():
        checkpoint = "last"
    config, state = load_run(run_dir, checkpoint)
    model = build_model(config)
    model.load_state_dict(state["model"])
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
        seed: seed of the slot initialisation noise.

    Returns:
        The metrics dict written to ``eval/metrics.json``.
    """
    run_dir = Path(run_dir)
    config, model = load_trained_model(run_dir, checkpoint, device)
    dev = next(model.parameters()).device
    dataset = build_dataset(config.data, split)
    count = len(dataset) if limit <= 0 else min(limit, len(dataset))
    batch_size = batch_size or config.train.batch_size
    torch.manual_seed(seed)
    ari_metric = ARIMetric()
    squared_error, pixels = 0.0, 0
    first = None
    for start in tqdm(range(0, count, batch_size), desc=f"eval {split}", dynamic_ncols=True):
        indices = np.arange(start, min(start + batch_size, count))
        batch = to_model_batch(dataset.batch(indices), dev)
        out = model(batch["image"])
        squared_error += float(((out.recon.float() - batch["image"]) ** 2).sum())
        pixels += batch["image"].numel()
        if "mask" in batch:
            ari_metric.update(out.masks.float(), batch["mask"])
        if first is None:
            first = (batch, out)
    metrics: dict[str, Any] = {"split": split, "num_images": count, "checkpoint": checkpoint,
                               "mse": squared_error / max(pixels, 1)}
    if ari_metric.count:
        metrics.update(ari_metric.compute())
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if first is not None:
        _save_pictures(out_dir, *first)
    return metrics


def _save_pictures(out_dir: Path, batch: dict[str, torch.Tensor], out, num: int = 8) -> None:
    from slotlab.report.plots import mask_gallery, save_png, slot_gallery

    images = batch["image"][:num]
    true = batch.get("mask")
    save_png(mask_gallery(images, None if true is None else true[:num], out.masks[:num].float(),
                          out.recon[:num].float()), out_dir / "masks.png")
    save_png(slot_gallery(images, out.masks[:num].float(), out.slot_recons[:num].float()), out_dir / "slots.png")
