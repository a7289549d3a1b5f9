"""ARI + FG-ARI over a validation set: ``slotlab.metrics`` (one batched contingency table) vs a sklearn loop.

The reference is what object-centric code bases usually run (e.g. the CLEVRTex evaluator): for each image,
``sklearn.metrics.adjusted_rand_score`` on all pixels and again on the foreground pixels. It costs a few ms per
image, so it is timed on the first ``--ref-images`` images and extrapolated to the whole set (the table says so);
on those images the two results are compared (largest absolute difference).

Inputs are what ``slotlab eval`` has at hand: predicted ids ``[B, H, W]`` (the argmax of the model's masks) and true
ids ``[B, H, W]``, both int64, already on ``--device``. Scenes are random rectangles (up to K-1 objects on a
background); predictions are a permutation of the true ids with ``--noise`` of the pixels reassigned at random.

Usage::

    nice .venv/bin/python benchmarks/metrics.py                       # 10,000 x 128x128, K=11, CPU (issue 4)
    .venv/bin/python benchmarks/metrics.py --device cuda              # the same on a GPU
    .venv/bin/python benchmarks/metrics.py --images 1000 --ref-images 50 --all-scores
    .venv/bin/python benchmarks/metrics.py --images 500 --soft-masks   # from [B, K, H, W] soft masks (argmax included)

Prints one row per method (device, shapes, seconds for the whole set, images/s, peak memory) and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from slotlab.metrics import ari, fg_ari, object_discovery_scores
from slotlab.metrics.ari import ari_from_contingency, contingency, fg_ari_from_contingency, mask_ids


def make_scenes(batch: int, size: int, num_slots: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true ids ``[batch, size, size]`` (int64): rectangles on a background, noisy predictions."""
    rng = np.random.default_rng(seed)
    true = np.zeros((batch, size, size), dtype=np.int64)
    ys = np.arange(size)[None, :, None]  # [1, H, 1]
    xs = np.arange(size)[None, None, :]  # [1, 1, W]
    num_objects = rng.integers(1, num_slots, batch)  # [B], 1 .. K-1 objects
    for obj in range(1, num_slots):
        y0, x0 = rng.integers(0, size - 8, (2, batch, 1, 1))
        h, w = rng.integers(8, size // 2, (2, batch, 1, 1))
        inside = (ys >= y0) & (ys < y0 + h) & (xs >= x0) & (xs < x0 + w) & (num_objects >= obj)[:, None, None]
        true[inside] = obj
    pred = rng.permutation(num_slots)[true]
    flip = rng.random(pred.shape) < noise
    pred[flip] = rng.integers(0, num_slots, int(flip.sum()))
    return torch.from_numpy(pred), torch.from_numpy(true)


def soft_masks(pred: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Soft masks ``[B, K, H, W]`` (softmax over K) whose argmax is ``pred``, as a model's decoder gives them."""
    logits = torch.randn(*pred.shape[:1], num_slots, *pred.shape[1:], device=pred.device)  # [B, K, H, W]
    logits.scatter_(1, pred.unsqueeze(1), 10.0)  # the predicted slot wins every pixel
    return logits.softmax(dim=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours_ari_fg_ari(pred: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ARI and FG-ARI from one contingency table (what ``ARIMetric`` and ``slotlab eval`` do)."""
    table = contingency(pred, true)  # [B, T, K]
    return ari_from_contingency(table), fg_ari_from_contingency(table)


def sklearn_ari_fg_ari(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-image reference loop."""
    aris, fg_aris = [], []
    for p, t in zip(pred.reshape(len(pred), -1), true.reshape(len(true), -1)):
        aris.append(adjusted_rand_score(t, p))
        fg_aris.append(adjusted_rand_score(t[t > 0], p[t > 0]))
    return np.array(aris), np.array(fg_aris)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--slots", type=int, default=11, help="K; scenes have up to K-1 objects")
    parser.add_argument("--batch", type=int, default=250, help="images per metric call")
    parser.add_argument("--ref-images", type=int, default=300, help="images the sklearn loop is timed on")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes over the set (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--all-scores", action="store_true", help="also time ARI+FG-ARI+mIoU+mBO together")
    parser.add_argument("--soft-masks", action="store_true",
                        help="also time ARI + FG-ARI from soft masks [B, K, H, W] (the argmax over slots included)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    batches = []
    for start in range(0, args.images, args.batch):
        n = min(args.batch, args.images - start)
        pred, true = make_scenes(n, args.size, args.slots, args.noise, seed=start)
        batches.append((pred.to(device), true.to(device)))

    needed = -(-args.ref_images // args.batch)  # batches that hold the reference images
    pred_ref = torch.cat([p for p, _ in batches[:needed]])[: args.ref_images]
    true_ref = torch.cat([t for _, t in batches[:needed]])[: args.ref_images]
    pred_ref_np, true_ref_np = pred_ref.cpu().numpy(), true_ref.cpu().numpy()
    ref_ari, ref_fg = sklearn_ari_fg_ari(pred_ref_np, true_ref_np)  # also warms sklearn up
    max_diff = max(float(np.abs(ari(pred_ref, true_ref).cpu().numpy() - ref_ari).max()),
                   float(np.abs(fg_ari(pred_ref, true_ref).cpu().numpy() - ref_fg).max()))

    def time_pass(fn) -> float:
        sync(device)
        start = time.perf_counter()
        for pred, true in batches:
            fn(pred, true)
        sync(device)
        return time.perf_counter() - start

    # Rounds alternate between the reference and ours, so that load from other processes hits both alike.
    methods = {"ours": ours_ari_fg_ari}
    if args.all_scores:
        methods["all"] = object_discovery_scores
    if args.soft_masks:  # what eval has from a model: soft masks; each batch's masks are made once, outside the timing
        soft = {id(pred): soft_masks(pred, args.slots) for pred, _ in batches}
        methods["soft"] = lambda pred, true: ours_ari_fg_ari(mask_ids(soft[id(pred)]), true)
    for fn in methods.values():
        fn(*batches[0])  # warm-up (CUDA context, caches)
    times: dict[str, list[float]] = {"ref": [], **{name: [] for name in methods}}
    for _ in range(args.rounds):
        start = time.perf_counter()
        sklearn_ari_fg_ari(pred_ref_np, true_ref_np)
        times["ref"].append((time.perf_counter() - start) * args.images / args.ref_images)
        for name, fn in methods.items():
            times[name].append(time_pass(fn))
    ref_seconds = statistics.median(times["ref"])
    rows = [(f"sklearn loop (timed on {args.ref_images}, extrapolated)", "cpu", ref_seconds)]
    rows.append(("slotlab ari + fg_ari", device.type, statistics.median(times["ours"])))
    if args.all_scores:
        rows.append(("slotlab ari + fg_ari + miou + mbo", device.type, statistics.median(times["all"])))
    if args.soft_masks:
        rows.append(("slotlab ari + fg_ari from soft masks [B,K,H,W]", device.type, statistics.median(times["soft"])))

    shape = f"{args.images}x{args.size}x{args.size}, K={args.slots}"
    load = os.getloadavg()[0]
    print(f"ARI + FG-ARI over {shape}; torch threads={args.threads}, batch={args.batch}, "
          f"load average {load:.1f} on {os.cpu_count()} cores")
    print("| method | device | seconds | images/s | speed-up vs sklearn |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, dev, seconds in rows:
        print(f"| {name} | {dev} | {seconds:.2f} | {args.images / seconds:,.0f} | {ref_seconds / seconds:.1f}x |")
    print(f"peak memory ({device.type}): {peak_memory_mb(device):,.0f} MiB; "
          f"largest |ours - sklearn| on {args.ref_images} images: {max_diff:.2e}")


if __name__ == "__main__":
    main()
