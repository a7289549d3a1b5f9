"""Per-sample noise that does not depend on how a batch is split across data-parallel processes.

Models draw per-sample noise (the Gaussian slot initialisation) with :func:`batch_randn`; the trainer enters
:func:`batch_shard` with its rank and world size around each training step, so a G-process run draws the noise of the
whole global batch and keeps its own rows (see :mod:`slotlab.train.distributed`). Outside that block, and in a single
process, :func:`batch_randn` is exactly ``torch.randn``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_BATCH_SHARD: tuple[int, int] = (0, 1)  # (rank, world size) of the training batch being processed


@contextmanager
def batch_shard(rank: int, world_size: int) -> Iterator[None]:
    """Within this block, :func:`batch_randn` returns this rank's rows of the global batch's noise."""
    global _BATCH_SHARD
    previous, _BATCH_SHARD = _BATCH_SHARD, (rank, world_size)
    try:
        yield
    finally:
        _BATCH_SHARD = previous


def batch_randn(batch_size: int, *shape: int, device: torch.device | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.randn(batch_size, *shape)`` whose rows are the same however the batch is split across processes.

    In a G-process training step the noise of the whole global batch (``G * batch_size`` rows) is drawn from the
    RNG state all ranks share and this rank keeps its rows; in a single process this is exactly ``torch.randn``.
    Models draw per-sample noise with it so that a data-parallel run reproduces the single-process one.
    """
    rank, world_size = _BATCH_SHARD
    if world_size == 1:
        return torch.randn(batch_size, *shape, device=device, dtype=dtype)
    noise = torch.randn(batch_size * world_size, *shape, device=device, dtype=dtype)
    return noise[rank * batch_size : (rank + 1) * batch_size]
