"""A folder of images and masks: ``root/images/<stem>.<ext>`` and ``root/masks/<stem>.<ext>``.

This is the layout of the course's sub-sampled CLEVRTex (320x240 RGBA images, colour-coded masks). Images may be
RGB or RGBA (or anything PIL reads; alpha is dropped). A mask is either

* single-channel (L, P, I): pixel values are object ids, 0 = background, or
* colour-coded (RGB or RGBA): every distinct colour is one object, ids 1, 2, ... in order of colour value; the
  background is the colour given (``background``) or else the most frequent colour on the image border.

Splits: ``root/<split>/images`` (and ``masks``) when such folders exist, else the CLEVRTex fractions of the sorted
file names (test [0, 0.1), val [0.1, 0.2), train [0.2, 1)). Without a ``masks/`` folder the dataset has no masks.
Images get the CLEVRTex centre crop and resize (:func:`slotlab.data.clevrtex.center_crop_resize`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slotlab.data.base import ArrayDataset
from slotlab.data.cache import SKIP_HINT, ArraySpec, Decoded, Source, load_split
from slotlab.data.clevrtex import (
    CROP_FRACTION,
    LOADER_VERSION,
    SPLITS,
    BadFile,
    check_common,
    count_objects,
    image_rgb,
    mask_ids,
    open_image,
    resize_ids,
)
from slotlab.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
SINGLE_CHANNEL_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L")


def parse_colour(text: str) -> tuple[int, int, int] | None:
    """``"R,G,B"`` (0-255) -> a tuple; empty -> None (find the background on the border)."""
    if not str(text).strip():
        return None
    try:
        colour = tuple(int(part) for part in str(text).replace(" ", "").split(","))
    except ValueError:
        colour = ()
    if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
        raise UserError(f"data.mask_background={text!r}: expected R,G,B with values 0-255, e.g. 0,0,0")
    return colour  # type: ignore[return-value]


def _natural_key(name: str) -> list:
    """Sort ``img2`` before ``img10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def colour_mask_ids(rgb: np.ndarray, background: tuple[int, int, int] | None, path: Path) -> np.ndarray:
    """Colour-coded mask ``[H, W, 3]`` -> uint8 ids ``[H, W]`` (0 = background, then by colour value)."""
    packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]  # [H, W]
    flat = packed.ravel()
    # Every colour begins at least one run of equal pixels: sorting the run starts (a few per row) instead of all
    # pixels finds the same colours several times faster.
    run_starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
    colours = np.unique(flat[run_starts])
    ids = np.searchsorted(colours, packed)  # [H, W] rank of each pixel's colour
    if background is None:
        border = np.concatenate([packed[0], packed[-1], packed[:, 0], packed[:, -1]])
        values, counts = np.unique(border, return_counts=True)
        background_value = values[np.argmax(counts)]  # ties: the smallest colour value
    else:
        background_value = (background[0] << 16) | (background[1] << 8) | background[2]
    position = np.searchsorted(colours, background_value)
    has_background = position < len(colours) and colours[position] == background_value
    num_objects = len(colours) - int(has_background)
    if num_objects > 255:
        raise BadFile(f"{path}: {num_objects} colours: more than 255 objects (ids must fit in 8 bits)")
    if has_background:  # background -> 0, the colours after it keep their rank, those before it shift up by one
        ids = np.where(ids == position, 0, np.where(ids < position, ids + 1, ids))
    else:
        ids = ids + 1
    return ids.astype(np.uint8)


@dataclass(frozen=True)
class FolderDecoder:
    """Decodes one image (and mask) of an image folder (picklable, for worker processes)."""

    resolution: int
    crop: float
    background: tuple[int, int, int] | None

    def __call__(self, source: Source) -> Decoded:
        try:
            return self.decode(source)
        except BadFile as exc:
            return Decoded(error=str(exc))

    def decode(self, source: Source) -> Decoded:
        image = open_image(source.image)
        item = Decoded(image=image_rgb(image, self.crop, self.resolution))
        if source.mask is None:
            return item
        mask = open_image(source.mask)
        if image.size != mask.size:
            raise BadFile(f"{source.image}: image is {image.width}x{image.height} but its mask {source.mask} is "
                          f"{mask.width}x{mask.height}")
        if mask.mode in SINGLE_CHANNEL_MODES:
            ids = mask_ids(mask, source.mask)
        else:
            ids = colour_mask_ids(np.asarray(mask.convert("RGB")), self.background, source.mask)
        item.mask = resize_ids(ids, self.crop, self.resolution)
        item.num_objects = count_objects(ids)
        return item


