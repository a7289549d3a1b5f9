"""Shared test fixtures: small configs and a tiny trained run."""

from __future__ import annotations

import os

import pytest
import torch

# The CI machine has 2 cores; keep torch from oversubscribing them when tests run.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def smoke_config():
    from slotlab.config import get_preset

    return get_preset("smoke")
