"""Datasets by name: ``build_dataset(config.data, split)``.

Every dataset is an :class:`~slotlab.data.base.ArrayDataset` (uint8 arrays, optionally memory-mapped) and yields
``{"image": float [3,H,W] in [-1,1], "mask": int64 [H,W]}`` items; see :mod:`slotlab.data.base`.
New datasets register a factory ``(DataConfig, split) -> ArrayDataset`` in :data:`DATASETS`.
"""

from __future__ import annotations

from slotlab.config import DataConfig
from slotlab.data import tetrominoes
from slotlab.data.base import ArrayDataset, images_to_uint8, to_model_batch
from slotlab.data.clevr6 import Clevr6
from slotlab.data.clevrtex import CLEVRTex
from slotlab.data.folder import ImageFolder, parse_colour
from slotlab.data.multi_dsprites import MultiDSprites
from slotlab.data.sprites import Sprites
from slotlab.data.tetrominoes import Tetrominoes
from slotlab.errors import UserError
from slotlab.registry import Registry

DATASETS: Registry[ArrayDataset] = Registry("dataset")
SPLITS = ("train", "val", "test")


@DATASETS.register("sprites")
def _sprites(cfg: DataConfig, split: str) -> ArrayDataset:
    num_images = cfg.num_train if split == "train" else cfg.num_val
    return Sprites(split, num_images, cfg.resolution, cfg.min_objects, cfg.max_objects, cfg.seed, cfg.background,
                   cfg.cache)


def _split_size(cfg: DataConfig, split: str) -> int:
    return cfg.num_train if split == "train" else cfg.num_val


def _check_object_range(cfg: DataConfig, low: int, high: int) -> None:
    if not low <= cfg.min_objects <= cfg.max_objects <= high:
        raise UserError(f"data.min_objects={cfg.min_objects}, data.max_objects={cfg.max_objects}: dataset "
                        f"{cfg.name!r} draws between {low} and {high} objects per image")


@DATASETS.register("tetrominoes")
def _tetrominoes(cfg: DataConfig, split: str) -> ArrayDataset:
    """Three Tetris pieces on black (35x35), drawn on the fly; see slotlab.data.tetrominoes."""
    if cfg.resolution < tetrominoes.MIN_RESOLUTION:
        raise UserError(f"data.resolution={cfg.resolution}: tetrominoes need at least {tetrominoes.MIN_RESOLUTION} "
                        "pixels (a piece is up to 20 pixels long); the published size is 35")
    _check_object_range(cfg, 1, tetrominoes.MAX_PIECES)
    return Tetrominoes(split, _split_size(cfg, split), cfg.seed, cfg.resolution, cfg.min_objects, cfg.max_objects,
                       cfg.cache)


@DATASETS.register("multi_dsprites")
def _multi_dsprites(cfg: DataConfig, split: str) -> ArrayDataset:
    """2-5 coloured dSprites on grayscale (64x64), drawn on the fly; see slotlab.data.multi_dsprites."""
    if cfg.resolution < 16:
        raise UserError(f"data.resolution={cfg.resolution}: multi_dsprites needs at least 16 pixels (published: 64)")
    _check_object_range(cfg, 1, 10)
    return MultiDSprites(split, _split_size(cfg, split), cfg.seed, cfg.resolution, cfg.min_objects, cfg.max_objects,
                         cfg.cache)


@DATASETS.register("clevr6")
def _clevr6(cfg: DataConfig, split: str) -> ArrayDataset:
    """CLEVR scenes with 3-6 objects, ray cast on the fly and cached; see slotlab.data.clevr6."""
    if cfg.resolution < 16:
        raise UserError(f"data.resolution={cfg.resolution}: clevr6 needs at least 16 pixels (CPU: 64, GPU: 128)")
    _check_object_range(cfg, 1, 10)
    return Clevr6(split, _split_size(cfg, split), cfg.seed, cfg.resolution, cfg.min_objects, cfg.max_objects,
                  cache=cfg.cache)


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




__all__ = ["ArrayDataset", "CLEVRTex", "Clevr6", "DATASETS", "ImageFolder", "MultiDSprites", "Sprites", "Tetrominoes",
           "build_dataset", "images_to_uint8", "to_model_batch"]
