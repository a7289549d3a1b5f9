"""The Slot Mixture Module (Kirilenko et al., slides 003): Slot Attention as a learned Gaussian mixture.

Slot Attention is a learned soft k-means: each slot is a centroid. The Slot Mixture Module keeps a whole diagonal
Gaussian per slot (mean ``mu``, log-sigma) plus a mixing weight ``pi``, and runs a learned EM:

    mu, log_sigma ~ init;  pi = 1 / K
    for t in range(T):
        # E-step: p(slot k | input n) from Gaussian log-likelihoods of k(inputs), normalised over the slots
        resp = softmax_k(log N(k(x_n) | q(mu_k), sigma_k) + log pi_k)
        # M-step for the means, then the neural update
        mu = GRU(mu, weighted_mean(resp, v(inputs)));  mu = mu + MLP(norm(mu))
        # M-step for the remaining parameters
        log_sigma = 0.5 * log(weighted_mean(resp, (v(inputs) - mu) ** 2));  pi = mean_n(resp)
    slots = Linear(concat(mu, log_sigma))

The slot passed on describes the whole cluster (centre and spread), which the slides credit for the better set
prediction results. Shapes: inputs ``[B, N, D_in]``, slots ``[B, K, D]``, responsibilities ``[B, K, N]``.
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
    straight_through,
)


def squared_mahalanobis(points: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """``sum_d (x_d - mu_d)^2 / sigma_d^2`` of every point to every component, without a ``[B, K, N, D]`` tensor.

    Expands it as ``x^2 . s - 2 x . (mu s) + mu^2 . s`` with ``s = sigma^-2`` into two matrix products, so memory
    stays ``[B, K, N]`` even for 128x128 feature maps.

    Args:
        points: ``[B, N, D]``.
        mu: ``[B, K, D]`` component means.
        log_sigma: ``[B, K, D]`` component log standard deviations.

    Returns:
        ``[B, K, N]``, non-negative.
    """
    inv_var = torch.exp(-2.0 * log_sigma)  # [B, K, D]
    squared = (torch.bmm(inv_var, (points**2).transpose(1, 2))  # [B, K, N]
               - 2.0 * torch.bmm(mu * inv_var, points.transpose(1, 2))
               + (mu**2 * inv_var).sum(-1, keepdim=True))
    return squared.clamp_min(0.0)  # the expansion can dip below 0 by rounding


def gaussian_log_likelihood(points: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density ``[B, K, N]`` of every point ``[B, N, D]`` under every component (means and
    log standard deviations ``[B, K, D]``): ``log N(points_n | mu_k, diag(sigma_k^2))``."""
    log_norm = log_sigma.sum(-1, keepdim=True) + 0.5 * points.shape[-1] * math.log(2 * math.pi)  # [B, K, 1]
    return -0.5 * squared_mahalanobis(points, mu, log_sigma) - log_norm  # [B, K, N]


