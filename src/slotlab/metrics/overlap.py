"""Mask overlap metrics: mIoU over Hungarian-matched masks (CLEVRTex ``mIoU_fg``) and mBO (mean best overlap).

Both start from the same batched contingency table as ARI (:func:`slotlab.metrics.ari.contingency`): with ``n[i, j]``
the pixels of true segment i given to slot j, ``a_i`` the size of true segment i and ``b_j`` the size of slot j,

    IoU[i, j] = n[i, j] / (a_i + b_j - n[i, j])    (0 when both masks are empty)

so no extra pass over the pixels is needed. Predicted masks are made hard by argmax over slots, as the CLEVRTex
evaluator and the DINOSAUR / OCLF mBO do.

**mIoU** (``mIoU_fg`` of the CLEVRTex evaluator, Karazija et al. 2021): true segments, background included, are
matched one-to-one to slots by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``, maximising the
total IoU). The IoUs of the matched foreground objects are summed and divided by the number of matched pairs with at
least one non-empty mask, less the background pair:

    mIoU = sum_{objects i} IoU[i, match(i)] / (max(#true segments, #non-empty slots) - [background present])

so extra non-empty slots (over-segmentation) and missed objects both cost. CLEVRTex counts the non-empty pairs after
its solver has broken ties between zero-IoU pairs, which can add pairs; ``max(...)`` is that count whenever every
matched pair overlaps, and does not depend on tie-breaking. To make the matching itself independent of the order of
the slots, slots are put in a canonical order (sorted by their IoU column) before the solver runs.

**mBO** (mean best overlap): for every ground-truth object (background excluded), the best IoU with any slot,
averaged over the objects of the image.

Edge cases (never NaN):

* an image with no foreground object scores 1.0 on both when nothing needs explaining (mBO always; mIoU when one
  slot covers the whole image) and mIoU 0.0 when extra slots split the background; the metric objects leave such
  images out of their means, as :class:`~slotlab.metrics.ari.ARIMetric` does for FG-ARI;
* an image with one object is scored like any other;
* empty slots are ignored (they overlap nothing and are not counted as segments).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from slotlab.metrics.ari import contingency, mask_ids


def iou_from_contingency(table: torch.Tensor) -> torch.Tensor:
    """IoU ``[B, T, K]`` between every true segment and every slot from contingency tables ``[B, T, K]``."""
    true_sizes = table.sum(dim=2, keepdim=True)  # [B, T, 1]
    pred_sizes = table.sum(dim=1, keepdim=True)  # [B, 1, K]
    union = true_sizes + pred_sizes - table  # [B, T, K]
    return torch.where(union > 0, table / union.clamp_min(1), torch.zeros_like(table))


def hungarian_match(iou: torch.Tensor) -> torch.Tensor:
    """The slot ``[B, T]`` (long) the Hungarian algorithm gives each true segment, -1 when it gets none.

    The matching maximises the total IoU per image. Slots are sorted by their IoU column first, so the same slot gets
    the same segment whatever the order of the slots, even when the optimum is not unique.
    """
    iou_np = iou.detach().cpu().numpy()  # [B, T, K], small: only this step leaves the device
    match = np.full(iou_np.shape[:2], -1, dtype=np.int64)  # [B, T]
    for b, matrix in enumerate(iou_np):  # scipy solves one small [T, K] problem at a time
        order = np.lexsort(matrix[::-1])  # columns in lexicographic order of (row 0, row 1, ...)
        rows, cols = linear_sum_assignment(matrix[:, order], maximize=True)
        match[b, rows] = order[cols]
    return torch.from_numpy(match).to(iou.device)


def hungarian_matched_iou(iou: torch.Tensor, match: torch.Tensor | None = None) -> torch.Tensor:
    """IoU ``[B, T]`` (float64) of each true segment with the slot :func:`hungarian_match` gives it (0 when none);
    ``match`` is that matching when the caller has it already."""
    match = hungarian_match(iou) if match is None else match  # [B, T]
    matched = iou.detach().double().gather(2, match.clamp_min(0).unsqueeze(2)).squeeze(2)  # [B, T]
    return torch.where(match >= 0, matched, torch.zeros_like(matched))


# where an object's pixels lie: the order of the columns of :func:`object_pixel_places_from_contingency`
OBJECT_PIXEL_PLACES = ("own", "background", "other_object", "spare")


def object_pixel_places_from_contingency(table: torch.Tensor, match: torch.Tensor | None = None) -> torch.Tensor:
    """Where the foreground objects' pixels lie, as pixel counts ``[B, 4]`` in :data:`OBJECT_PIXEL_PLACES` order.

    True segments (background included) are matched to slots as for mIoU (a match with IoU 0 counts as none). An
    object pixel is in its **own** slot (the one matched to its object), in the **background**'s (matched to the
    background), in an **other object**'s, or in a **spare** slot (matched to nothing: typically a part of an object
    cut off from the rest, or, where several slots share the background, a stretch of it). The four add up to the
    image's object pixels: the breakdown of what FG-ARI misses, one failure per column. ``match``: the
    :func:`hungarian_match` of ``table``'s IoUs, when the caller has it already.
    """
    batch, num_true, num_slots = table.shape
    iou = iou_from_contingency(table)  # [B, T, K]
    match = hungarian_match(iou) if match is None else match  # [B, T]
    matched = hungarian_matched_iou(iou, match) > 0  # [B, T]: a match of IoU 0 counts as none
    # role[b, k]: the true segment slot k is matched to (0 = background), or -1 for a spare slot
    target = torch.where(matched, match, torch.full_like(match, num_slots))  # unmatched -> an extra column, dropped
    segments = torch.arange(num_true, device=table.device).expand(batch, num_true)  # [B, T]
    role = torch.full((batch, num_slots + 1), -1, dtype=torch.long, device=table.device)
    role = role.scatter(1, target, segments)[:, :num_slots].unsqueeze(1)  # [B, 1, K]
    objects = table[:, 1:, :]  # [B, T - 1, K]: object pixels by slot
    ids = torch.arange(1, num_true, device=table.device).view(1, -1, 1)  # [1, T - 1, 1]
    own = (objects * (role == ids)).sum(dim=(1, 2))  # [B]
    background = (objects * (role == 0)).sum(dim=(1, 2))  # [B]
    spare = (objects * (role == -1)).sum(dim=(1, 2))  # [B]
    other = objects.sum(dim=(1, 2)) - own - background - spare  # [B]
    return torch.stack([own, background, other, spare], dim=1)  # [B, 4]


def miou_from_contingency(table: torch.Tensor, match: torch.Tensor | None = None) -> torch.Tensor:
    """CLEVRTex-style foreground mIoU ``[B]`` from contingency tables ``[B, T, K]`` (see the module docstring);
    ``match``: the :func:`hungarian_match` of their IoUs, when the caller has it already."""
    matched = hungarian_matched_iou(iou_from_contingency(table), match)  # [B, T]
    true_present = table.sum(dim=2) > 0  # [B, T]
    num_slots_used = (table.sum(dim=1) > 0).sum(dim=1)  # [B]
    num_true = true_present.sum(dim=1)  # [B], background included when present
    has_background = true_present[:, 0].long()  # [B]
    pairs = torch.maximum(num_true, num_slots_used) - has_background  # [B], non-empty pairs without the background
    total = matched[:, 1:].sum(dim=1)  # [B]
    return torch.where(pairs > 0, total / pairs.clamp_min(1), torch.ones_like(total))


def mbo_from_contingency(table: torch.Tensor) -> torch.Tensor:
    """Mean best overlap ``[B]`` of the foreground objects from contingency tables ``[B, T, K]``."""
    best = iou_from_contingency(table)[:, 1:, :].amax(dim=2)  # [B, T - 1]
    present = table[:, 1:, :].sum(dim=2) > 0  # [B, T - 1]
    count = present.sum(dim=1)  # [B]
    total = (best * present).sum(dim=1)  # [B]
    return torch.where(count > 0, total / count.clamp_min(1), torch.ones_like(total))


def num_objects_from_contingency(table: torch.Tensor) -> torch.Tensor:
    """Number of foreground objects ``[B]`` (true ids > 0 with at least one pixel)."""
    return (table[:, 1:, :].sum(dim=2) > 0).sum(dim=1)


def _table(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    num_slots = pred.shape[1] if pred.dim() == 4 else None
    return contingency(mask_ids(pred), true, num_pred=num_slots)


def miou(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Foreground mIoU over Hungarian-matched masks, per image (CLEVRTex ``mIoU_fg``).

    Args:
        pred: predicted masks ``[B, K, H, W]`` (argmax over K is taken) or predicted ids ``[B, H, W]``.
        true: ground-truth ids ``[B, H, W]``, 0 = background.

    Returns:
        ``[B]`` float64 tensor in [0, 1].
    """
    return miou_from_contingency(_table(pred, true))