def _list_images(folder: Path, kind: str, bad) -> dict[str, Path]:
    """``{stem: path}`` of the image files in ``folder`` (hidden and non-image files are ignored)."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir(), key=lambda p: _natural_key(p.name)):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in files:
            bad(f"{path}: duplicated {kind} name {path.stem!r} (also {files[path.stem].name})")
            continue
        files[path.stem] = path
    return files


def scan_folder(images_dir: Path, masks_dir: Path | None, skip_bad: bool) -> tuple[list[Source], list[str]]:
    """Pair images with masks by file stem; returns the sources (natural order) and the bad files left out."""
    problems: list[str] = []

    def bad(message: str) -> None:
        if not skip_bad:
            raise UserError(f"{message} ({SKIP_HINT})")
        problems.append(message)

    images = _list_images(images_dir, "image", bad)
    masks = _list_images(masks_dir, "mask", bad) if masks_dir is not None else None
    sources = []
    for stem, path in images.items():
        if masks is not None and stem not in masks:
            bad(f"{path}: missing mask {masks_dir / stem}.png (masks are matched by file name)")
            continue
        sources.append(Source(len(sources), path, masks[stem] if masks is not None else None))
    if not sources:
        detail = f": all {len(problems)} are bad, e.g. {problems[0]}" if problems else ""
        raise UserError(f"no images in {images_dir}{detail}")
    return sources, problems


class ImageFolder(ArrayDataset):
    """A split of an image folder as uint8 arrays; see the module docstring.

    Args:
        root: the folder holding ``images/`` and ``masks/`` (or ``<split>/images`` and ``<split>/masks``).
        split: train, val or test.
        max_objects: keep images with at most this many objects in the mask (None or 0 = all).
        resolution: side of the square images after the crop.
        crop: side of the centre crop as a fraction of ``min(H, W)`` (CLEVRTex: 0.8; 1 = largest square).
        background: colour of the background in colour-coded masks (None = most frequent on the border).
        cache: memory-map the decoded split from a cache on disk, building it on first use.
        skip_bad: skip (and list in ``info["skipped_files"]``) bad files instead of raising :class:`UserError`.
        workers: decoding processes (0 = all cores).
    """

    def __init__(self, root: str | Path, split: str = "train", max_objects: int | None = None, resolution: int = 128,
                 crop: float = CROP_FRACTION, background: tuple[int, int, int] | None = None, cache: bool = False,
                 skip_bad: bool = False, workers: int = 0):
        max_objects = check_common(split, resolution, crop, max_objects)
        root = Path(root)
        if not str(root) or not root.is_dir():
            raise UserError(f"data.root {str(root)!r} is not a folder (expected images/ and masks/ inside)")
        if (root / split / "images").is_dir():
            base, by_folder = root / split, True
        elif (root / "images").is_dir():
            base, by_folder = root, False
        else:
            raise UserError(f"{root} has no images/ folder (nor {split}/images/)")
        masks_dir = base / "masks" if (base / "masks").is_dir() else None
        if masks_dir is None and max_objects:
            raise UserError(f"data.max_objects={max_objects} counts objects in masks, but {base} has no masks/ folder")
        sources, problems = scan_folder(base / "images", masks_dir, skip_bad)
        image_of = {source.index: source.image for source in sources}
        if not by_folder:
            start, stop = SPLITS[split]
            sources = sources[int(start * len(sources)) : int(stop * len(sources))]
        specs = {"images": ArraySpec((resolution, resolution, 3), "uint8")}
        if masks_dir is not None:
            specs["masks"] = ArraySpec((resolution, resolution), "uint8")
        prepared = load_split(
            sources, FolderDecoder(resolution, crop, background), specs,
            key=f"folder-{split}-{resolution}px-crop{crop:g}-max{max_objects}", data_root=root,
            settings={"loader": "folder", "version": LOADER_VERSION, "resolution": resolution, "crop": crop,
                      "background": background},
            cache=cache, max_objects=max_objects, skip_bad=skip_bad, workers=workers, desc=f"folder {split}")
        start, stop = SPLITS[split]
        split_by = (f"the {split}/ folder" if by_folder else
                    f"file order: {split} is files {start:.0%}-{stop:.0%} of {len(image_of)} sorted by name")
        info = {"name": "folder", "root": str(root), "split": split, "split_by": split_by,
                "resolution": resolution, "crop": crop, "max_objects": max_objects,
                "skipped_files": problems + prepared.skipped, "source_index": prepared.source_index,
                "image_files": [str(image_of[int(i)]) for i in prepared.source_index],
                "cache_dir": prepared.cache_dir}
        super().__init__(prepared.arrays["images"], prepared.arrays.get("masks"), info=info)
