"""Discrete slot codes (VQ-SA, slides 003): each slot is described by L discrete latent variables.

Variable ``l`` has its own codebook ``e_l`` of M embeddings. The logits of variable ``l`` are a bilinear form between
the slot and that codebook, ``logit_lm = (W_l s) . e_lm``, so the L distributions ``q(z_l | x)`` are
computed independently. During training a code is drawn per variable with the Gumbel-softmax (temperature annealed
from ``tau_start`` to ``tau_end``; straight-through one-hot from ``hard_after`` on), in eval mode the argmax code is
used. The chosen embeddings are concatenated and projected back to a slot ``[D]`` that the decoder reads as usual.
The training loss adds ``beta * KL(q(z|x) || uniform)``, the KL term of the slides' ELBO.

Where an object is cannot be told by a handful of codes, so the quantiser can pass a few continuous numbers per slot
through unquantised (``positions``, e.g. the centre of the slot's attention, see :func:`attention_centroids`): then
only *what* the object is goes through the codes and *where* it is stays exact.

Shapes: slots ``[B, K, D]``, logits ``[B, K, L, M]``, codes ``[B, K, L]``, positions ``[B, K, P]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from slotlab.config import Config
from slotlab.errors import UserError
from slotlab.models.encoders import position_grid

POSITION_DIM = 2  # (x, y) of the slot's attention centroid, used when config.vq.keep_position is on


@dataclass
class QuantiserOutput:
    """What :class:`SlotQuantiser` returns."""

    slots: torch.Tensor  # [B, K, D], assembled from the chosen code embeddings (and positions)
    kl: torch.Tensor  # scalar: KL(q(z|x) || uniform), summed over variables, mean over slots and batch
    logits: torch.Tensor  # [B, K, L, M], float32
    codes: torch.Tensor  # [B, K, L] int64, the chosen code of each variable
    weights: torch.Tensor | None = None  # [B, K, L, M], the (relaxed) one-hot sample the slots were built from
    tau: float = 1.0  # Gumbel-softmax temperature used
    positions: torch.Tensor | None = None  # [B, K, P], the continuous part passed through unquantised


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """``KL(q || uniform)`` per distribution: ``sum_m q_m log q_m + log M`` for logits ``[..., M]`` -> ``[...]``."""
    log_q = logits.float().log_softmax(dim=-1)  # [..., M]
    return (log_q.exp() * log_q).sum(dim=-1) + math.log(logits.shape[-1])


def gumbel_temperature(step: int, tau_start: float, tau_end: float, anneal_steps: int) -> float:
    """Exponential decay from ``tau_start`` at step 0 to ``tau_end`` at ``anneal_steps``, constant afterwards."""
    progress = min(max(step, 0) / anneal_steps, 1.0) if anneal_steps > 0 else 1.0
    return tau_start * (tau_end / tau_start) ** progress


def attention_centroids(attn: torch.Tensor, feature_size: tuple[int, int]) -> torch.Tensor:
    """Centre ``(x, y)`` in [0, 1] of each slot's attention ``[B, K, N]`` over an ``h x w`` grid -> ``[B, K, 2]``."""
    h, w = feature_size
    grid = position_grid(h, w, attn.device)[..., :2].reshape(h * w, 2).to(attn.dtype)  # [N, 2] as (x, y)
    weights = attn / attn.sum(dim=-1, keepdim=True).clamp_min(1e-8)  # [B, K, N], a distribution over the grid
    return weights @ grid  # [B, K, 2]


