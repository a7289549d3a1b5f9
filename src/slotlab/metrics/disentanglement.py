"""Disentanglement view of VQ-SA codes: which object property does each discrete latent variable carry?

Slots are matched to the true objects of each image by the Hungarian algorithm on mask IoU (predicted argmax masks
vs ground-truth ids). Every matched pair gives one sample (code of each variable, value of each true property).
From these samples:

* heat maps ``p(property = value | variable l took code m)`` per variable, the slides' Figure 3
  (``disentanglement_v{l}.png`` and all variables in ``disentanglement_all.png``);
* the normalised mutual information between each variable's code and each property
  (``sklearn.metrics.normalized_mutual_info_score``): 1 = the code determines the property and back, 0 = unrelated.

Object properties come from the dataset: ``extras["obj_props"]`` int64 ``[N, M, P]`` (row m = the object with mask
id m + 1, -1 = padding), ``info["property_names"]`` and ``info["property_values"]``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import normalized_mutual_info_score

from slotlab.metrics.ari import contingency, mask_ids


def match_slots_to_objects(pred_masks: torch.Tensor, true_ids: torch.Tensor,
                           min_iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian matching of predicted slots to true objects, per image, maximising the summed mask IoU.

    Args:
        pred_masks: ``[B, K, H, W]`` soft masks (argmax over K gives each pixel's slot).
        true_ids: ``[B, H, W]`` int object ids, 0 = background (never matched).
        min_iou: matched pairs with a lower IoU are dropped (the slot does not really cover that object).

    Returns:
        ``(image, slot, object_row, iou)`` arrays of equal length; ``object_row = id - 1``.
    """
    num_slots = pred_masks.shape[1]
    pred = mask_ids(pred_masks)  # [B, H, W]
    inter = contingency(pred, true_ids).cpu().numpy()  # [B, T, K'] pixels of true id t given to slot k
    inter = np.pad(inter, ((0, 0), (0, 0), (0, num_slots - inter.shape[2])))  # [B, T, K]
    true_area, pred_area = inter.sum(axis=2, keepdims=True), inter.sum(axis=1, keepdims=True)
    iou = inter / np.maximum(true_area + pred_area - inter, 1)  # [B, T, K]
    images, slots, rows, ious = [], [], [], []
    for b in range(iou.shape[0]):
        present = np.flatnonzero(true_area[b, 1:, 0] > 0) + 1  # true ids present in this image
        if present.size == 0:
            continue
        object_index, slot_index = linear_sum_assignment(-iou[b, present])  # maximise total IoU
        keep = iou[b, present[object_index], slot_index] >= min_iou
        images.append(np.full(keep.sum(), b))
        slots.append(slot_index[keep])
        rows.append(present[object_index[keep]] - 1)
        ious.append(iou[b, present[object_index[keep]], slot_index[keep]])
    if not images:
        return (np.zeros(0, dtype=np.int64),) * 3 + (np.zeros(0),)
    return (np.concatenate(images).astype(np.int64), np.concatenate(slots).astype(np.int64),
            np.concatenate(rows).astype(np.int64), np.concatenate(ious))


def code_property_table(codes: np.ndarray, values: np.ndarray, num_codes: int, num_values: int) -> np.ndarray:
    """Counts ``[num_codes, num_values]`` of (code, property value) pairs; rows with value -1 are left out."""
    keep = values >= 0
    table = np.zeros((num_codes, num_values), dtype=np.int64)
    np.add.at(table, (codes[keep], values[keep]), 1)
    return table


