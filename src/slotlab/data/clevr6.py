"""CLEVR6 (CLEVR scenes with 3-6 objects, the Slot Attention paper's subset), rendered on the fly.

slotlab's ray caster (:mod:`slotlab.data.scenes3d`, variant ``clevr``: CLEVR's camera, lights, eight colours, rubber
and metal spheres, cubes and cylinders in three sizes) draws each scene at 1.5x the model's resolution in CLEVR's 4:3
frame, then takes the CLEVRTex loader's centre crop (0.8 of the height) and resizes it to ``resolution`` (bilinear for
images, nearest for masks), as :mod:`slotlab.data.clevrtex` does for rendered folders. Scene ``i`` of a split depends
only on ``(seed, split, i)``. Rendering costs a few milliseconds per 64x64 scene, so a split is rendered once, in
worker processes, and kept in the cache folder (:func:`slotlab.data.cache.cached_generation`). Differences from the
published set are listed in docs/data.md.
"""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from slotlab.data.base import ArrayDataset
from slotlab.data.cache import cached_generation
from slotlab.data.clevrtex import CROP_FRACTION, image_rgb, resize_ids
from slotlab.data.properties import DEFAULT_SHAPES, MAX_OBJECTS, PROPERTY_NAMES, encode_objects, property_values
from slotlab.data.scenes3d import make_scene
from slotlab.data.sprites import SPLIT_STREAMS

RENDERER_VERSION = 1  # part of the cache key: bump when the pictures change
RENDER_SCALE = 1.5  # render height / model resolution (the crop keeps 0.8 of it)


def render_size(resolution: int) -> tuple[int, int]:
    """``(height, width)`` of the rendered frame for a model resolution (4:3, as CLEVR)."""
    height = int(round(RENDER_SCALE * resolution))
    return height, int(round(height * 4 / 3))


def _render(job: tuple[int, int, int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    scene_seed, index, resolution, min_objects, max_objects = job
    height, width = render_size(resolution)
    image, ids, record = make_scene(scene_seed, index, "clevr", height, width, DEFAULT_SHAPES, min_objects,
                                    max_objects)
    rgb = image_rgb(Image.fromarray(image), CROP_FRACTION, resolution)
    mask = resize_ids(ids, CROP_FRACTION, resolution)
    coords, props, _ = encode_objects(record["objects"], property_values("clevr"), MAX_OBJECTS)
    return rgb, mask, coords, props


def make_clevr6(num_images: int, seed: int, split: str, resolution: int = 64, min_objects: int = 3,
                max_objects: int = 6, workers: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Render a split: images, ids and the object extras of the CLEVRTex loader (in worker processes)."""
    scene_seed = seed * len(SPLIT_STREAMS) + SPLIT_STREAMS[split]  # disjoint scenes for each (seed, split)
    jobs = [(scene_seed, i, resolution, min_objects, max_objects) for i in range(num_images)]
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    progress = dict(total=num_images, desc=f"render clevr6 {split}", unit="scene", disable=num_images < 200,
                    mininterval=1.0)
    if workers > 1 and num_images >= 64:
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with context.Pool(workers) as pool:
            results = list(tqdm(pool.imap(_render, jobs, chunksize=16), **progress))
    else:
        results = [_render(job) for job in tqdm(jobs, **progress)]
    images, masks, coords, props = (np.stack(column) for column in zip(*results))
    return images, masks, {"obj_coords": coords, "obj_props": props}


class Clevr6(ArrayDataset):
    """The built-in CLEVR6 split (see the module docstring)."""

    def __init__(self, split: str = "train", num_images: int = 10_000, seed: int = 0, resolution: int = 64,
                 min_objects: int = 3, max_objects: int = 6, workers: int = 0, cache: bool = True):
        settings = {"version": RENDERER_VERSION, "split": split, "num_images": num_images, "seed": seed,
                    "resolution": resolution, "min_objects": min_objects, "max_objects": max_objects}
        images, masks, extras = cached_generation("clevr6", settings, lambda: make_clevr6(
            num_images, seed, split, resolution, min_objects, max_objects, workers), cache)
        info = {"name": "clevr6", "split": split, "property_names": list(PROPERTY_NAMES),
                "property_values": property_values("clevr"), "render": json.dumps(
                    {"version": RENDERER_VERSION, "size": render_size(resolution), "crop": CROP_FRACTION})}
        super().__init__(images, masks, extras=extras, info=info)
