"""keep_freed_memory: glibc keeps the memory of freed tensors for the next step instead of faulting it in anew."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from slotlab import runs

glibc_only = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc")

# page faults per training step of a small conv net, with glibc's defaults ("default") or after keep_freed_memory
FAULTS_PER_STEP = """
import ctypes, resource, sys
ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: count 4 KiB pages, whatever THP is set to
import torch
from slotlab.runs import keep_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 5, padding=2), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 5, padding=2))
x = torch.randn(8, 3, 64, 64)
def step():
    net(x).square().mean().backward()
    torch.ones(12 << 20)  # 48 MiB: above any mmap threshold glibc allows (a bf16 decoder activation is 56 MiB)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults_per_step(mode: str) -> float:
    settings = ("GLIBC_TUNABLES", "SLOTLAB_KEEP_FREED_MEMORY")  # and MALLOC_*: the defaults in both runs
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in settings}
    done = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True,
                          env=env)
    return float(done.stdout.split()[-1])


@glibc_only
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    default, kept = _faults_per_step("default"), _faults_per_step("keep")
    assert kept * 4 < default, (kept, default)


@glibc_only
def test_the_users_own_malloc_settings_are_left_alone(monkeypatch):
    for name in ("GLIBC_TUNABLES", "SLOTLAB_KEEP_FREED_MEMORY", *runs._MALLOC_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(runs, "_kept_freed_memory", False)
    for name, value in (("MALLOC_TOP_PAD_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
                        ("SLOTLAB_KEEP_FREED_MEMORY", "0")):
        monkeypatch.setenv(name, value)
        assert runs.keep_freed_memory() is False, name
        monkeypatch.delenv(name)
    assert runs.keep_freed_memory() is True  # (the trainer's tests set it in this process anyway)
