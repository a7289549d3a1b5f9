"""Soft k-means as a grouping module: the non-learned baseline that Slot Attention generalises (blog 004).

    centres ~ init
    for t in range(T):
        scores = -||inputs - centres||^2 / beta
        weights = softmax(scores, dim='slots')
        centres = weighted_mean(weights, inputs)

No projections, no GRU, no MLP: the only learned parts are the initial centres (any of :data:`SLOT_INITS`) and,
when the slot size differs from the input size, one linear map from centres to slots. Comparing it with Slot
Attention at equal training steps shows what the learned update buys.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from slotlab.models.slot_attention import (
    GROUPINGS,
    SLOT_INITS,
    GroupingOutput,
    IterativeGrouping,
    init_options,
    iteration_grad,
    straight_through,
)


def soft_kmeans_step(points: torch.Tensor, centres: torch.Tensor, temperature: float,
                     eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """One soft k-means iteration.

    Args:
        points: ``[B, N, D]``.
        centres: ``[B, K, D]``.
        temperature: beta; scores are ``-||x - c||^2 / beta`` (small beta -> hard k-means).
        eps: added to the weights before the weighted mean, so an empty cluster keeps a defined centre.

    Returns:
        The new centres ``[B, K, D]`` and the assignment weights ``[B, K, N]`` (softmax over the K centres).
    """
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2 (torch.cdist's sqrt has no gradient at distance 0).
    distances = ((points**2).sum(-1).unsqueeze(1) - 2.0 * torch.bmm(centres, points.transpose(1, 2))
                 + (centres**2).sum(-1, keepdim=True)).clamp_min(0.0)  # [B, K, N]
    weights = torch.softmax(-distances / temperature, dim=1)  # [B, K, N], centres compete for each point
    normalised = weights + eps
    normalised = normalised / normalised.sum(dim=-1, keepdim=True)  # [B, K, N], weighted mean over points
    return torch.bmm(normalised, points), weights  # [B, K, D], [B, K, N]


class SoftKMeans(IterativeGrouping):
    """Soft k-means over the encoder's tokens, behind the grouping interface.

    Args:
        num_slots: K, the default number of centres.
        dim: D, the slot size handed to the decoder.
        iters: T, soft k-means iterations.
        input_dim: D_inputs, the space the centres live in (defaults to ``dim``).
        slot_init: initialisation of the centres, see :data:`SLOT_INITS`.
        detach_last: BO-QSA's bi-level trick, as in :class:`~slotlab.models.slot_attention.SlotAttention`.
        temperature: beta; default ``2 * sqrt(D_inputs)``, for which the cross term ``2 x.c / beta`` of the score
            equals Slot Attention's scaled dot product ``x.c / sqrt(D)``.
        eps: added to the weights before the weighted mean.

    Example:
        >>> km = SoftKMeans(num_slots=4, dim=16)
        >>> km(torch.randn(2, 50, 16)).slots.shape
        torch.Size([2, 4, 16])
    """

    def __init__(self, num_slots: int, dim: int, iters: int = 3, input_dim: int | None = None,
                 slot_init: str = "gaussian", detach_last: bool = False, temperature: float | None = None,
                 eps: float = 1e-8):
        super().__init__()
        input_dim = input_dim or dim
        self.num_slots, self.iters, self.eps, self.detach_last = num_slots, iters, eps, detach_last
        self.temperature = temperature or 2.0 * input_dim**0.5
        self.init = SLOT_INITS.build(slot_init, num_slots, input_dim)
        self.input_dim = input_dim
        # Only a change of size, no learned update: identity when the sizes agree.
        self.to_slot = nn.Identity() if input_dim == dim else nn.Linear(input_dim, dim)

    def forward(self, inputs: torch.Tensor, num_slots: int | None = None, slots: torch.Tensor | None = None,
                feature_size: tuple[int, int] | None = None) -> GroupingOutput:
        """Cluster ``inputs [B, N, D_in]``; ``slots [B, K, D_in]`` overrides the initial centres."""
        # A parameter-free LayerNorm puts the tokens on a fixed scale, so the temperature means the same throughout.
        points = F.layer_norm(inputs, (self.input_dim,))  # [B, N, D_in]
        init_centres = self.init(inputs.shape[0], num_slots) if slots is None else slots  # [B, K, D_in]
        centres = init_centres
        attn_per_iter = []
        iters = self.num_iters
        for t in range(iters):
            if self.detach_last and t == iters - 1:
                centres = straight_through(centres, init_centres)
            with iteration_grad(t, iters, self.detach_last):
                centres, weights = soft_kmeans_step(points, centres, self.temperature, self.eps)
            attn_per_iter.append(weights)
        return GroupingOutput(slots=self.to_slot(centres), attn=attn_per_iter[-1], attn_per_iter=attn_per_iter)


@GROUPINGS.register("soft_kmeans")
def _build_soft_kmeans(cfg) -> SoftKMeans:
    return SoftKMeans(
        num_slots=cfg.num_slots, dim=cfg.slot_dim, iters=cfg.iters, input_dim=cfg.input_dim,
        eps=cfg.eps, **init_options(cfg),
    )


__all__ = ["SoftKMeans", "soft_kmeans_step"]
