"""CLEVRTex, read exactly as the official evaluator (``clevrtex_eval.py``) reads it; also reads rendered scenes.

Layout: ``root/clevrtex_<variant>/<bucket>/CLEVRTEX_<variant>_NNNNNN.png`` (RGB or RGBA), ``..._NNNNNN_flat.png``
(single-channel object ids, 0 = background) and optionally ``..._NNNNNN.json`` (``objects`` with ``shape``, ``size``,
``material``, ``color``, ``3d_coords``, ...). ``root`` may also be the ``clevrtex_<variant>`` folder itself.

As the official loader: index numbers must run 0..N-1 without gaps or duplicates; the split is a fraction of the
index range (test [0, 0.1), val [0.1, 0.2), train [0.2, 1); variant ``outd`` has no split, every split is all of
it); each image is centre-cropped to a square of side ``int(0.8 * min(H, W))`` (192 for 240x320) and resized to
``resolution`` with PIL (bilinear for images, nearest for masks), keeping RGB only. ``max_objects`` keeps images
whose uncropped mask holds at most that many objects (6 gives CLEVRTex6).

Variants: the real ``full``, ``pbg``, ``vbg``, ``grassbg``, ``camo``, ``outd``, and the rendered ``clevr`` and ``tex``
(``slotlab data render``). With the json files, each image also gets the object extras of set prediction
(:func:`slotlab.data.properties.encode_objects`).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from slotlab.data.base import ArrayDataset
from slotlab.data.cache import SKIP_HINT, ArraySpec, Decoded, Source, load_split
from slotlab.data.properties import (
    CLEVRTEX_VARIANTS,
    MAX_OBJECTS,
    PROPERTY_NAMES,
    RENDERED_VARIANTS,
    encode_objects,
    property_values,
)
from slotlab.errors import UserError

SPLITS = {"test": (0.0, 0.1), "val": (0.1, 0.2), "train": (0.2, 1.0)}
VARIANTS = CLEVRTEX_VARIANTS + RENDERED_VARIANTS
CROP_FRACTION = 0.8
LOADER_VERSION = 2  # part of the cache key: bump when decoding changes


class BadFile(Exception):
    """A file that cannot be used; the message starts with its path."""


# ---------------------------------------------------------------------------------------------------- files
def dataset_folder(root: Path, variant: str) -> Path:
    """``root`` itself if it is ``clevrtex_<variant>``, else ``root/clevrtex_<variant>`` if present, else ``root``."""
    root = Path(root)
    sub = f"clevrtex_{variant.lower()}"
    if root.name != sub and (root / sub).is_dir():
        return root / sub
    return root


def scan_clevrtex(folder: Path, variant: str, skip_bad: bool = False) -> tuple[list[Source], list[str]]:
    """All images of a CLEVRTex-layout folder, sorted by index, and the bad files left out (with ``skip_bad``).

    Raises:
        UserError: no images; or (without ``skip_bad``) a missing mask or json, a duplicated index, a gap in the
            index numbers, or a file name without a 6-digit index. The message names the file.
    """
    prefix = f"CLEVRTEX_{variant}_"
    pattern = re.compile(rf"^{re.escape(prefix)}(\d{{6}})\.png$")
    problems: list[str] = []

    def bad(message: str) -> None:
        if not skip_bad:
            raise UserError(f"{message} ({SKIP_HINT})")
        problems.append(message)

    found: dict[int, Source] = {}
    rejected: set[int] = set()  # indices whose files are bad (listed once, not again as gaps)
    for path in sorted(folder.glob(f"**/{prefix}??????.png")):
        match = pattern.match(path.name)
        if match is None:
            bad(f"{path}: the name does not end in a 6-digit index number")
            continue
        index = int(match.group(1))
        mask = path.with_name(f"{prefix}{match.group(1)}_flat.png")
        meta = path.with_suffix(".json")
        if not mask.is_file():
            bad(f"{path}: missing mask {mask.name}")
            rejected.add(index)
        elif index in found:
            bad(f"{path}: duplicated index {index} (also {found[index].image})")
        else:
            found[index] = Source(index, path, mask, meta if meta.is_file() else None)
    # The json files are optional, but all or none: object extras for only some images would be silently wrong.
    if any(source.meta is not None for source in found.values()):
        for index, source in sorted(found.items()):
            if source.meta is None:
                json_name = source.image.with_suffix(".json").name
                bad(f"{source.image}: missing metadata {json_name} (other images have one)")
                del found[index]
                rejected.add(index)
    if not found and problems:
        raise UserError(f"no usable {prefix}NNNNNN.png images under {folder}: all {len(problems)} are bad, "
                        f"e.g. {problems[0]}")
    if not found:
        out = folder.parent if folder.name == f"clevrtex_{variant}" else folder
        hint = (f"render some with: slotlab data render --variant {variant} --n 1000 --out {out}"
                if variant in RENDERED_VARIANTS else "download CLEVRTex from https://www.robots.ox.ac.uk/~vgg/data/clevrtex/")
        where = "" if folder.is_dir() else " (the folder does not exist)"
        raise UserError(f"no {prefix}NNNNNN.png images under {folder}{where}; {hint}")
    last = max(max(found), max(rejected, default=0))
    missing = [i for i in range(last) if i not in found and i not in rejected]
    if missing:
        example = f"{prefix}{missing[0]:06d}.png"
        if not skip_bad:
            raise UserError(f"missing {example} under {folder}: index numbers must run from 0 to {last} without "
                            f"gaps ({len(missing)} missing; {SKIP_HINT})")
        problems += [f"{folder / f'{prefix}{i:06d}.png'}: missing index number" for i in missing]
    return [found[i] for i in sorted(found)], problems


def split_sources(sources: list[Source], split: str, variant: str) -> list[Source]:
    """The split's share of the index range (the official fractions); ``outd`` has no split."""
    if variant == "outd":
        return list(sources)
    start, stop = SPLITS[split]
    return sources[int(start * len(sources)) : int(stop * len(sources))]


