"""Slot Attention (Locatello et al. 2020, Algorithm 1) and its slot initialisations.

Shapes: inputs ``[B, N, D_in]``, slots ``[B, K, D]``, attention ``[B, K, N]`` (softmax over the K slots).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from slotlab.models.noise import batch_randn
from slotlab.registry import Registry

SLOT_INITS: Registry[nn.Module] = Registry("slot initialisation")
GROUPINGS: Registry[nn.Module] = Registry("grouping module")


@dataclass
class GroupingOutput:
    """What every grouping module returns."""

    slots: torch.Tensor  # [B, K, D]
    attn: torch.Tensor  # [B, K, N], sums to 1 over K; the last iteration's
    attn_per_iter: list[torch.Tensor] | None = None  # T x [B, K, N], for visualisation
    positions: torch.Tensor | None = None  # [B, K, 2] (x, y) in [-1, 1]: slot frames (invariant slot attention)
    scales: torch.Tensor | None = None  # [B, K, 2]


class IterativeGrouping(nn.Module):
    """A grouping module that refines its slots over ``iters`` iterations (T) in training.

    Outside training (validation, evaluation, generation) it runs ``test_iters`` iterations where that is set:
    Slot Attention is a fixed-point iteration, and more iterations at test time than in training often sharpen
    the slots (Locatello et al. 2020, figure 5).
    """

    iters: int
    test_iters: int = 0  # 0: as in training

    @property
    def num_iters(self) -> int:
        """T for the next forward pass."""
        return self.test_iters if self.test_iters and not self.training else self.iters


@SLOT_INITS.register("gaussian")
class GaussianSlotInit(nn.Module):
    """slots ~ N(mu, diag(sigma^2)) with learnable mu and log-sigma; K may change at inference."""

    def __init__(self, num_slots: int, dim: int):
        super().__init__()
        self.num_slots = num_slots
        self.mu = nn.Parameter(torch.randn(1, 1, dim) * dim**-0.5)
        self.log_sigma = nn.Parameter(torch.full((1, 1, dim), math.log(dim**-0.5)))

    def forward(self, batch_size: int, num_slots: int | None = None) -> torch.Tensor:
        k = num_slots or self.num_slots
        # batch_randn == torch.randn, except that a data-parallel run draws the same rows as one process would.
        noise = batch_randn(batch_size, k, self.mu.shape[-1], device=self.mu.device, dtype=self.mu.dtype)  # [B, K, D]
        return self.mu + self.log_sigma.exp() * noise  # [B, K, D]


@SLOT_INITS.register("learned")
class LearnedSlotInit(nn.Module):
    """K learnable fixed initial slots (report 001); the number of slots is fixed."""

    def __init__(self, num_slots: int, dim: int):
        super().__init__()
        self.num_slots = num_slots
        self.slots = nn.Parameter(torch.randn(1, num_slots, dim) * dim**-0.5)

    def forward(self, batch_size: int, num_slots: int | None = None) -> torch.Tensor:
        if num_slots not in (None, self.num_slots):
            raise ValueError(f"learned slot queries are fixed at K={self.num_slots}, got num_slots={num_slots}")
        return self.slots.expand(batch_size, -1, -1)  # [B, K, D]


class SlotAttention(IterativeGrouping):
    """Slot Attention, Algorithm 1 of Locatello et al. (2020).

    Args:
        num_slots: K, the default number of slots.
        dim: D, the slot size (and the attention size).
        iters: T, the number of attention iterations.
        hidden_dim: width of the residual slot MLP.
        eps: added to the attention weights before the weighted mean.
        input_dim: D_inputs (defaults to ``dim``).
        slot_init: ``"gaussian"`` (learnable mu and sigma) or ``"learned"`` (K fixed queries), see :data:`SLOT_INITS`.
        detach_last: backpropagate through the last iteration only, the initial slots getting its gradient straight
            through: the first-order implicit differentiation of Chang et al. (2022), which BO-QSA (Jia et al. 2023)
            uses with learned queries. Training is cheaper and more stable, so more iterations can be afforded.
        slot_balance: gamma of :func:`slot_balance_logits`, added to the logits from the second iteration on
            (0 = the paper's attention).

    Example:
        >>> sa = SlotAttention(num_slots=5, dim=32)
        >>> out = sa(torch.randn(2, 100, 32))
        >>> out.slots.shape, out.attn.shape
        (torch.Size([2, 5, 32]), torch.Size([2, 5, 100]))
    """

    def __init__(self, num_slots: int, dim: int, iters: int = 3, hidden_dim: int = 128, eps: float = 1e-8,
                 input_dim: int | None = None, slot_init: str = "gaussian", detach_last: bool = False,
                 slot_balance: float = 0.0):
        super().__init__()
        input_dim = input_dim or dim
        self.num_slots, self.dim, self.iters, self.eps = num_slots, dim, iters, eps
        self.scale = dim**-0.5
        self.detach_last = detach_last
        self.slot_balance = slot_balance
        self.init = SLOT_INITS.build(slot_init, num_slots, dim)
        self.norm_inputs = nn.LayerNorm(input_dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(input_dim, 2 * dim, bias=False)  # k and v in one weight (see forward)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim))

    def step(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             balance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One iteration of Algorithm 1, line by line. ``slots [B, K, D]``, keys and values ``[B, N, D]``;
        ``balance [B, K, 1]`` is added to the attention logits (``model.slot_balance``, None = nothing).

        Returns the new slots ``[B, K, D]`` and the attention ``[B, K, N]`` (softmax over slots).
        """
        b, num_slots, d = slots.shape
        slots_prev = slots
        slots = self.norm_slots(slots)  # [B, K, D]
        q = self.to_q(slots)  # [B, K, D]
        attn_logits = self.scale * torch.bmm(q, k.transpose(1, 2))  # [B, K, N]
        if balance is not None:
            attn_logits = attn_logits + balance
        attn = attn_logits.softmax(dim=1)  # [B, K, N], normalised over slots: slots compete for inputs
        weights = attn + self.eps
        weights = weights / weights.sum(dim=-1, keepdim=True)  # [B, K, N]: a weighted mean over the inputs
        updates = torch.bmm(weights, v)  # [B, K, D]
        slots = self.gru(updates.reshape(-1, d), slots_prev.reshape(-1, d)).reshape(b, num_slots, d)
        slots = slots + self.mlp(self.norm_mlp(slots))  # [B, K, D]
        return slots, attn

    def step_folded(self, slots: torch.Tensor, inputs: torch.Tensor,
                    balance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step` with k and v applied on the slots' side: the same maths, fewer operations.

        ``k(x) . q = x . (q W_k)`` and the weighted mean of ``v(x)`` is ``v`` of the weighted mean of ``x``, both
        maps being linear, so the ``[B, N, D]`` keys and values are never formed: ``T*K*D*D_in`` work instead of
        ``N*D_in*2D``. Dividing the ``[B, K, D_in]`` sums rather than normalising the ``[B, K, N]`` weights is the same
        weighted mean with ``N / D_in`` times fewer divisions. ``inputs [B, N, D_in]`` are the normalised inputs.
        """
        b, num_slots, d = slots.shape
        key_proj, value_proj = self.to_kv.weight.chunk(2, dim=0)  # [D, D_in] each
        slots_prev = slots
        q = self.to_q(self.norm_slots(slots)) * self.scale  # [B, K, D]; scaling q is cheaper than scaling logits
        logits = torch.bmm(q @ key_proj, inputs.transpose(1, 2))  # [B, K, N]
        attn = (logits if balance is None else logits + balance).softmax(dim=1)  # [B, K, N]
        weights = attn + self.eps  # [B, K, N]
        mean_inputs = torch.bmm(weights, inputs) / weights.sum(dim=-1, keepdim=True)  # [B, K, D_in]
        updates = mean_inputs @ value_proj.t()  # [B, K, D]
        slots = self.gru(updates.reshape(-1, d), slots_prev.reshape(-1, d)).reshape(b, num_slots, d)
        slots = slots + self.mlp(self.norm_mlp(slots))  # [B, K, D]
        return slots, attn

    def forward(self, inputs: torch.Tensor, num_slots: int | None = None, slots: torch.Tensor | None = None,
                feature_size: tuple[int, int] | None = None) -> GroupingOutput:
        """Group ``inputs [B, N, D_in]`` into slots; ``slots`` overrides the initialisation (e.g. to test it).

        ``feature_size``, the grid of the inputs, is part of every grouping module's interface; Slot Attention does
        not need it.
        """
        b, _, input_dim = inputs.shape
        inputs = self.norm_inputs(inputs)  # [B, N, D_in]
        init_slots = self.init(b, num_slots) if slots is None else slots  # [B, K, D]
        # The folded step is cheaper unless D_in >> D with many slots and iterations.
        iters = self.num_iters
        if iters * init_slots.shape[1] * (input_dim - self.dim) < self.dim * input_dim:
            step = partial(self.step_folded, inputs=inputs)
        else:
            k, v = self.to_kv(inputs).chunk(2, dim=-1)  # [B, N, D] each
            step = partial(self.step, k=k, v=v)
        slots = init_slots
        attn_per_iter = []
        balance = None
        for t in range(iters):
            if self.detach_last and t == iters - 1:
                slots = straight_through(slots, init_slots)
            with iteration_grad(t, iters, self.detach_last):
                slots, attn = step(slots, balance=balance)
            if self.slot_balance and t < iters - 1:  # for the next iteration: a step towards equal shares
                balance = slot_balance_logits(attn.detach(), self.slot_balance)  # [B, K, 1]
            attn_per_iter.append(attn)
        return GroupingOutput(slots=slots, attn=attn, attn_per_iter=attn_per_iter)


def slot_balance_logits(attn: torch.Tensor, gamma: float) -> torch.Tensor:
    """``-gamma * log(share_k)`` ``[B, K, 1]``: what ``model.slot_balance`` adds to each slot's attention logits in
    the next iteration, from ``attn [B, K, N]``. At gamma = 1 it is a step of Sinkhorn's balancing (each slot's
    logits lowered by the log of the share of the pixels it took), so a slot that took few pixels takes the ones it
    fits best, and learned queries cannot stay empty."""
    share = attn.float().mean(dim=-1, keepdim=True).clamp_min(1e-4)  # [B, K, 1]
    return (-gamma * share.log()).to(attn.dtype)


def straight_through(state: torch.Tensor, init_state: torch.Tensor) -> torch.Tensor:
    """BO-QSA's last iteration (first-order implicit differentiation, Chang et al. 2022): the value of ``state``
    (close to a fixed point), the gradient of ``init_state``, as if the earlier iterations were the identity."""
    return state.detach() + init_state - init_state.detach()


def iteration_grad(t: int, iters: int, detach_last: bool) -> torch.set_grad_enabled:
    """Grad mode for iteration ``t`` of ``iters``: with ``detach_last`` no gradient flows through the earlier
    iterations, so only the last one builds an autograd graph."""
    return torch.set_grad_enabled(torch.is_grad_enabled() and (t == iters - 1 or not detach_last))


def init_options(cfg) -> dict:
    """``slot_init`` and ``detach_last`` for a grouping module from a ``ModelConfig``: ``bo_qsa`` is learned
    queries with the last-iteration gradient, ``implicit_grad`` asks for that gradient with any initialisation."""
    return {"slot_init": "learned" if cfg.slot_init == "bo_qsa" else cfg.slot_init,
            "detach_last": cfg.slot_init == "bo_qsa" or cfg.implicit_grad}


@GROUPINGS.register("slot_attention")
def _build_slot_attention(cfg) -> SlotAttention:
    return SlotAttention(
        num_slots=cfg.num_slots, dim=cfg.slot_dim, iters=cfg.iters, hidden_dim=cfg.slot_hidden_dim, eps=cfg.eps,
        input_dim=cfg.input_dim, slot_balance=cfg.slot_balance, **init_options(cfg),
    )


def build_grouping(cfg) -> nn.Module:
    """The grouping module named by ``cfg.grouping`` (a :class:`~slotlab.config.ModelConfig`), running
    ``cfg.test_iters`` iterations outside training where set."""
    grouping = GROUPINGS.build(cfg.grouping, cfg)
    grouping.test_iters = cfg.test_iters
    return grouping


def attention_masks(attn: torch.Tensor, feature_size: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """Slot Attention maps ``[B, K, N]`` -> soft masks ``[B, K, H, W]`` (bilinear upsampling, summing to 1 over K)."""
    b, k, _ = attn.shape
    maps = attn.reshape(b, k, *feature_size)  # [B, K, h, w]
    if tuple(feature_size) != tuple(image_size):
        maps = F.interpolate(maps, size=image_size, mode="bilinear", align_corners=False)  # [B, K, H, W]
    return maps / maps.sum(dim=1, keepdim=True).clamp_min(1e-8)  # [B, K, H, W]