def mbo(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Mean best overlap per image: each ground-truth object's best IoU with any slot, averaged over objects.

    Args:
        pred: predicted masks ``[B, K, H, W]`` (argmax over K is taken) or predicted ids ``[B, H, W]``.
        true: ground-truth ids ``[B, H, W]``, 0 = background (not an object).

    Returns:
        ``[B]`` float64 tensor in [0, 1].
    """
    return mbo_from_contingency(_table(pred, true))


class _ForegroundMean:
    """Mean of a per-image score over the images that have at least one foreground object."""

    name = ""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    def _scores(self, table: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, pred: torch.Tensor, true: torch.Tensor) -> None:
        """Add a batch: predicted masks ``[B, K, H, W]`` or ids ``[B, H, W]``, true ids ``[B, H, W]``."""
        table = _table(pred, true)  # [B, T, K]
        has_fg = num_objects_from_contingency(table) > 0  # [B]
        self.total += float(self._scores(table)[has_fg].sum())
        self.count += int(has_fg.sum())

    def compute(self) -> dict[str, float]:
        return {self.name: self.total / max(self.count, 1)}


class MIoUMetric(_ForegroundMean):
    """Accumulates foreground mIoU (CLEVRTex ``mIoU_fg``): ``update(pred, true)`` then ``compute()``."""

    name = "miou"

    def _scores(self, table: torch.Tensor) -> torch.Tensor:
        return miou_from_contingency(table)


class MBOMetric(_ForegroundMean):
    """Accumulates mean best overlap: ``update(pred, true)`` then ``compute()``."""

    name = "mbo"

    def _scores(self, table: torch.Tensor) -> torch.Tensor:
        return mbo_from_contingency(table)