# ---------------------------------------------------------------------------------------------------- decoding
def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image file; :class:`BadFile` for missing, truncated or non-image files."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).split("\n")[0] or type(exc).__name__
        raise BadFile(f"{path}: not a readable image ({reason})") from None


def center_crop_resize(image: Image.Image, fraction: float, resolution: int, resample: int) -> Image.Image:
    """The official transform: centre square of side ``int(fraction * min(W, H))``, resized to ``resolution``."""
    side = int(fraction * float(min(image.width, image.height)))
    image = image.crop(((image.width - side) // 2, (image.height - side) // 2,
                        (image.width + side) // 2, (image.height + side) // 2))
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), resample=resample)
    return image


def image_rgb(image: Image.Image, fraction: float, resolution: int) -> np.ndarray:
    """uint8 ``[R, R, 3]``: RGB(A) images are resized in their own mode, then the alpha channel is dropped."""
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    return np.asarray(center_crop_resize(image, fraction, resolution, Image.BILINEAR))[..., :3]


def mask_ids(image: Image.Image, path: Path) -> np.ndarray:
    """A single-channel id mask (L, P, 1, I;16 or I) as uint8 ``[H, W]``; :class:`BadFile` otherwise."""
    if image.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
        raise BadFile(f"{path}: mask mode {image.mode} is not a single-channel id image")
    ids = np.asarray(image)
    if ids.size and ids.max() > 255:
        raise BadFile(f"{path}: mask id {int(ids.max())}: more than 255 objects (ids must fit in 8 bits)")
    return ids.astype(np.uint8)


def resize_ids(ids: np.ndarray, fraction: float, resolution: int) -> np.ndarray:
    """Crop and resize an id mask with nearest-neighbour sampling, ``[R, R]`` uint8."""
    return np.asarray(center_crop_resize(Image.fromarray(ids), fraction, resolution, Image.NEAREST))


def count_objects(ids: np.ndarray) -> int:
    """Distinct non-zero ids in a mask."""
    return int(np.count_nonzero(np.bincount(ids.ravel(), minlength=256)[1:]))


@dataclass(frozen=True)
class CLEVRTexDecoder:
    """Decodes one CLEVRTex-layout image (picklable, for worker processes)."""

    resolution: int
    crop: float
    property_values: dict[str, list[str]] | None  # None: no json files, no object extras

    def __call__(self, source: Source) -> Decoded:
        try:
            return self.decode(source)
        except BadFile as exc:
            return Decoded(error=str(exc))

    def decode(self, source: Source) -> Decoded:
        image = open_image(source.image)
        mask_image = open_image(source.mask)
        if image.size != mask_image.size:
            raise BadFile(f"{source.image}: image is {image.width}x{image.height} but its mask {source.mask.name} "
                          f"is {mask_image.width}x{mask_image.height}")
        ids = mask_ids(mask_image, source.mask)
        item = Decoded(image=image_rgb(image, self.crop, self.resolution),
                       mask=resize_ids(ids, self.crop, self.resolution), num_objects=count_objects(ids))
        if self.property_values is not None:
            item.extras, item.notes = self.object_extras(source.meta, int(ids.max()) if ids.size else 0)
        return item

    def object_extras(self, path: Path, max_id: int) -> tuple[dict[str, np.ndarray], list[str]]:
        """The set-prediction extras of one json, and a note per object value left unknown."""
        try:
            objects = json.loads(path.read_text())["objects"]
            if not isinstance(objects, list):
                raise TypeError("'objects' is not a list")
            coords, props, unknown = encode_objects(objects, self.property_values, MAX_OBJECTS)
        except (OSError, UnicodeDecodeError) as exc:
            raise BadFile(f"{path}: cannot read ({exc})") from None
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise BadFile(f"{path}: not a scene json ({type(exc).__name__}: {exc})") from None
        except ValueError as exc:
            raise BadFile(f"{path}: {exc}") from None
        if max_id > len(objects):
            raise BadFile(f"{path}: the mask has object id {max_id} but the json lists {len(objects)} objects")
        return {"obj_coords": coords, "obj_props": props}, [f"{path}: {note}" for note in unknown]


