"""Sampling speed of SLATE's decoder: images/s of ``decode(slots)`` with and without the key/value cache.

Builds the model of each preset (``slate-sprites``: 8x8 = 64 tokens, 4 blocks of width 128; ``slate-clevrtex``:
32x32 = 1024 tokens, 4 blocks of width 192) with untrained weights (speed does not depend on them) and times greedy
``decode`` (every token, then the dVAE decoder): with the cache each step runs one token through the blocks; without
it, each step runs the whole prefix again (N(N+1)/2 token passes instead of N). Both draw the same tokens (tested in
tests/test_slate.py). The best of ``--repeats`` is kept.

    python benchmarks/slate_sampling.py                                  # auto device
    python benchmarks/slate_sampling.py --presets slate-sprites --batch 16 --device cpu
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from slotlab.config import apply_overrides, get_preset
from slotlab.models import Slate
from slotlab.runs import pick_device


def time_decode(model: Slate, slots: torch.Tensor, use_cache: bool, repeats: int) -> float:
    """Best wall seconds of one greedy ``decode`` of the batch."""
    best = float("inf")
    for _ in range(repeats):
        if slots.device.type == "cuda":
            torch.cuda.synchronize(slots.device)
        start = time.perf_counter()
        model.decode(slots, temperature=0.0, use_cache=use_cache)
        if slots.device.type == "cuda":
            torch.cuda.synchronize(slots.device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=[],
                        help="default: slate-sprites and slate-clevrtex on a GPU, slate-sprites on a CPU (where 1024 "
                             "tokens without the cache take a quarter of an hour per batch)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    presets = args.presets or (["slate-sprites", "slate-clevrtex"] if device.type == "cuda" else ["slate-sprites"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{datetime.date.today().isoformat()}, {name}, torch {torch.__version__}, batch {args.batch}, greedy\n")
    print("| preset | tokens | cache | s / batch | images/s | speed-up |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for preset in presets:
        config = apply_overrides(get_preset(preset), ["slate.dvae_run="])
        torch.manual_seed(0)
        model = Slate(config).to(device).eval()
        slots = torch.randn(args.batch, config.model.num_slots, config.model.slot_dim, device=device)
        tokens = model.positions.shape[1]
        seconds = {use_cache: time_decode(model, slots, use_cache, args.repeats) for use_cache in (True, False)}
        for use_cache in (True, False):
            print(f"| `{preset}` | {tokens} | {'yes' if use_cache else 'no'} | {seconds[use_cache]:.2f} | "
                  f"{args.batch / seconds[use_cache]:.1f} | {seconds[False] / seconds[use_cache]:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
