"""Datasets by name: ``build_dataset(config.data, split)``.

Every dataset is an :class:`~slotlab.data.base.ArrayDataset` (uint8 arrays, optionally memory-mapped) and yields
``{"image": float [3,H,W] in [-1,1], "mask": int64 [H,W]}`` items; see :mod:`slotlab.data.base`.
New datasets register a factory ``(DataConfig, split) -> ArrayDataset`` in :data:`DATASETS`.
"""

from __future__ import annotations

from slotlab.config import DataConfig
from slotlab.data.base import ArrayDataset, images_to_uint8, to_model_batch
from slotlab.data.clevrtex import CLEVRTex
from slotlab.data.folder import ImageFolder, parse_colour
from slotlab.data.sprites import Sprites
from slotlab.data.tetrominoes import Tetrominoes
from slotlab.errors import UserError
from slotlab.registry import Registry

DATASETS: Registry[ArrayDataset] = Registry("dataset")
SPLITS = ("train", "val", "test")


@DATASETS.register("sprites")
def _sprites(cfg: DataConfig, split: str) -> ArrayDataset:
    num_images = cfg.num_train if split == "train" else cfg.num_val
    return Sprites(split, num_images, cfg.resolution, cfg.min_objects, cfg.max_objects, cfg.seed, cfg.background)


@DATASETS.register("tetrominoes")
def _tetrominoes(cfg: DataConfig, split: str) -> ArrayDataset:
    num_images = cfg.num_train if split == "train" else cfg.num_val
    return Tetrominoes(split, num_images, cfg.seed, cfg.resolution)


@DATASETS.register("clevrtex")
def _clevrtex(cfg: DataConfig, split: str) -> ArrayDataset:
    """Real CLEVRTex or rendered scenes (``slotlab data render``) under ``cfg.root``; see slotlab.data.clevrtex."""
    return CLEVRTex(cfg.root, cfg.variant, split, cfg.max_objects, cfg.resolution, cfg.crop, cfg.cache,
                    cfg.skip_bad)


@DATASETS.register("folder")
def _folder(cfg: DataConfig, split: str) -> ArrayDataset:
    """``cfg.root/images`` and ``cfg.root/masks`` (ids or colour masks); see slotlab.data.folder."""
    return ImageFolder(cfg.root, split, cfg.max_objects, cfg.resolution, cfg.crop, parse_colour(cfg.mask_background),
                       cfg.cache, cfg.skip_bad)


def build_dataset(cfg: DataConfig, split: str) -> ArrayDataset:
    """The ``split`` of the dataset named by ``cfg.name``."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    return DATASETS.build(cfg.name, cfg, split)




__all__ = ["ArrayDataset", "CLEVRTex", "DATASETS", "ImageFolder", "Sprites", "build_dataset", "images_to_uint8",
           "to_model_batch"]
