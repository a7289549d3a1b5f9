"""Every object-discovery score of a batch from one contingency table: ARI, FG-ARI, mIoU, mBO (and MSE).

:func:`object_discovery_scores` gives per-image scores; :class:`ObjectDiscoveryMetrics` accumulates their means the way
the individual metric objects do (ARI and MSE over all images; FG-ARI, mIoU and mBO over images with at least one
foreground object).
"""

from __future__ import annotations

import torch

from slotlab.metrics.ari import ari_from_contingency, contingency, fg_ari_from_contingency, mask_ids
from slotlab.metrics.overlap import (
    OBJECT_PIXEL_PLACES,
    hungarian_match,
    iou_from_contingency,
    mbo_from_contingency,
    miou_from_contingency,
    num_objects_from_contingency,
    object_pixel_places_from_contingency,
)
from slotlab.metrics.reconstruction import clevrtex_mse_per_image, mse_per_image

# Scores averaged only over images that contain at least one foreground object.
FOREGROUND_SCORES = ("fg_ari", "miou", "mbo")
# Shares of the object pixels by the slot that holds them (own, background, ...): object_pixel_places_from_contingency
PLACE_SCORES = tuple(f"objects_in_{place}_slot" for place in OBJECT_PIXEL_PLACES)


def object_discovery_scores(pred: torch.Tensor, true: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image mask scores.

    Args:
        pred: predicted masks ``[B, K, H, W]`` (argmax over K is taken) or predicted ids ``[B, H, W]``.
        true: ground-truth ids ``[B, H, W]``, 0 = background.

    Returns:
        ``{"ari", "fg_ari", "miou", "mbo", "num_objects", "num_segments", "object_pixels", "objects_in_own_slot",
        "objects_in_background_slot", "objects_in_other_object_slot", "objects_in_spare_slot"}``, each ``[B]`` on
        ``pred.device``; ``num_segments`` counts the slots that win at least one pixel, ``object_pixels`` the
        foreground pixels, and the ``objects_in_*`` their shares (0 without objects; see
        :func:`~slotlab.metrics.overlap.object_pixel_places_from_contingency`).
    """
    table = contingency(mask_ids(pred), true, num_pred=pred.shape[1] if pred.dim() == 4 else None)  # [B, T, K]
    match = hungarian_match(iou_from_contingency(table))  # [B, T]: one matching for mIoU and the object pixels
    places = object_pixel_places_from_contingency(table, match)  # [B, 4] pixel counts
    object_pixels = places.sum(dim=1)  # [B]
    shares = places / object_pixels.clamp_min(1).unsqueeze(1)  # [B, 4]
    return {
        "ari": ari_from_contingency(table),
        "fg_ari": fg_ari_from_contingency(table),
        "miou": miou_from_contingency(table, match),
        "mbo": mbo_from_contingency(table),
        "num_objects": num_objects_from_contingency(table),
        "num_segments": (table.sum(dim=1) > 0).sum(dim=1),
        "object_pixels": object_pixels.long(),
        **{name: shares[:, i] for i, name in enumerate(PLACE_SCORES)},
    }


class ObjectDiscoveryMetrics:
    """Accumulates ARI, FG-ARI, mIoU, mBO, MSE and CLEVRTex MSE: ``update(...)`` per batch, then ``compute()``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.fg_count = 0
        self.mask_count = 0

    def _add(self, name: str, values: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())

    def update(self, pred: torch.Tensor | None = None, true: torch.Tensor | None = None,
               recon: torch.Tensor | None = None, image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Add a batch and return its per-image scores (each ``[B]``).

        Args:
            pred: predicted masks ``[B, K, H, W]`` or ids ``[B, H, W]`` (with ``true``; optional).
            true: ground-truth ids ``[B, H, W]``.
            recon: reconstructions ``[B, 3, H, W]`` in [-1, 1] (with ``image``; optional).
            image: the input images ``[B, 3, H, W]`` in [-1, 1].
        """
        scores: dict[str, torch.Tensor] = {}
        if recon is not None and image is not None:
            scores["mse"] = mse_per_image(recon, image)
            scores["clevrtex_mse"] = clevrtex_mse_per_image(recon, image)
            self.count += int(image.shape[0])
            self._add("mse", scores["mse"])
            self._add("clevrtex_mse", scores["clevrtex_mse"])
        if pred is not None and true is not None:
            scores.update(object_discovery_scores(pred, true))
            has_fg = scores["num_objects"] > 0  # [B]
            self.mask_count += int(true.shape[0])
            self.fg_count += int(has_fg.sum())
            self._add("ari", scores["ari"])
            for name in FOREGROUND_SCORES:
                self._add(name, scores[name][has_fg])
            self._add("object_pixels", scores["object_pixels"])
            for name in PLACE_SCORES:  # pixel counts, so that compute() pools the pixels of every image
                self._add(name, scores[name] * scores["object_pixels"])
        return scores

    def compute(self) -> dict[str, float]:
        """Means: ``ari`` over all images, ``fg_ari``/``miou``/``mbo`` over images with objects, MSEs over all; the
        ``objects_in_*_slot`` shares over the object pixels of all images together."""
        result: dict[str, float] = {}
        if self.mask_count:
            result["ari"] = self.sums["ari"] / self.mask_count
            for name in FOREGROUND_SCORES:
                result[name] = self.sums[name] / max(self.fg_count, 1)
            result["images_with_objects"] = self.fg_count
            for name in PLACE_SCORES:
                result[name] = self.sums[name] / max(self.sums["object_pixels"], 1.0)
        if self.count:
            result["mse"] = self.sums["mse"] / self.count
            result["clevrtex_mse"] = self.sums["clevrtex_mse"] / self.count
        return result
