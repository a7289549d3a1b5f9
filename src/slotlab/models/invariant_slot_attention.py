"""Invariant Slot Attention (Biza et al., ICML 2023): slots with their own reference frame (position and scale).

Every slot k carries a position ``p_k`` and a scale ``s_k`` (two numbers each, in the [-1, 1] image frame). At each
iteration the inputs are seen from each slot's frame, ``rel_ki = (x_i - p_k) / s_k`` for the grid position ``x_i``
of input i, so keys and values depend on where an input lies *relative to the slot* rather than in the image; after
the attention, ``p_k`` and ``s_k`` become the attention-weighted mean and standard deviation of the grid positions.
The encoder adds no absolute position, so slot vectors describe what an object is and how it is shaped, and the frame
says where it is. The decoder draws each slot in its frame (:class:`~slotlab.models.SpatialBroadcastDecoder` with
``frames``), so a shape is learned once for every place: on Tetrominoes a decoder given the true frames draws sharp
pieces about ten times sooner than one given absolute positions (measured in docs/discovery/levers.md).

Cheaper than the paper's form, same idea: the relative position enters through a small MLP on the two coordinates
(``phi``), added to the normalised input features; keys and values are linear in that sum and in phi's last layer,
so the key and value projections and phi's output layer act on the slots' side (as :meth:`SlotAttention.step_folded`
does): per slot and input only phi's hidden layer is formed, never the ``[B, K, N, D]`` keys or the inputs seen from
each frame.

Shapes: inputs ``[B, N, D_in]`` on an ``h x w`` grid, slots ``[B, K, D]``, attention ``[B, K, N]`` (softmax over the
K slots), positions and scales ``[B, K, 2]`` as (x, y).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slotlab.models.slot_attention import (
    GROUPINGS,
    SLOT_INITS,
    GroupingOutput,
    IterativeGrouping,
    init_options,
    iteration_grad,
    slot_balance_logits,
    straight_through,
)

MIN_SCALE = 0.02  # smallest frame scale (a few pixels): keeps rel finite for a slot that took one pixel


def grid_positions(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Pixel-centre positions ``[H*W, 2]`` as (x, y) in [-1, 1], row-major (the order of flattened features)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 2 - 1
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 2 - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")  # [H, W] each
    return torch.stack([x, y], dim=-1).reshape(-1, 2)  # [N, 2]


def frame_of(weights: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position and scale ``[B, K, 2]`` of attention ``weights [B, K, N]`` (normalised over N) on ``grid [N, 2]``:
    their weighted mean and standard deviation."""
    position = weights @ grid  # [B, K, 2]
    variance = weights @ grid.square() - position.square()  # [B, K, 2]
    return position, variance.clamp_min(0.0).add(MIN_SCALE**2).sqrt()


