"""Speed of ``slotlab data render`` (CLEVRTex-like 240x320 scenes) against a plain, unculled ray caster.

Rows (every row renders the same scene indices and writes the three files of each scene: PNG, mask PNG, json):

* ``reference``: one process, no culling: every camera ray tested against every object, every shadow ray against
  every object (the straightforward vectorised ray caster);
* ``ours, 1 process``: camera rays only inside each object's screen rectangle, shadow rays only where they pass an
  object's bounding sphere (checked here to give byte-identical pictures);
* ``ours, W processes``: ``render_dataset`` with a pool of W workers (the command's path).

Usage::

    nice .venv/bin/python benchmarks/render.py                      # 60 tex scenes, 240x320, 2 workers
    nice .venv/bin/python benchmarks/render.py --variant clevr --scenes 200 --workers 4

The table gives scenes/s and the ratio to the reference. On a machine shared with other jobs, numbers move a lot
between runs: run it a few times, or on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

from slotlab.data import scenes3d
from slotlab.data.properties import DEFAULT_SHAPES
from slotlab.data.render import parse_size, render_dataset, render_scene_files


def _naive_floor_shadows(scene, dirs, depth, ids):
    cam = scene.camera
    rows, cols = np.nonzero((ids == 0) & np.isfinite(depth))
    points = cam.position[:, None] + depth[rows, cols] * dirs[:, rows, cols]
    points[2] = 2e-3
    hit = np.zeros(len(rows), dtype=bool)
    for obj in scene.objects:
        hit |= scenes3d._shadowed_by(obj, points, scene.light)
    shadow = np.zeros(depth.shape, dtype=bool)
    shadow[rows, cols] = hit
    return shadow


def _naive_object_shadows(scene, points):
    hit = np.zeros(points.shape[1], dtype=bool)
    for obj in scene.objects:
        hit |= scenes3d._shadowed_by(obj, points, scene.light)
    return hit


@contextlib.contextmanager
def no_culling():
    """Patch the ray caster so that every ray meets every object (the plain reference)."""
    def whole_frame(camera, centre, radius):
        return 0, camera.height, 0, camera.width

    with mock.patch.object(scenes3d.Camera, "screen_rect", whole_frame), \
            mock.patch.object(scenes3d, "floor_shadows", _naive_floor_shadows), \
            mock.patch.object(scenes3d, "object_shadows", _naive_object_shadows):
        yield


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def render_serial(out: Path, variant: str, scenes: int, height: int, width: int) -> None:
    folder = out / f"clevrtex_{variant}"
    for index in range(scenes):
        render_scene_files(folder, variant, 0, index, height, width, DEFAULT_SHAPES)


def same_files(a: Path, b: Path) -> bool:
    files_a = {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    return files_a == files_b


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tex", choices=["clevr", "tex"])
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--size", default="240x320")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    height, width = parse_size(args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with no_culling():
            rows.append(("reference (no culling), 1 process",
                         *timed(lambda: render_serial(tmp / "reference", args.variant, args.scenes, height, width))))
        rows.append(("ours, 1 process",
                     *timed(lambda: render_serial(tmp / "ours", args.variant, args.scenes, height, width))))
        identical = same_files(tmp / "reference", tmp / "ours")
        rows.append((f"ours, {args.workers} processes (render_dataset)",
                     *timed(lambda: render_dataset(args.variant, args.scenes, tmp / "pool", seed=0,
                                                   workers=args.workers, size=args.size))))
    reference_cpu = rows[0][2]
    print(f"\ndevice: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"load average {os.getloadavg()[0]:.1f}); variant {args.variant}, {height}x{width}, {args.scenes} scenes")
    print(f"culled and unculled renders byte-identical: {identical}")
    print("wall: scenes/s as measured (depends on other jobs); CPU: CPU time per scene, all processes (does not)")
    print(f"| {'configuration':42s} | {'wall scenes/s':>13s} | {'CPU ms/scene':>12s} | {'CPU vs reference':>16s} |")
    print(f"|{'-' * 44}|{'-' * 15}|{'-' * 14}|{'-' * 18}|")
    for name, wall, cpu in rows:
        print(f"| {name:42s} | {args.scenes / wall:13.1f} | {1000 * cpu / args.scenes:12.1f} | "
              f"{reference_cpu / cpu:15.2f}x |")


if __name__ == "__main__":
    main()
