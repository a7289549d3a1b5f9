"""``slotlab data render``: write CLEVRTex-like scenes (:mod:`slotlab.data.scenes3d`) in the official CLEVRTex layout.

Layout (one loader, :class:`slotlab.data.clevrtex.CLEVRTex`, reads it and the real dataset alike)::

    OUT/clevrtex_<variant>/render.json                          settings of the render (checked on resume)
    OUT/clevrtex_<variant>/<index // 1000>/CLEVRTEX_<variant>_NNNNNN.png       RGB image
    OUT/clevrtex_<variant>/<index // 1000>/CLEVRTEX_<variant>_NNNNNN_flat.png  8-bit object ids, 0 = background
    OUT/clevrtex_<variant>/<index // 1000>/CLEVRTEX_<variant>_NNNNNN.json      objects (id m + 1 = objects[m])

Scene ``i`` depends only on ``(seed, i)``, so any number of worker processes writes the same bytes. Each file is
written to a temporary name and renamed, and the json is written last, so an interrupted render leaves only
complete scenes; running the same command again skips the scenes whose three files are present and valid.

Example:
    >>> render_dataset("tex", 100, Path("data/clevrtex"), seed=0, workers=2)  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from slotlab.data.properties import DEFAULT_SHAPES, RENDERED_SHAPES, RENDERED_VARIANTS
from slotlab.data.scenes3d import make_scene
from slotlab.errors import UserError

RENDERER_VERSION = 1  # bump when the pictures change, so that a resumed render never mixes two styles
BUCKET_SIZE = 1000  # scenes per sub-folder, as in CLEVRTex
MAX_SCENES = 1_000_000  # the file names hold six digits
PNG_COMPRESS_LEVEL = 1  # zlib level: several times faster than PIL's default 6, files ~15% larger
PNG_SIGNATURE, PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"


def parse_size(text: str) -> tuple[int, int]:
    """``"240x320"`` -> ``(240, 320)`` (height, width); :class:`UserError` if malformed or too small."""
    parts = str(text).lower().split("x")
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--size {text!r}: expected HxW, e.g. 240x320") from None
    if height < 16 or width < 16 or height > 4096 or width > 4096:
        raise UserError(f"--size {text!r}: height and width must be between 16 and 4096 pixels")
    return height, width


def parse_shapes(text: str) -> tuple[str, ...]:
    """Comma-separated shape names (empty = sphere, cube, cylinder); :class:`UserError` for unknown ones."""
    names = tuple(dict.fromkeys(s.strip().lower() for s in str(text or "").split(",") if s.strip()))
    unknown = [s for s in names if s not in RENDERED_SHAPES]
    if unknown:
        raise UserError(f"--shapes: unknown shape {unknown[0]!r} (known: {', '.join(RENDERED_SHAPES)})")
    return names or DEFAULT_SHAPES


def scene_paths(dataset_dir: Path, variant: str, index: int) -> tuple[Path, Path, Path]:
    """Image, mask and json paths of scene ``index`` in the CLEVRTex layout."""
    stem = dataset_dir / str(index // BUCKET_SIZE) / f"CLEVRTEX_{variant}_{index:06d}"
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + "_flat.png"), stem.with_suffix(".json")


def _is_complete_png(path: Path) -> bool:
    """A PNG with its signature and end chunk (cheap: a torn or truncated write fails this)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            handle.seek(-len(PNG_END), os.SEEK_END)
            return head == PNG_SIGNATURE and handle.read() == PNG_END
    except OSError:
        return False


