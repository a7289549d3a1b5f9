"""The standard benchmark scenes drawn on the fly: Tetrominoes, Multi-dSprites, CLEVR6 (issue 16)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cli_helpers import assert_one_error_line, run
from slotlab.config import DATASET_NAMES, apply_overrides, get_preset
from slotlab.data import DATASETS, build_dataset
from slotlab.data.tetrominoes import COLOUR_RGB, TETROMINOES
from slotlab.errors import UserError


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("SLOTLAB_CACHE_DIR", str(tmp_path / "cache"))


def _data(name: str, **fields) -> object:
    settings = {"tetrominoes": ["data.resolution=35", "model.decoder_grid=35", "data.min_objects=3",
                                "data.max_objects=3"],
                "multi_dsprites": ["data.resolution=64", "data.min_objects=2", "data.max_objects=5"],
                "clevr6": ["data.resolution=32", "data.min_objects=3", "data.max_objects=6"]}[name]
    extra = [f"data.{k}={v}" for k, v in fields.items()]
    return apply_overrides(get_preset("smoke"), [f"data.name={name}", *settings, *extra]).data


@pytest.mark.parametrize("name, side, low, high", [("tetrominoes", 35, 3, 3), ("multi_dsprites", 64, 2, 5),
                                                    ("clevr6", 32, 1, 6)])
def test_shapes_counts_and_determinism(name, side, low, high):
    data = _data(name, num_val=24, num_train=8)
    val = build_dataset(data, "val")
    assert val.images.shape == (24, side, side, 3) and val.images.dtype == np.uint8
    assert val.masks.shape == (24, side, side)
    counts = [len(np.unique(mask)) - (1 if (mask == 0).any() else 0) for mask in val.masks]
    assert low <= min(counts) and max(counts) <= high, counts
    again = build_dataset(data, "val")
    assert np.array_equal(again.images, val.images) and np.array_equal(again.masks, val.masks)
    other_seed = build_dataset(replace(data, seed=1), "val")
    assert not np.array_equal(other_seed.images, val.images)
    train = build_dataset(data, "train")
    assert not any(np.array_equal(train.images[0], image) for image in val.images)  # disjoint streams


def test_tetromino_masks_match_the_pixels_drawn_and_never_overlap():
    val = build_dataset(_data("tetrominoes", num_val=64), "val")
    block_area = {np.kron(grid, np.ones((5, 5))).sum() for grid in TETROMINOES.values()}
    assert block_area == {100}  # four 5x5 blocks each
    for image, mask, props in zip(val.images, val.masks, val.extras["obj_props"]):
        assert ((mask == 0) == (image.sum(-1) == 0)).all()  # black exactly where no piece is
        for object_id in (1, 2, 3):
            pixels = image[mask == object_id]
            assert len(pixels) == 100  # a whole piece: pieces never overlap (nor hide one another)
            assert (pixels == COLOUR_RGB[props[object_id - 1, 1]]).all()


def test_multi_dsprites_objects_stay_visible_and_own_colours():
    val = build_dataset(_data("multi_dsprites", num_val=32), "val")
    for image, mask in zip(val.images, val.masks):
        background = image[mask == 0]
        assert (background == background[0]).all() and background[0][0] == background[0][1] == background[0][2]
        for object_id in np.unique(mask)[1:]:
            pixels = image[mask == object_id]
            assert len(pixels) >= 8 and (pixels == pixels[0]).all()  # a flat colour, visible


def test_unknown_dataset_name_lists_the_known_ones(capsys):
    code, _, err = run(capsys, "config", "--preset", "smoke", "--set", "data.name=tetris")
    assert code == 2
    assert_one_error_line(err, "data.name='tetris'", *DATASET_NAMES)
    assert set(DATASET_NAMES) == set(DATASETS.names())


def test_object_counts_outside_a_dataset_range_are_refused():
    with pytest.raises(UserError, match="between 1 and 6 objects"):
        build_dataset(_data("tetrominoes", max_objects=7), "val")
