"""Multi-dSprites, coloured sprites on grayscale (after DeepMind's multi-object datasets), drawn on the fly.

Each 64x64 image holds 2-5 dSprites shapes (square, ellipse, heart) with dSprites' discrete scales (6 values in
[0.5, 1]) and orientations (40 values in [0, 2 pi)), a uniform position, and a random colour (hue uniform, saturation
and value in [0.6, 1]), painted back to front on a uniform grey background of random brightness, so later sprites
occlude earlier ones. The Slot Attention paper trains on this "coloured sprites on grayscale" version with K=6.
Image ``i`` of a split depends only on ``(seed, split, i)``. Differences from the published set are listed in
docs/data.md.
"""

from __future__ import annotations

import colorsys

import numpy as np

from slotlab.data.base import ArrayDataset
from slotlab.data.cache import cached_generation
from slotlab.data.sprites import SPLIT_STREAMS

RESOLUTION = 64
SHAPES = ("square", "ellipse", "heart")
SCALES = tuple(np.linspace(0.5, 1.0, 6))  # dSprites' six scales
ORIENTATIONS = 40  # dSprites' orientations in [0, 2 pi)
HALF_SIZE = 0.18  # half the side of a scale-1 sprite, as a fraction of the image side
MIN_VISIBLE_FRACTION = 0.25  # a sprite keeps at least this much of its area visible (and 8 pixels)
PROPERTY_NAMES = ("shape", "scale")
GENERATOR_VERSION = 1  # part of the cache key: bump when the pictures change


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the sprite's own frame, where it spans about [-1, 1]^2."""
    if shape == "square":
        return (np.abs(u) <= 0.75) & (np.abs(v) <= 0.75)
    if shape == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.5) ** 2 <= 1.0
    if shape == "heart":
        x, y = u * 1.15, -v * 1.15 + 0.25  # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, point down
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    raise ValueError(shape)


def render_multi_dsprites_scene(rng: np.random.Generator, size: int = RESOLUTION, min_objects: int = 2,
                                max_objects: int = 5) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One scene: uint8 image ``[size, size, 3]``, uint8 ids ``[size, size]`` (0 = background) and the objects."""
    grid = (np.arange(size) + 0.5) / size
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    image = np.full((size, size, 3), rng.uniform(0, 255), dtype=np.float64)
    ids = np.zeros((size, size), dtype=np.uint8)
    target = int(rng.integers(min_objects, max_objects + 1))
    objects: list[dict] = []
    for _attempt in range(target * 30):
        if len(objects) == target:
            break
        shape = int(rng.integers(len(SHAPES)))
        scale = int(rng.integers(len(SCALES)))
        angle = 2 * np.pi * int(rng.integers(ORIENTATIONS)) / ORIENTATIONS
        half = HALF_SIZE * SCALES[scale]
        cx, cy = rng.uniform(half * 0.5, 1 - half * 0.5, size=2)
        du, dv = (xs - cx) / half, (ys - cy) / half
        inside = _inside(SHAPES[shape], np.cos(angle) * du + np.sin(angle) * dv,
                         -np.sin(angle) * du + np.cos(angle) * dv)
        if inside.sum() < 8:
            continue
        new_ids = np.where(inside, len(objects) + 1, ids)
        placed = len(objects)
        visible = np.bincount(new_ids.ravel(), minlength=placed + 2)[1 : placed + 1]
        before = np.bincount(ids.ravel(), minlength=placed + 1)[1 : placed + 1]
        if np.any(visible < np.maximum(MIN_VISIBLE_FRACTION * before, 8)):
            continue  # the new sprite would hide too much of one already placed
        ids = new_ids.astype(np.uint8)
        hue = rng.uniform()
        image[inside] = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))) * 255
        objects.append({"shape": shape, "scale": scale, "x": cx, "y": cy, "hue": hue})
    return image.round().astype(np.uint8), ids, objects


def make_multi_dsprites(num_images: int, seed: int, split: str, size: int = RESOLUTION, min_objects: int = 2,
                        max_objects: int = 5) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A whole split: images, ids and the object extras ``obj_coords`` float32 ``[N, max_objects, 3]`` (x, y, 0)
    and ``obj_props`` int64 ``[N, max_objects, 2]`` (shape, scale index; padding rows -1)."""
    images = np.empty((num_images, size, size, 3), dtype=np.uint8)
    masks = np.empty((num_images, size, size), dtype=np.uint8)
    coords = np.zeros((num_images, max_objects, 3), dtype=np.float32)
    props = np.full((num_images, max_objects, len(PROPERTY_NAMES)), -1, dtype=np.int64)
    stream = SPLIT_STREAMS[split]
    for i in range(num_images):
        rng = np.random.default_rng([seed, stream, i])
        images[i], masks[i], objects = render_multi_dsprites_scene(rng, size, min_objects, max_objects)
        for m, obj in enumerate(objects):
            coords[i, m, :2] = obj["x"], obj["y"]
            props[i, m] = [obj[name] for name in PROPERTY_NAMES]
    return images, masks, {"obj_coords": coords, "obj_props": props}


class MultiDSprites(ArrayDataset):
    """The built-in Multi-dSprites split (see the module docstring)."""

    def __init__(self, split: str = "train", num_images: int = 10_000, seed: int = 0, resolution: int = RESOLUTION,
                 min_objects: int = 2, max_objects: int = 5, cache: bool = False):
        settings = {"version": GENERATOR_VERSION, "split": split, "num_images": num_images, "seed": seed,
                    "resolution": resolution, "min_objects": min_objects, "max_objects": max_objects}
        images, masks, extras = cached_generation("multi_dsprites", settings, lambda: make_multi_dsprites(
            num_images, seed, split, resolution, min_objects, max_objects), cache)
        info = {"name": "multi_dsprites", "split": split, "property_names": list(PROPERTY_NAMES),
                "property_values": {"shape": list(SHAPES), "scale": [f"{s:.1f}" for s in SCALES]}}
        super().__init__(images, masks, extras=extras, info=info)