def scene_complete(paths: tuple[Path, Path, Path]) -> bool:
    """Whether a scene's three files exist and look valid (so a resumed render may skip it)."""
    image, mask, meta = paths
    if not (_is_complete_png(image) and _is_complete_png(mask)):
        return False
    try:
        return isinstance(json.loads(meta.read_text()).get("objects"), list)
    except (OSError, ValueError, AttributeError):
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    # Temporary name + rename: readers (and a resumed render) see the whole file or none. No fsync per file: it
    # would cost more than rendering, and a file torn by a power cut fails scene_complete and is rendered again.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _png_bytes(array) -> bytes:
    """uint8 ``[H, W, 3]`` (RGB) or ``[H, W]`` (8-bit grey) -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="png", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def render_scene_files(dataset_dir: Path, variant: str, seed: int, index: int, height: int, width: int,
                       shapes: tuple[str, ...]) -> int:
    """Render scene ``index`` and write its image, mask and json (json last). Returns ``index``."""
    image, ids, record = make_scene(seed, index, variant, height, width, shapes)
    image_path, mask_path, json_path = scene_paths(dataset_dir, variant, index)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    record = {"image_index": index, "image_filename": image_path.name, "mask_filename": mask_path.name,
              "seed": seed, **record}
    _write_atomic(image_path, _png_bytes(image))
    _write_atomic(mask_path, _png_bytes(ids))
    _write_atomic(json_path, (json.dumps(record, indent=1) + "\n").encode())
    return index


def _render_job(job: tuple) -> int:
    return render_scene_files(*job)


def _check_settings(dataset_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to add scenes to a folder rendered with other settings (the dataset would mix two distributions)."""
    manifest = dataset_dir / "render.json"
    if manifest.exists():
        try:
            previous = json.loads(manifest.read_text())
        except (OSError, ValueError):
            raise UserError(f"{manifest} is not a readable render manifest; move it away or use another --out") \
                from None
        changed = [k for k in settings if previous.get(k) != settings[k]]
        if changed:
            was = ", ".join(f"{k}={previous.get(k)!r}" for k in changed)
            raise UserError(f"{dataset_dir} holds scenes rendered with {was}; render with the same settings to "
                            f"extend it, or choose another --out")
        return
    dataset_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(manifest, (json.dumps(settings, indent=1) + "\n").encode())


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def render_dataset(variant: str, num_scenes: int, out_dir: Path, seed: int = 0, workers: int = 0,
                   size: str = "240x320", shapes: str = "") -> dict[str, Any]:
    """Render scenes ``0 .. num_scenes - 1`` into ``out_dir/clevrtex_<variant>`` (see module docstring).

    Args:
        variant: ``clevr`` (plain colours) or ``tex`` (procedural textures on objects and floor).
        num_scenes: how many scenes the folder should hold; existing complete scenes are kept.
        out_dir: root folder (the CLEVRTex loader's ``root``).
        seed: scene ``i`` depends only on ``(seed, i)``; ``clevr`` and ``tex`` of one seed share layouts and masks.
        workers: processes (0 = all cores); the bytes written do not depend on it.
        size: ``HxW`` of the images (CLEVRTex: 240x320).
        shapes: comma-separated subset of cube, cylinder, sphere, cone, torus (empty = cube, cylinder, sphere).

    Returns:
        ``{"dir", "rendered", "kept", "seconds", "scenes_per_s"}``.

    Raises:
        UserError: bad arguments, or ``out_dir`` holding scenes rendered with other settings.
    """
    if variant not in RENDERED_VARIANTS:
        raise UserError(f"unknown render variant {variant!r} (known: {', '.join(RENDERED_VARIANTS)})")
    if not 1 <= num_scenes <= MAX_SCENES:
        raise UserError(f"--n {num_scenes}: the number of scenes must be between 1 and {MAX_SCENES}")
    if seed < 0:
        raise UserError(f"--seed {seed}: must be >= 0")
    if workers < 0:
        raise UserError(f"--workers {workers}: must be >= 0 (0 = all cores)")
    height, width = parse_size(size)
    shape_names = parse_shapes(shapes)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    dataset_dir = out_dir / f"clevrtex_{variant}"
    _check_settings(dataset_dir, {"generator": "slotlab", "renderer_version": RENDERER_VERSION, "variant": variant,
                                  "seed": seed, "size": [height, width], "shapes": list(shape_names)})

    todo = [i for i in range(num_scenes) if not scene_complete(scene_paths(dataset_dir, variant, i))]
    jobs = [(dataset_dir, variant, seed, i, height, width, shape_names) for i in todo]
    workers = min(workers or default_workers(), max(len(jobs), 1))
    start = time.perf_counter()
    progress = tqdm(total=num_scenes, initial=num_scenes - len(todo), desc=f"render {variant}", unit="scene",
                    dynamic_ncols=True, mininterval=0.5)
    try:
        if workers <= 1:
            for job in jobs:
                _render_job(job)
                progress.update(1)
        else:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                  else "spawn")
            with context.Pool(workers) as pool:
                for _ in pool.imap_unordered(_render_job, jobs, chunksize=4):
                    progress.update(1)
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    summary = {"dir": str(dataset_dir), "rendered": len(todo), "kept": num_scenes - len(todo),
               "seconds": round(seconds, 2), "scenes_per_s": round(len(todo) / seconds, 2) if todo else 0.0}
    print(f"{dataset_dir}: rendered {len(todo)} scenes ({summary['scenes_per_s']} scenes/s, {workers} workers), "
          f"kept {summary['kept']} already there")
    return summary