# ---------------------------------------------------------------------------------------------------- dataset
def object_specs(resolution: int, with_objects: bool) -> dict[str, ArraySpec]:
    specs = {"images": ArraySpec((resolution, resolution, 3), "uint8"),
             "masks": ArraySpec((resolution, resolution), "uint8")}
    if with_objects:
        specs["obj_coords"] = ArraySpec((MAX_OBJECTS, 3), "float32")
        specs["obj_props"] = ArraySpec((MAX_OBJECTS, len(PROPERTY_NAMES)), "int64")
    return specs


def check_common(split: str, resolution: int, crop: float, max_objects: int | None) -> int:
    """Validate the arguments every on-disk loader shares; returns ``max_objects`` as an int (0 = no limit)."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    if not 1 <= resolution <= 4096:
        raise UserError(f"data.resolution={resolution}: must be between 1 and 4096")
    if not 0 < crop <= 1:
        raise UserError(f"data.crop={crop}: the centre crop is a fraction of min(H, W) in (0, 1]")
    if max_objects is not None and max_objects < 0:
        raise UserError(f"data.max_objects={max_objects}: must be >= 0 (0 = keep every image)")
    return int(max_objects or 0)


class CLEVRTex(ArrayDataset):
    """A split of CLEVRTex (or of rendered scenes) as uint8 arrays; see the module docstring.

    Args:
        root: the folder holding ``clevrtex_<variant>/`` (or that folder itself).
        variant: full, pbg, vbg, grassbg, camo, outd (real) or clevr, tex (rendered).
        split: train, val or test (ignored for outd).
        max_objects: keep images with at most this many objects in the mask (None or 0 = all).
        resolution: side of the square images after the crop.
        crop: side of the centre crop as a fraction of ``min(H, W)`` (official: 0.8).
        cache: memory-map the decoded split from a cache on disk, building it on first use.
        skip_bad: skip (and list in ``info["skipped_files"]``) bad files instead of raising :class:`UserError`.
        workers: decoding processes (0 = all cores).

    Example:
        >>> train = CLEVRTex("data/clevrtex", variant="tex", split="train", max_objects=6)  # doctest: +SKIP
        >>> train.images.shape, train.extras["obj_props"].shape  # doctest: +SKIP
        ((..., 128, 128, 3), (..., 10, 4))
    """

    def __init__(self, root: str | Path, variant: str = "full", split: str = "train", max_objects: int | None = None,
                 resolution: int = 128, crop: float = CROP_FRACTION, cache: bool = False, skip_bad: bool = False,
                 workers: int = 0):
        if variant not in VARIANTS:
            raise UserError(f"unknown CLEVRTex variant {variant!r} (known: {', '.join(VARIANTS)})")
        max_objects = check_common(split, resolution, crop, max_objects)
        if not str(root):
            raise UserError("data.root is empty: set it to the folder holding clevrtex_<variant>/")
        folder = dataset_folder(Path(root), variant)
        sources, problems = scan_clevrtex(folder, variant, skip_bad)
        chosen = split_sources(sources, split, variant)
        with_objects = bool(chosen) and chosen[0].meta is not None
        values = property_values(variant) if with_objects else None
        prepared = load_split(
            chosen, CLEVRTexDecoder(resolution, crop, values), object_specs(resolution, with_objects),
            key=f"clevrtex-{variant}-{split}-{resolution}px-crop{crop:g}-max{max_objects}", data_root=folder,
            settings={"loader": "clevrtex", "version": LOADER_VERSION, "resolution": resolution, "crop": crop},
            cache=cache, max_objects=max_objects, skip_bad=skip_bad, workers=workers,
            desc=f"clevrtex {variant} {split}")
        info = {"name": "clevrtex", "variant": variant, "split": split if variant != "outd" else "all",
                "root": str(folder), "resolution": resolution, "crop": crop, "max_objects": max_objects,
                "num_indexed": len(sources), "skipped_files": problems + prepared.skipped,
                "source_index": prepared.source_index, "cache_dir": prepared.cache_dir,
                "unknown_values": prepared.notes}
        if prepared.notes:  # once per split: discovery goes on, set prediction refuses (it needs the values)
            print(f"warning: clevrtex {variant} {split}: {len(prepared.notes)} object value(s) outside the known "
                  f"vocabulary are kept as unknown (-1), e.g. {prepared.notes[0]}", file=sys.stderr)
        if with_objects:
            info["property_names"] = list(PROPERTY_NAMES)
            info["property_values"] = values
        arrays = prepared.arrays
        extras = {name: arrays[name] for name in ("obj_coords", "obj_props") if name in arrays}
        super().__init__(arrays["images"], arrays["masks"], extras=extras, info=info)
