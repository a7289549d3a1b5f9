"""Keep or drop each slot (the slot selection of Adaptive Slot Attention, Fan et al., CVPR 2024).

With a fixed K a scene with fewer objects than slots leaves spare slots, and the reconstruction loss puts them to use:
two blobs fit a sprite better than one, so the spare slots cut objects in two. A small MLP reads each slot and
decides whether it is drawn at all. Training samples the decision (Gumbel-softmax, hard, with straight-through
gradients) and pays ``model.slot_sparsity`` times the fraction of slots kept; evaluation keeps a slot when keeping it
is the likelier choice. A dropped slot's mask is zero: the decoder's masks are renormalised over the kept slots,

    m_k = z_k exp(l_k) / sum_j z_j exp(l_j)   (z_k in {0, 1} the decision, l_k the decoder's mask logit),

which, written with the softmax masks ``m = softmax(l)``, is ``z_k m_k / sum_j z_j m_j``: the decoder is unchanged.
The decision is a function of the slot alone, so slots sampled from a library decide for themselves whether they are
drawn, as in training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Initial log-odds of keeping a slot: about 0.9 of the slots are kept at the start, so every slot gets to learn.
KEEP_LOGIT_AT_START = 2.2


class SlotGate(nn.Module):
    """``slots [B, K, D]`` -> keep decisions ``[B, K]`` in {0, 1} (straight-through gradients while training)."""

    def __init__(self, slot_dim: int, hidden_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(slot_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 2))
        with torch.no_grad():  # logits (keep, drop)
            self.mlp[-1].bias.copy_(torch.tensor([KEEP_LOGIT_AT_START, 0.0]))

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        logits = self.mlp(slots).float()  # [B, K, 2]
        if self.training:
            keep = F.gumbel_softmax(logits, tau=1.0, hard=True)[..., 0]  # [B, K], values 0/1, soft gradients
        else:
            keep = (logits[..., 0] > logits[..., 1]).float()  # [B, K]
        # Every image keeps at least its likeliest slot, so that some slot draws each pixel.
        likeliest = F.one_hot((logits[..., 0] - logits[..., 1]).argmax(dim=1), slots.shape[1]).float()  # [B, K]
        return torch.maximum(keep, likeliest)  # [B, K]


def keep_masks(masks: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax masks ``[B, K, H, W]`` renormalised over the kept slots (``keep [B, K]``); dropped slots get 0."""
    kept = masks.float() * keep[:, :, None, None]  # [B, K, H, W]
    return kept / kept.sum(dim=1, keepdim=True).clamp_min(1e-12)  # [B, K, H, W]
