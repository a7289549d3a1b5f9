"""Forward + backward of ``slotlab.models.SlotAttention`` against the PyPI ``slot-attention`` module at equal shapes.

The reference is the module a user would otherwise import (``from slot_attention import SlotAttention``, lucidrains).
Both get the same inputs ``[B, N, D]``, the same K, D, T=3 and MLP width; the reference has biases on q/k/v (ours
does not), which costs it a little; everything else is the same Algorithm 1.

Usage::

    nice .venv/bin/python benchmarks/slot_attention.py                 # B=16, N=4096, D=64, K=7 (issue 2)
    nice .venv/bin/python benchmarks/slot_attention.py --device cuda --batch 64 --tokens 16384 --slots 11

Prints one row per module (device, shapes, ms per forward+backward, items/s) and the ratio ours / reference.
Rounds alternate between the two modules so that load from other processes hits both alike; the median and the best
round of wall time are reported, and the median process CPU time, which a busy shared machine disturbs least (with
``--threads 1``; with more threads it also counts OpenMP spin-waiting).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

from slotlab.models import SlotAttention


def time_fwd_bwd(module: torch.nn.Module, inputs: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """Wall and process-CPU seconds for one forward + backward (the mean square of the slots as a stand-in loss)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    out = module(inputs)
    slots = out.slots if hasattr(out, "slots") else out  # ours returns GroupingOutput, the reference a tensor
    slots.square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def import_reference() -> type:
    """``slot_attention.SlotAttention`` from PyPI. This script is also named ``slot_attention``, and Python puts its
    folder first on ``sys.path``, so a plain import would find the script itself: import with that folder left out."""
    here = Path(__file__).resolve().parent
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    try:
        module = importlib.import_module("slot_attention")
    finally:
        sys.path[:] = saved
    if Path(module.__file__).resolve().parent == here:
        raise SystemExit("could not import the PyPI slot-attention package (pip install slot-attention)")
    return module.SlotAttention


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4096, help="N, e.g. 64*64 features")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--slots", type=int, default=7)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ReferenceSlotAttention = import_reference()
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = SlotAttention(args.slots, args.dim, args.iters, hidden_dim=args.hidden).to(device)
    reference = ReferenceSlotAttention(args.slots, args.dim, args.iters, hidden_dim=args.hidden).to(device)
    inputs = torch.randn(args.batch, args.tokens, args.dim, device=device, requires_grad=True)  # [B, N, D]
    modules = {"slotlab.models.SlotAttention": ours, "slot_attention.SlotAttention (PyPI)": reference}

    times: dict[str, list[float]] = {name: [] for name in modules}
    cpu_times: dict[str, list[float]] = {name: [] for name in modules}
    for round_ in range(args.warmup + args.rounds):
        order = list(modules.items())
        for name, module in order if round_ % 2 else order[::-1]:  # who goes first alternates too
            seconds, cpu_seconds = time_fwd_bwd(module, inputs, device)
            module.zero_grad(set_to_none=True)
            inputs.grad = None
            if round_ >= args.warmup:
                times[name].append(seconds)
                cpu_times[name].append(cpu_seconds)

    threads = torch.get_num_threads()
    print(f"reference: {ReferenceSlotAttention.__module__}.{ReferenceSlotAttention.__name__} from "
          f"{sys.modules[ReferenceSlotAttention.__module__].__file__}")
    print(f"device={device} threads={threads} B={args.batch} N={args.tokens} D={args.dim} K={args.slots} "
          f"T={args.iters}; {args.rounds} rounds")
    print("| module | wall ms per fwd+bwd (median) | wall ms (best) | CPU ms (median) | items/s (median wall) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_times.items()}
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {min(times[name]) * 1e3:.1f} | {cpu_medians[name] * 1e3:.1f} | "
              f"{args.batch / seconds:.1f} |")
    ours, reference = list(times)
    print(f"speed ratio ours / reference: {medians[reference] / medians[ours]:.2f}x (median wall), "
          f"{min(times[reference]) / min(times[ours]):.2f}x (best wall), "
          f"{cpu_medians[reference] / cpu_medians[ours]:.2f}x (median process CPU time)")

if __name__ == "__main__":
    main()