def log_responsibilities(log_likelihood: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """E-step in log space: ``log p(k | n) = log pi_k N_k(x_n) - log sum_j pi_j N_j(x_n)``.

    Normalised with log-sum-exp (``log_softmax`` subtracts the maximum first), so inputs far from every slot, whose
    likelihoods all underflow to 0 in linear space (0 / 0 in the slides' pseudocode), still get finite
    responsibilities that sum to 1.

    Args:
        log_likelihood: ``[B, K, N]`` log p(x_n | slot k).
        log_pi: ``[B, K, 1]`` log mixing weights.

    Returns:
        ``[B, K, N]`` log-responsibilities; their ``exp`` sums to 1 over K.
    """
    return torch.log_softmax(log_likelihood + log_pi, dim=1)  # [B, K, N]


class SlotMixture(IterativeGrouping):
    """The Slot Mixture Module: learned EM over diagonal Gaussians, one per slot.

    Args:
        num_slots: K, the default number of slots.
        dim: D, the slot size (also the size of each mean and log-sigma).
        iters: T, EM iterations.
        hidden_dim: width of the residual MLP after the GRU.
        eps: added to the responsibilities before the weighted means, and to the variances before the log.
        input_dim: D_inputs (defaults to ``dim``).
        slot_init: ``"gaussian"``, ``"learned"`` (see :data:`SLOT_INITS`); it initialises ``concat(mu, log_sigma)``.
        detach_last: BO-QSA's bi-level trick, as in :class:`~slotlab.models.slot_attention.SlotAttention`.
        likelihood: the E-step's score of input n for slot k. ``"gaussian"`` (the slides' pseudocode): the diagonal
            Gaussian log-density of the key under ``(q(mu), sigma)``, log-determinant included. ``"mahalanobis"``
            (the authors' code): minus the squared distance of the key to ``q(mu)`` scaled by a key-space sigma
            ``q(norm(log_sigma))``, with no log-determinant, so a slot with a tight cluster of values gets no bonus
            for it.

    Example:
        >>> smm = SlotMixture(num_slots=5, dim=32)
        >>> out = smm(torch.randn(2, 100, 32))
        >>> out.slots.shape, out.attn.shape
        (torch.Size([2, 5, 32]), torch.Size([2, 5, 100]))
    """

    def __init__(self, num_slots: int, dim: int, iters: int = 3, hidden_dim: int = 128, eps: float = 1e-8,
                 input_dim: int | None = None, slot_init: str = "gaussian", detach_last: bool = False,
                 likelihood: str = "gaussian"):
        super().__init__()
        if likelihood not in ("gaussian", "mahalanobis"):
            raise ValueError(f"unknown likelihood {likelihood!r} (gaussian, mahalanobis)")
        self.likelihood = likelihood
        input_dim = input_dim or dim
        self.num_slots, self.dim, self.iters, self.eps = num_slots, dim, iters, eps
        # The log-likelihood sums D terms; like Slot Attention's 1/sqrt(D) on the dot product, this temperature keeps
        # the E-step from saturating to hard assignments at initialisation (the authors' code does the same).
        self.temperature = dim**0.5
        self.detach_last = detach_last
        self.init = SLOT_INITS.build(slot_init, num_slots, 2 * dim)  # initial concat(mu, log_sigma)
        self.norm_inputs = nn.LayerNorm(input_dim)
        self.norm_mu = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)  # reads each mean into the key space, as Slot Attention's query
        self.to_kv = nn.Linear(input_dim, 2 * dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim))
        self.to_slot = nn.Linear(2 * dim, dim)  # concat(mu, log_sigma) -> slot
        if likelihood == "mahalanobis":
            self.norm_sigma = nn.LayerNorm(dim)  # reads log_sigma into the key space through to_q

    def step(self, mu: torch.Tensor, log_sigma: torch.Tensor, log_pi: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One EM iteration; returns the new ``(mu, log_sigma, log_pi)`` and the responsibilities ``[B, K, N]``."""
        b, num_slots, d = mu.shape
        q = self.to_q(self.norm_mu(mu))  # [B, K, D]
        # The E-step and the second moments are computed in fp32 even under bf16 autocast: they subtract large,
        # nearly equal numbers (see gaussian_log_likelihood) and exponentiate the result.
        with torch.autocast(device_type=k.device.type, enabled=False):
            if self.likelihood == "gaussian":
                log_lik = gaussian_log_likelihood(k.float(), q.float(), log_sigma.float())  # [B, K, N]
            else:
                key_log_sigma = self.to_q(self.norm_sigma(log_sigma)).float()  # [B, K, D]
                log_lik = -squared_mahalanobis(k.float(), q.float(), key_log_sigma)  # [B, K, N]
            log_lik = log_lik / self.temperature
            log_resp = log_responsibilities(log_lik, log_pi.float())  # [B, K, N]
            resp = log_resp.exp()  # [B, K, N], sums to 1 over K
            weights = resp + self.eps
            weights = weights / weights.sum(dim=-1, keepdim=True)  # [B, K, N], sums to 1 over N
            v32 = v.float()
            mean_v = torch.bmm(weights, v32)  # [B, K, D], M-step for the means
            mean_v2 = torch.bmm(weights, v32**2)  # [B, K, D], second moment, for the variances below
        mu = self.gru(mean_v.to(mu.dtype).reshape(-1, d), mu.reshape(-1, d)).reshape(b, num_slots, d)
        mu = mu + self.mlp(self.norm_mlp(mu))  # [B, K, D]
        with torch.autocast(device_type=k.device.type, enabled=False):
            mu32 = mu.float()
            # sum_n w_n (v_n - mu)^2 = E_w[v^2] - 2 mu E_w[v] + mu^2, around the *updated* mean as in the slides.
            variance = (mean_v2 - 2.0 * mu32 * mean_v + mu32**2).clamp_min(0.0)  # [B, K, D]
            log_sigma = 0.5 * torch.log(variance + self.eps)  # [B, K, D]
            # pi_k = mean_n resp[k, n], taken in log space so an empty slot gets a finite log-weight.
            log_pi = torch.logsumexp(log_resp, dim=-1, keepdim=True) - math.log(resp.shape[-1])  # [B, K, 1]
        return mu, log_sigma, log_pi, resp

    def forward(self, inputs: torch.Tensor, num_slots: int | None = None, slots: torch.Tensor | None = None,
                feature_size: tuple[int, int] | None = None) -> GroupingOutput:
        """Group ``inputs [B, N, D_in]``; ``slots [B, K, 2D]`` overrides the initial ``concat(mu, log_sigma)``."""
        b = inputs.shape[0]
        inputs = self.norm_inputs(inputs)  # [B, N, D_in]
        k, v = self.to_kv(inputs).chunk(2, dim=-1)  # [B, N, D] each
        init_state = self.init(b, num_slots) if slots is None else slots  # [B, K, 2D]
        state = init_state
        k_slots = state.shape[1]
        log_pi = torch.full((b, k_slots, 1), -math.log(k_slots), device=inputs.device)  # pi = 1 / K
        attn_per_iter = []
        iters = self.num_iters
        for t in range(iters):
            if self.detach_last and t == iters - 1:
                # BO-QSA: gradient skips the earlier iterations and reaches the initial state straight through.
                state = straight_through(state, init_state)
                log_pi = log_pi.detach()
            mu, log_sigma = state.split(self.dim, dim=-1)  # [B, K, D] each
            with iteration_grad(t, iters, self.detach_last):
                mu, log_sigma, log_pi, resp = self.step(mu, log_sigma, log_pi, k, v)
            state = torch.cat([mu, log_sigma.to(mu.dtype)], dim=-1)  # [B, K, 2D]
            attn_per_iter.append(resp)
        slots = self.to_slot(state)  # [B, K, D]
        return GroupingOutput(slots=slots, attn=attn_per_iter[-1], attn_per_iter=attn_per_iter)


@GROUPINGS.register("slot_mixture")
def _build_slot_mixture(cfg) -> SlotMixture:
    return SlotMixture(
        num_slots=cfg.num_slots, dim=cfg.slot_dim, iters=cfg.iters, hidden_dim=cfg.slot_hidden_dim, eps=cfg.eps,
        input_dim=cfg.input_dim, likelihood=cfg.mixture_likelihood, **init_options(cfg),
    )


__all__ = ["SlotMixture", "gaussian_log_likelihood", "log_responsibilities", "squared_mahalanobis"]