class InvariantSlotAttention(IterativeGrouping):
    """Slot Attention with per-slot reference frames (translation and scale), see the module docstring.

    Args:
        num_slots: K.
        dim: D, the slot size.
        iters: T.
        hidden_dim: width of the residual slot MLP.
        eps: added to the attention before the weighted mean.
        input_dim: D_inputs (defaults to ``dim``).
        slot_init: initialisation of the slot vectors, see :data:`SLOT_INITS`; the initial frames are learned (one
            position per slot, spread over the image at first) with scale ``init_scale``.
        detach_last: BO-QSA's straight-through last iteration, for the slots and their frames.
        position_hidden: width of ``phi``, the MLP on the relative coordinates.
        init_scale: the scale of every frame before the first iteration.
        slot_balance: gamma of :func:`~slotlab.models.slot_attention.slot_balance_logits`, added to the logits from
            the second iteration on (0 = none).
    """

    frames = True  # its slots come with positions and scales: the encoder adds no absolute position, the decoder
    #               draws each slot in its frame

    def __init__(self, num_slots: int, dim: int, iters: int = 3, hidden_dim: int = 128, eps: float = 1e-8,
                 input_dim: int | None = None, slot_init: str = "learned", detach_last: bool = False,
                 position_hidden: int = 32, init_scale: float = 0.5, slot_balance: float = 0.0):
        super().__init__()
        input_dim = input_dim or dim
        self.num_slots, self.dim, self.iters, self.eps = num_slots, dim, iters, eps
        self.scale = dim**-0.5
        self.detach_last = detach_last
        self.slot_balance = slot_balance
        self.init = SLOT_INITS.build(slot_init, num_slots, dim)
        side = math.ceil(math.sqrt(num_slots))  # initial positions on a side x side lattice, then learned
        lattice = grid_positions(side, side)[:num_slots] * 0.5  # [K, 2]
        self.init_position = nn.Parameter(lattice.unsqueeze(0))  # [1, K, 2]
        self.init_scale = init_scale
        self.norm_inputs = nn.LayerNorm(input_dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.phi = nn.Sequential(nn.Linear(2, position_hidden), nn.ReLU(inplace=True),
                                 nn.Linear(position_hidden, input_dim))  # relative position -> feature offset
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(input_dim, dim, bias=False)
        self.to_v = nn.Linear(input_dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim))

    def step(self, slots: torch.Tensor, position: torch.Tensor, scale: torch.Tensor, inputs: torch.Tensor,
             grid: torch.Tensor, balance: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One iteration: inputs seen from each slot's frame, attention (softmax over slots), weighted mean, GRU,
        residual MLP, then the new frames.

        Args:
            slots: ``[B, K, D]``; position, scale: ``[B, K, 2]``; inputs: normalised ``[B, N, D_in]``; grid ``[N, 2]``;
            balance: ``[B, K, 1]`` added to the attention logits (``model.slot_balance``), or None.
        """
        b, num_slots, d = slots.shape
        rel = (grid[None, None] - position[:, :, None]) / scale[:, :, None]  # [B, K, N, 2]
        hidden = self.phi[1](self.phi[0](rel))  # [B, K, N, H]: phi's hidden layer
        w_out, b_out = self.phi[2].weight, self.phi[2].bias  # [D_in, H], [D_in]
        # Input i as slot k sees it is seen_ki = inputs_i + W_out hidden_ki + b_out, and keys and values are linear
        # in it, so everything is computed on the slots' side and the [B, K, N, D_in] tensor is never formed.
        key_dir = self.to_q(self.norm_slots(slots)) * self.scale @ self.to_k.weight  # [B, K, D_in]: q_k W_k
        logits = (torch.bmm(key_dir, inputs.transpose(1, 2))  # [B, K, N]: q_k . k(inputs_i)
                  + torch.einsum("bkh,bknh->bkn", key_dir @ w_out, hidden)  # + q_k . k(phi(rel_ki))
                  + (key_dir @ b_out)[..., None])  # [B, K, N]
        if balance is not None:
            logits = logits + balance
        attn = logits.softmax(dim=1)  # [B, K, N], normalised over slots
        weights = attn + self.eps
        weights = weights / weights.sum(dim=-1, keepdim=True)  # [B, K, N], a weighted mean over the inputs
        mean_seen = (torch.bmm(weights, inputs)  # [B, K, D_in]: the weighted mean of seen_ki
                     + torch.einsum("bkn,bknh->bkh", weights, hidden) @ w_out.t() + b_out)
        updates = self.to_v(mean_seen)  # [B, K, D]: v is linear
        slots = self.gru(updates.reshape(-1, d), slots.reshape(-1, d)).reshape(b, num_slots, d)
        slots = slots + self.mlp(self.norm_mlp(slots))  # [B, K, D]
        position, scale = frame_of(weights, grid)  # [B, K, 2] each
        return slots, position, scale, attn

    def forward(self, inputs: torch.Tensor, num_slots: int | None = None, slots: torch.Tensor | None = None,
                feature_size: tuple[int, int] | None = None) -> GroupingOutput:
        """Group ``inputs [B, N, D_in]`` (on the ``feature_size`` grid; square when not given) into framed slots."""
        b, n, _ = inputs.shape
        height, width = feature_size or (math.isqrt(n), math.isqrt(n))
        if height * width != n:
            raise ValueError(f"invariant slot attention: {n} inputs do not fill a {height}x{width} grid")
        grid = grid_positions(height, width, inputs.device).to(inputs.dtype)  # [N, 2]
        inputs = self.norm_inputs(inputs)  # [B, N, D_in]
        init_slots = self.init(b, num_slots) if slots is None else slots  # [B, K, D]
        k = init_slots.shape[1]
        if k != self.init_position.shape[1]:
            raise ValueError(f"invariant slot attention has learned frames for {self.init_position.shape[1]} slots, "
                             f"got num_slots={k}")
        init_position = self.init_position.expand(b, -1, -1)  # [B, K, 2]
        position, scale = init_position, torch.full_like(init_position, self.init_scale)
        slots = init_slots
        attn_per_iter = []
        balance = None
        iters = self.num_iters
        for t in range(iters):
            if self.detach_last and t == iters - 1:
                slots = straight_through(slots, init_slots)
                position = straight_through(position, init_position)
                scale = scale.detach()
            with iteration_grad(t, iters, self.detach_last):
                slots, position, scale, attn = self.step(slots, position, scale, inputs, grid, balance)
            if self.slot_balance and t < iters - 1:  # for the next iteration: a step towards equal shares
                balance = slot_balance_logits(attn.detach(), self.slot_balance)  # [B, K, 1]
            attn_per_iter.append(attn)
        return GroupingOutput(slots=slots, attn=attn, attn_per_iter=attn_per_iter, positions=position,
                              scales=scale)


@GROUPINGS.register("invariant_slot_attention")
def _build_invariant_slot_attention(cfg) -> InvariantSlotAttention:
    return InvariantSlotAttention(
        num_slots=cfg.num_slots, dim=cfg.slot_dim, iters=cfg.iters, hidden_dim=cfg.slot_hidden_dim, eps=cfg.eps,
        input_dim=cfg.input_dim, slot_balance=cfg.slot_balance, **init_options(cfg),
    )


__all__ = ["InvariantSlotAttention", "frame_of", "grid_positions"]
