"""Adjusted Rand Index, batched in torch from one contingency table per image.

For every image the contingency table ``n[i, j]`` (pixels of true object i given to predicted slot j) is built by a
single ``bincount`` over ``image * T * K + true * K + pred`` for the whole batch. From it the pair-counting form that
``sklearn.metrics.adjusted_rand_score`` uses gives ARI exactly:

    tp = sum n_ij^2 - n,  fp = sum_j b_j^2 - sum n_ij^2,  fn = sum_i a_i^2 - sum n_ij^2,  tn = n^2 - tp - fp - fn - n
    ARI = 2 (tp tn - fn fp) / ((tp + fn)(fn + tn) + (tp + fp)(fp + tn))

Edge cases follow sklearn: when both partitions agree on every pair (``fn = fp = 0``: one cluster in both, every
pixel its own cluster in both, or no pixels at all) ARI is 1.0. FG-ARI leaves out the pixels whose true id is 0, so an
image with no foreground pixel scores 1.0 by that rule; :class:`ARIMetric` leaves such images out of its FG-ARI mean.
"""

from __future__ import annotations

import torch


def mask_ids(pred: torch.Tensor) -> torch.Tensor:
    """Predicted masks ``[B, K, H, W]`` -> ids ``[B, H, W]`` by argmax over slots; ids pass through unchanged."""
    if pred.dim() == 4:
        return pred.argmax(dim=1)
    if pred.dim() == 3:
        return pred.long()
    raise ValueError(f"predicted masks must be [B,K,H,W] or ids [B,H,W], got {tuple(pred.shape)}")


def contingency(pred_ids: torch.Tensor, true_ids: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Batched contingency tables ``[B, T, K]`` (float64) from ids ``[B, H, W]``; ``weights`` drops pixels (0/1)."""
    b = pred_ids.shape[0]
    pred = pred_ids.reshape(b, -1).long()
    true = true_ids.reshape(b, -1).long()
    num_pred = int(pred.max()) + 1 if pred.numel() else 1
    num_true = int(true.max()) + 1 if true.numel() else 1
    image = torch.arange(b, device=pred.device).unsqueeze(1)  # [B, 1]
    index = (image * num_true + true) * num_pred + pred  # [B, P]
    w = None if weights is None else weights.reshape(b, -1).to(torch.float64).flatten()
    counts = torch.bincount(index.flatten(), weights=w, minlength=b * num_true * num_pred)
    return counts.to(torch.float64).reshape(b, num_true, num_pred)  # [B, T, K]


def ari_from_contingency(table: torch.Tensor) -> torch.Tensor:
    """ARI ``[B]`` from contingency tables ``[B, T, K]``, exactly as sklearn's pair-counting formula."""
    n = table.sum(dim=(1, 2))  # [B]
    sum_squares = (table**2).sum(dim=(1, 2))  # [B]
    true_sizes_sq = (table.sum(dim=2) ** 2).sum(dim=1)  # [B], sum_i a_i^2
    pred_sizes_sq = (table.sum(dim=1) ** 2).sum(dim=1)  # [B], sum_j b_j^2
    tp = sum_squares - n
    fp = pred_sizes_sq - sum_squares
    fn = true_sizes_sq - sum_squares
    tn = n**2 - tp - fp - fn - n
    numerator = 2.0 * (tp * tn - fn * fp)
    denominator = (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)
    perfect = (fn == 0) & (fp == 0)
    return torch.where(perfect, torch.ones_like(n), numerator / torch.where(perfect, torch.ones_like(n), denominator))


def ari(pred: torch.Tensor, true: torch.Tensor, foreground_only: bool = False) -> torch.Tensor:
    """Adjusted Rand Index per image.

    Args:
        pred: predicted masks ``[B, K, H, W]`` (argmax over K is taken) or predicted ids ``[B, H, W]``.
        true: ground-truth ids ``[B, H, W]``, 0 = background.
        foreground_only: leave out pixels whose true id is 0 (FG-ARI).

    Returns:
        ``[B]`` float64 tensor, equal to ``sklearn.metrics.adjusted_rand_score`` on each image's pixels.
    """
    pred_ids = mask_ids(pred)
    weights = (true != 0) if foreground_only else None
    return ari_from_contingency(contingency(pred_ids, true, weights))


def fg_ari(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """FG-ARI ``[B]``: :func:`ari` over the ground-truth foreground pixels only."""
    return ari(pred, true, foreground_only=True)


class ARIMetric:
    """Accumulates ARI and FG-ARI over batches: ``update(pred, true)`` then ``compute()``.

    FG-ARI is averaged over images that have at least one foreground pixel.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.ari_sum = 0.0
        self.fg_ari_sum = 0.0
        self.count = 0
        self.fg_count = 0

    def update(self, pred: torch.Tensor, true: torch.Tensor) -> None:
        pred_ids = mask_ids(pred)
        has_fg = (true != 0).flatten(1).any(dim=1)
        self.ari_sum += float(ari(pred_ids, true).sum())
        self.fg_ari_sum += float(fg_ari(pred_ids, true)[has_fg].sum())
        self.count += int(true.shape[0])
        self.fg_count += int(has_fg.sum())

    def compute(self) -> dict[str, float]:
        return {
            "ari": self.ari_sum / max(self.count, 1),
            "fg_ari": self.fg_ari_sum / max(self.fg_count, 1),
        }
