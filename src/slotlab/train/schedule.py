"""Learning-rate schedules as pure functions of the step (nanoGPT's ``get_lr``)."""

from __future__ import annotations

import math

from slotlab.config import TrainConfig
from slotlab.errors import UserError

SCHEDULES = ("warmup_exp", "warmup_cosine", "constant")


def lr_at(step: int, cfg: TrainConfig, budget_progress: float | None = None) -> float:
    """Learning rate for optimisation step ``step`` (0-based).

    * ``warmup_exp`` (Slot Attention paper): linear warm-up over ``warmup_steps``, then
      ``lr * decay_rate ** (step / decay_steps)``.
    * ``warmup_cosine`` (report 001): linear warm-up, then cosine annealing from ``lr`` to ``min_lr`` at ``steps``,
      or, with a time budget, at the end of the budget: ``budget_progress`` is the fraction of it used so far, and
      the cosine follows whichever of steps and time runs out first.
    * ``constant``: linear warm-up, then ``lr``.
    """
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.schedule == "warmup_exp":
        return cfg.lr * warmup * cfg.decay_rate ** (step / cfg.decay_steps)
    if cfg.schedule == "warmup_cosine":
        if step < cfg.warmup_steps:
            return cfg.lr * warmup
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        if budget_progress is not None:
            progress = max(progress, min(1.0, budget_progress))
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "constant":
        return cfg.lr * warmup
    raise UserError(f"unknown train.schedule {cfg.schedule!r} (known: {', '.join(SCHEDULES)})")
