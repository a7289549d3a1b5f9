"""Procedural multi-object 2D scenes ("sprites") with ground-truth masks.

Each image holds ``min_objects``..``max_objects`` shapes (ellipse, square, triangle, heart, diamond), with random
colours, sizes, rotations and positions, painted back to front so later shapes occlude earlier ones, on a plain or
noisy background. Every object keeps at least ``MIN_VISIBLE_FRACTION`` of its own area visible, so each id in the
mask is a real, visible object. Image ``i`` of a split depends only on ``(seed, split, i)``: the same seed gives the
same bytes, in any order and in any number of processes.
"""

from __future__ import annotations

import colorsys

import numpy as np

from slotlab.data.base import ArrayDataset
from slotlab.data.cache import cached_generation

SHAPES = ("ellipse", "square", "triangle", "heart", "diamond")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
HUES = (0.0, 0.08, 0.16, 0.33, 0.5, 0.62, 0.75, 0.9)
SIZES = ("small", "large")
PROPERTY_NAMES = ("shape", "colour", "size")
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
GENERATOR_VERSION = 1  # part of the cache key: bump when the pictures change
MIN_VISIBLE_FRACTION = 0.3


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in the shape's own frame, where the shape spans roughly [-1, 1]^2."""
    if shape == "ellipse":
        return u**2 + (v / 0.75) ** 2 <= 1.0
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":
        return (v <= 0.5) & (v >= -1.0 + 1.73 * np.abs(u))
    if shape == "heart":
        x, y = u * 1.2, -v * 1.2 + 0.25  # heart curve (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, point up
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    raise ValueError(shape)


def _colour_rgb(rng: np.random.Generator, colour: int) -> np.ndarray:
    """A named hue with jittered saturation and value, so 'colour' is a categorical property."""
    hue = (HUES[colour] + rng.uniform(-0.02, 0.02)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    return np.array(rgb) * 255


def render_sprite_scene(rng: np.random.Generator, size: int, min_objects: int, max_objects: int,
                        background: str = "noise") -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One scene: uint8 image ``[size,size,3]``, uint8 ids ``[size,size]`` (0 = background) and the objects.

    Object ``m`` of the returned list has id ``m + 1`` in the mask.
    """
    grid = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    base = rng.uniform(0, 60, size=3)
    if background == "noise":
        image = base + rng.normal(0, 8, size=(size, size, 3))
    elif background == "plain":
        image = np.broadcast_to(base, (size, size, 3)).copy()
    else:
        raise ValueError(f"unknown sprites background {background!r}")
    ids = np.zeros((size, size), dtype=np.uint8)
    num_objects = int(rng.integers(min_objects, max_objects + 1))
    placed = 0
    objects: list[dict] = []
    for _attempt in range(num_objects * 20):
        if placed == num_objects:
            break
        shape = SHAPES[rng.integers(len(SHAPES))]
        large = bool(rng.uniform() < 0.5)
        radius = rng.uniform(0.15, 0.2) if large else rng.uniform(0.09, 0.13)
        cx, cy = rng.uniform(radius, 1 - radius, size=2)
        angle = rng.uniform(0, 2 * np.pi) if shape in ("square", "triangle", "diamond") else rng.uniform(-0.3, 0.3)
        du, dv = (xs - cx) / radius, (ys - cy) / radius
        u = np.cos(angle) * du + np.sin(angle) * dv
        v = -np.sin(angle) * du + np.cos(angle) * dv
        inside = _shape_mask(shape, u, v)
        area = inside.sum()
        if area < 6:
            continue
        # The new shape must not hide too much of the shapes already placed.
        new_ids = np.where(inside, placed + 1, ids)
        visible = np.bincount(new_ids.ravel(), minlength=placed + 2)[1 : placed + 1]
        before = np.bincount(ids.ravel(), minlength=placed + 1)[1 : placed + 1]
        if np.any(visible < np.maximum(MIN_VISIBLE_FRACTION * before, 4)):
            continue
        ids = new_ids.astype(np.uint8)
        shade = 1.0 - 0.15 * np.clip(u * 0.5 + v * 0.5, -1, 1)  # a soft gradient so objects are not flat
        colour = int(rng.integers(len(COLOURS)))
        image[inside] = (_colour_rgb(rng, colour)[None, :] * shade[inside, None]).clip(0, 255)
        objects.append({"shape": SHAPES.index(shape), "colour": colour, "size": int(large), "x": cx, "y": cy})
        placed += 1
    return image.clip(0, 255).round().astype(np.uint8), ids, objects


def make_sprites(num_images: int, size: int, min_objects: int, max_objects: int, seed: int, split: str,
                 background: str = "noise") -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Render a whole split: uint8 images ``[N,size,size,3]``, ids ``[N,size,size]`` and object extras.

    Extras (row ``m`` is the object with mask id ``m + 1``; padded rows have properties -1):
    ``obj_coords`` float32 ``[N, M, 3]`` (x, y in [0, 1], 0) and ``obj_props`` int64 ``[N, M, 3]``
    (shape, colour, size indices into :data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`).
    """
    images = np.empty((num_images, size, size, 3), dtype=np.uint8)
    masks = np.empty((num_images, size, size), dtype=np.uint8)
    coords = np.zeros((num_images, max_objects, 3), dtype=np.float32)
    props = np.full((num_images, max_objects, len(PROPERTY_NAMES)), -1, dtype=np.int64)
    stream = SPLIT_STREAMS[split]
    for i in range(num_images):
        rng = np.random.default_rng([seed, stream, i])
        images[i], masks[i], objects = render_sprite_scene(rng, size, min_objects, max_objects, background)
        for m, obj in enumerate(objects):
            coords[i, m, :2] = obj["x"], obj["y"]
            props[i, m] = [obj[name] for name in PROPERTY_NAMES]
    return images, masks, {"obj_coords": coords, "obj_props": props}


class Sprites(ArrayDataset):
    """The built-in 2D sprites dataset (see module docstring)."""

    def __init__(self, split: str = "train", num_images: int = 10_000, resolution: int = 64, min_objects: int = 2,
                 max_objects: int = 6, seed: int = 0, background: str = "noise", cache: bool = False):
        settings = {"version": GENERATOR_VERSION, "split": split, "num_images": num_images, "resolution": resolution,
                    "min_objects": min_objects, "max_objects": max_objects, "seed": seed, "background": background}
        images, masks, extras = cached_generation("sprites", settings, lambda: make_sprites(
            num_images, resolution, min_objects, max_objects, seed, split, background), cache)
        info = {"name": "sprites", "split": split, "property_names": list(PROPERTY_NAMES),
                "property_values": {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES)}}
        super().__init__(images, masks, extras=extras, info=info)
