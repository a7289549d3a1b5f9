"""Loader speed: decoding CLEVRTex-layout PNGs and colour-mask folders, against reading the memory-mapped cache.

Without ``--root``, renders ``--scenes`` tex scenes at 240x320 into a temporary folder first (not timed), and
also writes them as an image folder in the course's layout (RGBA images, colour-coded RGB masks). Rows:

* ``png decode, 1 process`` (the reference): ``CLEVRTex(cache=False, workers=1)``, i.e. PIL decode, official crop,
  resize to 128 (bilinear / nearest), json -> object extras;
* ``png decode, W processes``: the same with W worker processes;
* ``folder (colour masks), W processes``: ``ImageFolder`` on the course layout;
* ``build cache, W processes``: decode + write the memory-mapped cache;
* ``cache read``: random batches of 64 from the memory-mapped cache (``dataset.batch``), as the training loop reads
  them, and the same plus ``to_model_batch`` (uint8 -> float in [-1, 1] on the CPU).

Usage::

    nice .venv/bin/python benchmarks/loaders.py                          # 600 rendered scenes, 2 workers
    nice .venv/bin/python benchmarks/loaders.py --root data/clevrtex --variant full --split val

wall = images/s as measured (depends on other jobs on the machine); CPU = CPU ms per image over all processes.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from slotlab.data import CLEVRTex, ImageFolder, to_model_batch
from slotlab.data.render import render_dataset
from slotlab.data.scenes3d import COLOR_RGB


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn):
    """(result, wall seconds, CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def write_course_folder(clevrtex_dir: Path, out: Path) -> None:
    """The rendered scenes as ``images/`` (RGBA) and ``masks/`` (one colour per object on black)."""
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    palette = np.array([(0, 0, 0)] + list(COLOR_RGB.values()) * 32, dtype=np.uint8)
    for path in sorted(clevrtex_dir.glob("*/CLEVRTEX_*_??????.png")):
        rgba = Image.open(path).convert("RGBA")
        rgba.save(out / "images" / path.name)
        ids = np.asarray(Image.open(path.with_name(path.stem + "_flat.png")))
        Image.fromarray(palette[ids]).save(out / "masks" / path.name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="", help="an existing CLEVRTex-layout folder (default: render one)")
    parser.add_argument("--variant", default="tex")
    parser.add_argument("--split", default="train")
    parser.add_argument("--scenes", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = Path(args.root) if args.root else tmp / "clevrtex"
        folder = None
        if not args.root:
            render_dataset(args.variant, args.scenes, root, seed=0, workers=args.workers)
            folder = tmp / "course"
            write_course_folder(root / f"clevrtex_{args.variant}", folder)
        os.environ["SLOTLAB_CACHE_DIR"] = str(tmp / "cache")
        rows = []
        reference, wall, cpu = timed(lambda: CLEVRTex(root, args.variant, args.split, workers=1))
        count = len(reference)
        rows.append(("png decode, 1 process (reference)", count, wall, cpu))
        _, wall, cpu = timed(lambda: CLEVRTex(root, args.variant, args.split, workers=args.workers))
        rows.append((f"png decode, {args.workers} processes", count, wall, cpu))
        if folder is not None:
            listed, wall, cpu = timed(lambda: ImageFolder(folder, args.split, workers=args.workers))
            rows.append((f"folder (colour masks), {args.workers} processes", len(listed), wall, cpu))
        cached, wall, cpu = timed(lambda: CLEVRTex(root, args.variant, args.split, cache=True,
                                                   workers=args.workers))
        rows.append((f"build cache, {args.workers} processes", count, wall, cpu))
        reopened, wall, cpu = timed(lambda: CLEVRTex(root, args.variant, args.split, cache=True))
        rows.append(("open cache (scan + fingerprint + mmap)", count, wall, cpu))
        assert np.array_equal(reopened.images, reference.images)

        rng = np.random.default_rng(0)
        batches = [rng.integers(0, count, size=args.batch) for _ in range(args.batches)]
        _, wall, cpu = timed(lambda: [reopened.batch(b) for b in batches])
        rows.append((f"cache read, batches of {args.batch}", args.batch * args.batches, wall, cpu))
        _, wall, cpu = timed(lambda: [to_model_batch(reopened.batch(b), "cpu") for b in batches])
        rows.append(("cache read + to_model_batch (CPU float)", args.batch * args.batches, wall, cpu))

    height, width = reference.resolution
    print(f"\ndevice: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"load average {os.getloadavg()[0]:.1f}); {args.variant} {args.split} split: {count} images "
          f"-> {height}x{width}")
    reference_rate = rows[0][1] / rows[0][2]
    print(f"| {'configuration':42s} | {'images':>6s} | {'wall images/s':>13s} | {'CPU ms/image':>12s} | "
          f"{'wall vs reference':>17s} |")
    print(f"|{'-' * 44}|{'-' * 8}|{'-' * 15}|{'-' * 14}|{'-' * 19}|")
    for name, images, wall, cpu in rows:
        print(f"| {name:42s} | {images:6d} | {images / wall:13.0f} | {1000 * cpu / images:12.3f} | "
              f"{images / wall / reference_rate:16.1f}x |")


if __name__ == "__main__":
    main()
