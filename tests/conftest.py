"""Shared test fixtures: small configs and a tiny trained run."""

from __future__ import annotations

import os

import pytest
import torch

# The CI machine has 2 cores; keep torch from oversubscribing them when tests run. Subprocesses started by tests
# (CLI runs, distributed ranks) often run two at a time, so they get one thread each: OpenMP threads that outnumber
# the free cores spin and slow a step down by 10x or more.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _cache_outside_home(tmp_path_factory):
    """Procedural splits drawn by the tests are cached in a temporary folder, not in the user's ~/.cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture
def smoke_config():
    from slotlab.config import get_preset

    return get_preset("smoke")
