"""Average precision for set property prediction, exactly as the Slot Attention paper computes it.

Every slot is a detection ranked by its "is object" score. Going down that ranking over the whole split, a detection
is a true positive when (1) some real object of its image has all categorical properties equal to the predicted
ones, (2) the *closest* such object lies within ``threshold`` of the predicted coordinates (distances in scene units:
coordinates in [0, 1] times ``coord_scale`` = 6, CLEVR's [-3, 3] floor), and (3) that object was not claimed by a
higher-ranked detection. Otherwise it is a false positive. (As in the paper's code, a detection whose closest
matching object is already claimed is a false positive even if another matching object is free.) AP is the area
under the precision envelope over recall, with recall relative to all real objects.

Reference: ``average_precision_clevr`` and ``compute_average_precision`` in google-research/slot_attention/utils.py.
Thresholds used in the paper: inf (no distance check, written -1 there), 1, 0.5, 0.25, 0.125.
"""

from __future__ import annotations

import math

import numpy as np
import torch

AP_THRESHOLDS = (math.inf, 1.0, 0.5, 0.25, 0.125)
PAPER_COORD_SCALE = 6.0  # CLEVR coordinates in [-3, 3] are stored in [0, 1]; distances are measured in the former


def ap_key(threshold: float) -> str:
    """Metric name of the AP at ``threshold``: ``ap_inf``, ``ap_1``, ``ap_0.5``, ..."""
    return "ap_inf" if math.isinf(threshold) or threshold == -1 else f"ap_{threshold:g}"


def average_precision(pred: torch.Tensor, target: torch.Tensor, threshold: float,
                      coord_scale: float = PAPER_COORD_SCALE) -> float:
    """AP of set predictions at one distance threshold (the Slot Attention paper's definition).

    Args:
        pred: ``[B, K, 3 + P + 1]``: per slot the coordinates (x, y, z in [0, 1]), the P predicted categorical
            property indices, and the "is object" score (any monotone confidence; only its order matters).
        target: ``[B, M, 3 + P + 1]``: per object the coordinates, the P true property indices (-1 = unknown, which
            any prediction matches; the paper's data has none), and 1 for a real object or 0 for a padding row.
        threshold: largest accepted distance (in units of ``coord_scale``); ``math.inf`` or -1 = no limit.
        coord_scale: factor applied to coordinate differences before the Euclidean norm.

    Returns:
        The average precision in [0, 1].

    Raises:
        ValueError: on mismatched shapes, a negative threshold other than -1, or a target without real objects.
    """
    pred_np = pred.detach().cpu().double().numpy() if torch.is_tensor(pred) else np.asarray(pred, np.float64)
    target_np = target.detach().cpu().double().numpy() if torch.is_tensor(target) else np.asarray(target, np.float64)
    if pred_np.ndim != 3 or target_np.ndim != 3 or pred_np.shape[0] != target_np.shape[0] \
            or pred_np.shape[2] != target_np.shape[2] or pred_np.shape[2] < 4:
        raise ValueError(f"pred [B,K,E] and target [B,M,E] with E = 3 + P + 1 expected, got {pred_np.shape} and "
                         f"{target_np.shape}")
    no_limit = math.isinf(threshold) or threshold == -1
    if not no_limit and threshold < 0:
        raise ValueError(f"distance threshold must be >= 0, inf or -1, got {threshold}")
    batch, num_slots, _ = pred_np.shape
    real = target_np[..., -1] > 0  # [B, M]
    num_real = int(real.sum())
    if num_real == 0:
        raise ValueError("target holds no real objects; AP is undefined")

    # Closest real object with identical properties, for every detection at once.
    true_props = np.rint(target_np[:, None, :, 3:-1])  # [B, 1, M, P]; -1 = unknown (e.g. CLEVRTex colour), matches all
    same_props = np.all((np.rint(pred_np[:, :, None, 3:-1]) == true_props) | (true_props < 0), axis=-1)
    candidates = same_props & real[:, None, :]  # [B, K, M]
    distance = np.linalg.norm((target_np[:, None, :, :3] - pred_np[:, :, None, :3]) * coord_scale, axis=-1)
    distance = np.where(candidates, distance, np.inf)  # [B, K, M]
    best_id = distance.argmin(axis=-1)  # [B, K], first of equals, as the reference's strict '<' scan
    best_distance = np.take_along_axis(distance, best_id[..., None], axis=-1)[..., 0]  # [B, K]
    found = best_distance < 10_000  # the reference starts its search at 10000
    hit = found & (no_limit | (best_distance < threshold))  # [B, K]

    # Rank all detections of the split by score (numpy's argsort reversed, as the reference, ties included).
    order = np.argsort(pred_np[..., -1].reshape(-1))[::-1]
    hit_sorted = hit.reshape(-1)[order]
    object_key = (np.arange(batch)[:, None] * target_np.shape[1] + best_id).reshape(-1)[order]  # (image, object)
    true_positive = np.zeros(batch * num_slots)
    hits = np.flatnonzero(hit_sorted)
    _, first_claim = np.unique(object_key[hits], return_index=True)  # only the highest-ranked claim counts
    true_positive[hits[first_claim]] = 1.0
    accumulated_tp = np.cumsum(true_positive)
    recall = (accumulated_tp / num_real).astype(np.float32)
    precision = (accumulated_tp / np.arange(1, len(order) + 1)).astype(np.float32)
    return _area_under_precision_envelope(precision, recall)


def _area_under_precision_envelope(precision: np.ndarray, recall: np.ndarray) -> float:
    """The reference's ``compute_average_precision``: pad, take the running max from the right, sum the steps."""
    recall = np.concatenate([[0.0], recall.astype(np.float64), [1.0]])
    precision = np.concatenate([[0.0], precision.astype(np.float64), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # precision envelope
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(sum(precision[i + 1] * (recall[i + 1] - recall[i]) for i in steps))


def set_targets(obj_coords: torch.Tensor, obj_props: torch.Tensor) -> torch.Tensor:
    """Dataset extras -> AP targets ``[B, M, 3 + P + 1]`` (coordinates, property indices, 1 = real object).

    Args:
        obj_coords: float ``[B, M, 3]``.
        obj_props: int ``[B, M, P]``; rows of -1 are padding, a single -1 is an unknown property.
    """
    real = (obj_props >= 0).any(dim=-1, keepdim=True)  # [B, M, 1]
    return torch.cat([obj_coords.float(), obj_props.float(), real.float()], dim=-1)  # [B, M, 3 + P + 1]


__all__ = ["AP_THRESHOLDS", "PAPER_COORD_SCALE", "ap_key", "average_precision", "set_targets"]
