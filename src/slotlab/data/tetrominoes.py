"""Tetrominoes (after DeepMind's multi-object datasets): three Tetris pieces on black, drawn on the fly.

Each 35x35 image holds three tetrominoes made of 5x5-pixel blocks, each piece one of the fixed
shape/orientation variants in :data:`TETROMINOES` and one of six pure colours, placed at random pixel positions
without overlapping. The Slot Attention paper trains on it with K=4 (three objects and the background). Image ``i``
of a split depends only on ``(seed, split, i)``. Differences from the published set are listed in docs/data.md.
"""

from __future__ import annotations

import numpy as np

from slotlab.data.base import ArrayDataset
from slotlab.data.cache import cached_generation

BLOCK = 5  # pixels per block side
RESOLUTION = 35  # the published image size
NUM_OBJECTS = 3  # pieces per image in the published set
MAX_PIECES = 6  # most pieces slotlab places in one image (a curriculum may ask for fewer or more than 3)
MIN_RESOLUTION = 24  # the longest piece is 4 blocks = 20 pixels
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
COLOUR_RGB = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)],
                      dtype=np.uint8)
PROPERTY_NAMES = ("shape", "colour")
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
GENERATOR_VERSION = 1  # part of the cache key: bump when the pictures change

_PIECES = {  # the seven one-sided tetrominoes, one orientation each, as (row, column) blocks
    "I": ((0, 0), (0, 1), (0, 2), (0, 3)),
    "O": ((0, 0), (0, 1), (1, 0), (1, 1)),
    "T": ((0, 0), (0, 1), (0, 2), (1, 1)),
    "S": ((0, 1), (0, 2), (1, 0), (1, 1)),
    "Z": ((0, 0), (0, 1), (1, 1), (1, 2)),
    "L": ((0, 0), (1, 0), (2, 0), (2, 1)),
    "J": ((0, 1), (1, 1), (2, 1), (2, 0)),
}


def _orientations(blocks: tuple[tuple[int, int], ...]) -> list[np.ndarray]:
    """The distinct 90-degree rotations of a piece, each a 0/1 block grid."""
    grid = np.zeros((4, 4), dtype=bool)
    for r, c in blocks:
        grid[r, c] = True
    seen, out = set(), []
    for turn in range(4):
        rotated = np.rot90(grid, turn)
        rows, cols = np.nonzero(rotated)
        cropped = rotated[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        key = (cropped.shape, cropped.tobytes())
        if key not in seen:
            seen.add(key)
            out.append(cropped)
    return out


# name -> block grid for every fixed tetromino: I 2, O 1, T 4, S 2, Z 2, L 4, J 4 = 19 shape/orientation variants.
TETROMINOES: dict[str, np.ndarray] = {
    f"{name}{turn}": grid for name, blocks in _PIECES.items() for turn, grid in enumerate(_orientations(blocks))
}
SHAPES = tuple(TETROMINOES)
_PIXEL_MASKS = [np.kron(grid, np.ones((BLOCK, BLOCK), dtype=bool)) for grid in TETROMINOES.values()]


def render_tetromino_scene(rng: np.random.Generator, size: int = RESOLUTION,
                           num_objects: int = NUM_OBJECTS) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One scene: uint8 image ``[size, size, 3]``, uint8 ids ``[size, size]`` (0 = background) and the objects.

    Pieces are placed one by one at uniform pixel positions; a position that overlaps an earlier piece is drawn again
    (and the whole scene, in the rare case that a piece finds no room).
    """
    while True:
        scene = _try_scene(rng, size, num_objects)
        if scene is not None:
            return scene


def _try_scene(rng: np.random.Generator, size: int, num_objects: int):
    image = np.zeros((size, size, 3), dtype=np.uint8)
    ids = np.zeros((size, size), dtype=np.uint8)
    objects: list[dict] = []
    for _attempt in range(200 * num_objects):
        if len(objects) == num_objects:
            return image, ids, objects
        shape = int(rng.integers(len(SHAPES)))
        piece = _PIXEL_MASKS[shape]
        height, width = piece.shape
        top, left = int(rng.integers(size - height + 1)), int(rng.integers(size - width + 1))
        window = ids[top : top + height, left : left + width]
        if np.any(window[piece]):
            continue
        colour = int(rng.integers(len(COLOURS)))
        window[piece] = len(objects) + 1
        image[top : top + height, left : left + width][piece] = COLOUR_RGB[colour]
        centre_x, centre_y = (left + width / 2) / size, (top + height / 2) / size
        objects.append({"shape": shape, "colour": colour, "x": centre_x, "y": centre_y})
    return (image, ids, objects) if len(objects) == num_objects else None


def make_tetrominoes(num_images: int, seed: int, split: str, size: int = RESOLUTION, min_objects: int = NUM_OBJECTS,
                     max_objects: int = NUM_OBJECTS) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A whole split: images ``[N, size, size, 3]``, ids ``[N, size, size]`` and the object extras
    ``obj_coords`` float32 ``[N, M, 3]`` (x, y in [0, 1], 0) and ``obj_props`` int64 ``[N, M, 2]`` (shape, colour;
    padding rows -1), ``M = max_objects``. Each image holds ``min_objects..max_objects`` pieces (3 as published)."""
    images = np.empty((num_images, size, size, 3), dtype=np.uint8)
    masks = np.empty((num_images, size, size), dtype=np.uint8)
    coords = np.zeros((num_images, max_objects, 3), dtype=np.float32)
    props = np.full((num_images, max_objects, len(PROPERTY_NAMES)), -1, dtype=np.int64)
    stream = SPLIT_STREAMS[split]
    for i in range(num_images):
        rng = np.random.default_rng([seed, stream, i])
        count = int(rng.integers(min_objects, max_objects + 1)) if min_objects < max_objects else max_objects
        images[i], masks[i], objects = render_tetromino_scene(rng, size, count)
        for m, obj in enumerate(objects):
            coords[i, m, :2] = obj["x"], obj["y"]
            props[i, m] = [obj[name] for name in PROPERTY_NAMES]
    return images, masks, {"obj_coords": coords, "obj_props": props}


class Tetrominoes(ArrayDataset):
    """The built-in Tetrominoes split (see the module docstring)."""

    def __init__(self, split: str = "train", num_images: int = 10_000, seed: int = 0, resolution: int = RESOLUTION,
                 min_objects: int = NUM_OBJECTS, max_objects: int = NUM_OBJECTS, cache: bool = False):
        settings = {"version": GENERATOR_VERSION, "split": split, "num_images": num_images, "seed": seed,
                    "resolution": resolution, "min_objects": min_objects, "max_objects": max_objects}
        images, masks, extras = cached_generation("tetrominoes", settings, lambda: make_tetrominoes(
            num_images, seed, split, resolution, min_objects, max_objects), cache)
        info = {"name": "tetrominoes", "split": split, "property_names": list(PROPERTY_NAMES),
                "property_values": {"shape": list(SHAPES), "colour": list(COLOURS)}}
        super().__init__(images, masks, extras=extras, info=info)