def plot_heatmaps(tables: list[list[np.ndarray]], property_names: list[str], property_values: dict[str, list[str]],
                  nmi: np.ndarray, path: Path, variables: list[int] | None = None) -> Path:
    """Heat maps of ``p(property = value | code)``: one row of panels per variable, one panel per property.

    ``tables[l][p]`` are the counts of :func:`code_property_table`; ``nmi[l, p]`` goes into the panel titles.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slotlab.io import atomic_write_bytes

    variables = list(range(len(tables))) if variables is None else variables
    widths = [len(property_values[name]) for name in property_names]
    num_codes = tables[0][0].shape[0]
    fig, axes = plt.subplots(len(variables), len(property_names), squeeze=False, width_ratios=widths,
                             figsize=(1.2 + 0.42 * sum(widths), 0.5 + (0.3 * num_codes + 0.9) * len(variables)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # grey rows: codes never used
    for row, var in enumerate(variables):
        for col, name in enumerate(property_names):
            ax = axes[row, col]
            counts = tables[var][col].astype(np.float64)  # [M, V]
            totals = counts.sum(axis=1, keepdims=True)
            freq = np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)  # p(value | code)
            ax.imshow(freq, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            ax.set_xticks(range(len(property_values[name])))
            ax.set_xticklabels(property_values[name], rotation=60, fontsize=7, ha="right")
            ax.set_yticks(range(num_codes))
            ax.set_yticklabels([f"{m} ({int(t)})" for m, t in enumerate(totals[:, 0])] if col == 0 else [],
                               fontsize=6)
            if col == 0:
                ax.set_ylabel(f"variable {var}\ncode (count)", fontsize=8)
            ax.set_title(f"{name}  NMI {nmi[var, col]:.2f}", fontsize=8)
    fig.suptitle("p(property = value | code), VQ-SA", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def disentanglement_scores(codes: np.ndarray, props: np.ndarray, ious: np.ndarray, num_objects: int,
                           property_names: list[str], property_values: dict[str, list[str]], num_codes: int,
                           out_dir: Path | None = None, min_iou: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """Relate the codes of matched slots to the properties of their objects; heat maps into ``out_dir``.

    Args:
        codes: ``[n, L]`` the code of each latent variable of every matched slot.
        props: ``[n, P]`` the true property values of the object each slot matched (-1 = unknown).
        ious: ``[n]`` mask IoU of each match (:func:`match_slots_to_objects`).
        num_objects: how many true objects the scored images hold (matched or not).
        property_names: the P property names; ``property_values`` their vocabularies.
        num_codes: M, codes per variable.
        out_dir: gets ``disentanglement_v{l}.png`` per variable and ``disentanglement_all.png`` (None: no pictures).
        min_iou: the IoU the matches were made with (for the message when nothing matched).
        seed: seed of the shuffles that measure the chance level.

    Returns:
        Flat metrics: ``nmi_v{l}_{property}`` for every variable and property, ``nmi_v{l}`` (its best property),
        ``nmi_{property}`` (its best variable), ``nmi_chance`` (mean NMI after shuffling the properties: the level
        that means nothing at this sample size), ``codes_used_v{l}``, ``disent_matched`` / ``disent_objects`` and
        ``disent_match_iou``.
    """
    num_vars = codes.shape[1] if codes.ndim == 2 else 0
    metrics: dict[str, Any] = {"disent_objects": int(num_objects), "disent_matched": int(len(codes)),
                               "disent_match_iou": float(ious.mean()) if len(codes) else None}
    if len(codes) == 0:
        metrics["disentanglement"] = f"skipped: no slot matched a true object with IoU >= {min_iou}"
        return metrics
    rng = np.random.default_rng(seed)
    nmi = np.zeros((num_vars, len(property_names)))
    chance = np.zeros((num_vars, len(property_names)))
    tables = []
    for var in range(num_vars):
        tables.append([])
        for p, name in enumerate(property_names):
            keep = props[:, p] >= 0
            nmi[var, p] = normalized_mutual_info_score(props[keep, p], codes[keep, var])
            chance[var, p] = normalized_mutual_info_score(rng.permutation(props[keep, p]), codes[keep, var])
            tables[var].append(code_property_table(codes[:, var], props[:, p], num_codes,
                                                   len(property_values[name])))
            metrics[f"nmi_v{var}_{name}"] = float(nmi[var, p])
        metrics[f"nmi_v{var}"] = float(nmi[var].max())
        metrics[f"codes_used_v{var}"] = int(len(np.unique(codes[:, var])))
    for p, name in enumerate(property_names):
        metrics[f"nmi_{name}"] = float(nmi[:, p].max())
    metrics["nmi_chance"] = float(chance.mean())
    if out_dir is not None:
        out_dir = Path(out_dir)
        for var in range(num_vars):
            plot_heatmaps(tables, property_names, property_values, nmi, out_dir / f"disentanglement_v{var}.png",
                          variables=[var])
        plot_heatmaps(tables, property_names, property_values, nmi, out_dir / "disentanglement_all.png")
    return metrics


__all__ = ["code_property_table", "disentanglement_scores", "match_slots_to_objects", "plot_heatmaps"]