class SlotQuantiser(nn.Module):
    """Map slots ``[B, K, D]`` to L discrete variables with M codes each and back to quantised slots ``[B, K, D]``.

    Args:
        slot_dim: D.
        num_variables: L, the latent variables per slot (4 in the slides).
        codebook_size: M, the embeddings of each variable's codebook.
        code_dim: E, the size of one embedding.
        position_dim: P, continuous numbers per slot passed through unquantised (0 = fully discrete slots).
        tau_start, tau_end, anneal_steps: the Gumbel-softmax temperature schedule, see :func:`gumbel_temperature`.
        hard_after: from this training step on, samples are one-hot with straight-through gradients.

    Example:
        >>> quantiser = SlotQuantiser(slot_dim=32, num_variables=4, codebook_size=8).eval()
        >>> out = quantiser(torch.randn(2, 5, 32))
        >>> out.slots.shape, out.codes.shape, out.logits.shape
        (torch.Size([2, 5, 32]), torch.Size([2, 5, 4]), torch.Size([2, 5, 4, 8]))
    """

    def __init__(self, slot_dim: int, num_variables: int = 4, codebook_size: int = 8, code_dim: int = 16,
                 position_dim: int = 0, tau_start: float = 1.0, tau_end: float = 0.1, anneal_steps: int = 10_000,
                 hard_after: int = 10_000):
        super().__init__()
        if num_variables < 1 or codebook_size < 2 or code_dim < 1:
            raise ValueError(f"quantiser needs L >= 1, M >= 2, E >= 1 (got L={num_variables}, M={codebook_size}, "
                             f"E={code_dim})")
        if not (tau_start > 0 and tau_end > 0):
            raise ValueError(f"Gumbel-softmax temperatures must be > 0 (got {tau_start}, {tau_end})")
        self.num_variables, self.codebook_size, self.code_dim = num_variables, codebook_size, code_dim
        self.position_dim = position_dim
        self.tau_start, self.tau_end, self.anneal_steps, self.hard_after = tau_start, tau_end, anneal_steps, hard_after
        self.norm = nn.LayerNorm(slot_dim)
        self.to_query = nn.Linear(slot_dim, num_variables * code_dim, bias=False)  # the L matrices W_l, stacked
        self.codebooks = nn.Parameter(torch.randn(num_variables, codebook_size, code_dim))  # [L, M, E]
        self.to_slot = nn.Linear(num_variables * code_dim + position_dim, slot_dim)

    def temperature(self, step: int) -> float:
        return gumbel_temperature(step, self.tau_start, self.tau_end, self.anneal_steps)

    def code_logits(self, slots: torch.Tensor) -> torch.Tensor:
        """Bilinear logits ``[B, K, L, M]``: ``(W_l s) . e_lm`` for every variable l and code m.

        Not divided by sqrt(E) as attention logits are: at initialisation their spread (about 2 for E = 16) must
        stand out of the Gumbel noise, or the sampled codes carry no information and the decoder learns to ignore
        them.
        """
        b, k, _ = slots.shape
        query = self.to_query(self.norm(slots)).reshape(b, k, self.num_variables, self.code_dim)  # [B, K, L, E]
        logits = torch.einsum("bkle,lme->bklm", query, self.codebooks.to(query.dtype))  # [B, K, L, M]
        return logits.float()  # float32: Gumbel noise and KL are unstable in bf16

    def assemble(self, weights: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Slots ``[B, K, D]`` from (one-hot or relaxed) code weights ``[B, K, L, M]`` and optional positions."""
        b, k = weights.shape[:2]
        embeddings = torch.einsum("bklm,lme->bkle", weights, self.codebooks.to(weights.dtype))  # [B, K, L, E]
        parts = [embeddings.reshape(b, k, self.num_variables * self.code_dim)]  # [B, K, L*E]
        if self.position_dim:
            if positions is None or positions.shape[-1] != self.position_dim:
                got = None if positions is None else tuple(positions.shape)
                raise ValueError(f"this quantiser passes {self.position_dim} position numbers per slot through; "
                                 f"give positions [B, K, {self.position_dim}] (got {got})")
            parts.append(positions.to(embeddings.dtype))  # [B, K, P]
        return self.to_slot(torch.cat(parts, dim=-1))  # [B, K, D]

    def slots_from_codes(self, codes: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Decode explicit codes ``[B, K, L]`` (e.g. edited ones) to quantised slots ``[B, K, D]``."""
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got {int(codes.min())}..{int(codes.max())}")
        weights = F.one_hot(codes.long(), self.codebook_size).to(self.codebooks.dtype)  # [B, K, L, M]
        return self.assemble(weights, positions)

    def forward(self, slots: torch.Tensor, step: int = 0, positions: torch.Tensor | None = None) -> QuantiserOutput:
        """Quantise ``slots [B, K, D]`` at training ``step`` (which sets the temperature and hard/soft sampling)."""
        logits = self.code_logits(slots)  # [B, K, L, M]
        tau = self.temperature(step)
        if self.training:
            weights = F.gumbel_softmax(logits, tau=tau, hard=step >= self.hard_after, dim=-1)  # [B, K, L, M]
        else:  # evaluation is deterministic: the most likely code of every variable
            weights = F.one_hot(logits.argmax(dim=-1), self.codebook_size).to(logits.dtype)  # [B, K, L, M]
        codes = weights.argmax(dim=-1)  # [B, K, L]
        kl = kl_to_uniform(logits).sum(dim=-1).mean()  # sum over variables, mean over slots and batch
        quantised = self.assemble(weights.to(slots.dtype), positions)  # [B, K, D]
        return QuantiserOutput(slots=quantised, kl=kl, logits=logits, codes=codes, weights=weights, tau=tau,
                               positions=positions)


def build_quantiser(config: Config) -> SlotQuantiser:
    """The quantiser described by ``config.vq`` for slots of size ``config.model.slot_dim``."""
    vq = config.vq
    for key, value, low in (("num_variables", vq.num_variables, 1), ("codebook_size", vq.codebook_size, 2),
                            ("code_dim", vq.code_dim, 1)):
        if value < low:
            raise UserError(f"vq.{key}={value}: must be at least {low}")
    for key, value in (("tau_start", vq.tau_start), ("tau_end", vq.tau_end)):
        if not value > 0:
            raise UserError(f"vq.{key}={value}: the Gumbel-softmax temperature must be > 0")
    return SlotQuantiser(
        slot_dim=config.model.slot_dim, num_variables=vq.num_variables, codebook_size=vq.codebook_size,
        code_dim=vq.code_dim, position_dim=POSITION_DIM if vq.keep_position else 0, tau_start=vq.tau_start,
        tau_end=vq.tau_end, anneal_steps=vq.anneal_steps, hard_after=vq.hard_after,
    )


__all__ = ["POSITION_DIM", "QuantiserOutput", "SlotQuantiser", "attention_centroids", "build_quantiser",
           "gumbel_temperature", "kl_to_uniform"]
