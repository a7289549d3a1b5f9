"""On-disk loaders: the CLEVRTex layout (real and rendered), colour-mask image folders, the cache and bad files."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import slotlab.data.cache as cache_module
from slotlab.cli import main
from slotlab.config import apply_overrides, get_preset
from slotlab.data import CLEVRTex, ImageFolder, build_dataset
from slotlab.data.clevrtex import center_crop_resize
from slotlab.data.properties import CLEVRTEX_MATERIALS, CLEVRTEX_SHAPES
from slotlab.data.render import render_dataset
from slotlab.errors import UserError

H, W = 40, 50  # crop side int(0.8 * 40) = 32, box (9, 4, 41, 36)
BOX = (9, 4, 41, 36)
NUM_IMAGES = 20  # splits: test 2, val 2, train 16
SHAPES = ["cube", "cylinder", "monkey", "sphere"]


def object_rects(index: int) -> list[tuple[int, int, int, int]]:
    """Rows/cols of the objects of image ``index``: 1-4 inside the crop; image 5 has one more outside it."""
    rects = [(6 + 7 * m, 12 + 7 * m, 12 + 6 * m, 20 + 6 * m) for m in range(1 + index % 4)]
    if index == 5:
        rects.append((0, 3, 0, 5))  # top-left corner: cropped away, still counted for max_objects
    return rects


def write_scene(folder, variant: str, index: int, bucket: str, rng) -> None:
    folder = folder / bucket
    folder.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, size=(H, W, 4), dtype=np.uint8)
    image[..., 3] = 255
    ids = np.zeros((H, W), dtype=np.uint8)
    objects = []
    for m, (r0, r1, c0, c1) in enumerate(object_rects(index)):
        ids[r0:r1, c0:c1] = m + 1
        objects.append({"shape": SHAPES[(index + m) % 4], "size": "medium",
                        "material": CLEVRTEX_MATERIALS[m].lower() if m % 2 else CLEVRTEX_MATERIALS[m],
                        "color": "red", "rotation": 10.0, "3d_coords": [m - 1.5, 0.5 * m, 0.6],
                        "pixel_coords": [c0, r0, 9.0]})
    stem = f"CLEVRTEX_{variant}_{index:06d}"
    Image.fromarray(image).save(folder / f"{stem}.png")  # RGBA, as real CLEVRTex
    Image.fromarray(ids).convert("P").save(folder / f"{stem}_flat.png")  # palette ids, as real CLEVRTex
    (folder / f"{stem}.json").write_text(json.dumps({"ground_material": "PoliigonTiles05", "objects": objects}))


@pytest.fixture
def clevrtex_root(tmp_path):
    """A tiny real-CLEVRTex-like folder: variant full, two buckets, RGBA images, palette masks, json."""
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        write_scene(tmp_path / "clevrtex_full", "full", i, str(i // 10), rng)
    return tmp_path


def stem_path(root, index: int, suffix: str = ".png"):
    return root / "clevrtex_full" / str(index // 10) / f"CLEVRTEX_full_{index:06d}{suffix}"


def cache_cli(root, *extra: str) -> list[str]:
    return ["data", "cache", "--preset", "smoke", "--set", "data.name=clevrtex", "--set", f"data.root={root}",
            "--set", "data.variant=full", "--set", "data.max_objects=0", "--set", "data.resolution=16",
            *extra, "--splits", "train", "val", "test"]


def one_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "Traceback" not in lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------- CLEVRTex
def test_official_crop_of_240x320_is_192_square():
    columns = np.tile(np.arange(320, dtype=np.uint16) // 2, (240, 1)).astype(np.uint8)  # value = column // 2
    rows = np.tile((np.arange(240, dtype=np.uint8))[:, None], (1, 320))
    cropped_cols = np.asarray(center_crop_resize(Image.fromarray(columns), 0.8, 192, Image.NEAREST))
    cropped_rows = np.asarray(center_crop_resize(Image.fromarray(rows), 0.8, 192, Image.NEAREST))
    assert cropped_cols.shape == (192, 192)
    assert cropped_cols[0, 0] == 64 // 2 and cropped_cols[0, -1] == 255 // 2  # columns 64 .. 255
    assert cropped_rows[0, 0] == 24 and cropped_rows[-1, 0] == 215  # rows 24 .. 215


def test_clevrtex_layout_splits_crop_resize_and_objects(clevrtex_root):
    sizes = {}
    for split in ("train", "val", "test"):
        dataset = CLEVRTex(clevrtex_root, "full", split, resolution=16)
        sizes[split] = len(dataset)
        assert dataset.images.shape[1:] == (16, 16, 3) and dataset.masks.shape[1:] == (16, 16)
    assert sizes == {"train": 16, "val": 2, "test": 2}

    train = CLEVRTex(clevrtex_root / "clevrtex_full", "full", "train", resolution=16)  # the variant folder itself
    np.testing.assert_array_equal(train.info["source_index"], np.arange(4, 20))
    # Row 0 is image 4: the official transform (crop, bilinear / nearest resize, alpha dropped).
    rgba = Image.open(stem_path(clevrtex_root, 4))
    expected = np.asarray(rgba.crop(BOX).resize((16, 16), Image.BILINEAR))[..., :3]
    np.testing.assert_array_equal(train.images[0], expected)
    flat = Image.open(stem_path(clevrtex_root, 4, "_flat.png"))
    np.testing.assert_array_equal(train.masks[0], np.asarray(flat.crop(BOX).resize((16, 16), Image.NEAREST)))

    # Object extras, row m = mask id m + 1: coordinates (c + 3) / 6, property indices, -1 padding.
    assert train.extras["obj_coords"].shape == (16, 10, 3) and train.extras["obj_props"].shape == (16, 10, 4)
    assert train.info["property_names"] == ["shape", "size", "material", "color"]
    values = train.info["property_values"]
    row = 1  # image 5: two objects in the crop, one outside it
    xyz = np.array([[-1.5, 0.0, 0.6], [-0.5, 0.5, 0.6], [0.5, 1.0, 0.6]])  # as written by write_scene
    np.testing.assert_allclose(train.extras["obj_coords"][row, :3], (xyz + 3) / 6, atol=1e-6)
    props = train.extras["obj_props"][row]
    assert [values["shape"][i] for i in props[:3, 0]] == [SHAPES[(5 + m) % 4] for m in range(3)]
    assert [values["material"][i] for i in props[:3, 2]] == list(CLEVRTEX_MATERIALS[:3])  # case-insensitive
    assert values["size"][props[0, 1]] == "medium" and values["color"][props[0, 3]] == "red"
    assert (props[3:] == -1).all() and (train.extras["obj_coords"][row, 3:] == 0).all()
    assert set(values["shape"]) == set(CLEVRTEX_SHAPES)


def test_max_objects_counts_the_uncropped_mask(clevrtex_root):
    train = CLEVRTex(clevrtex_root, "full", "train", max_objects=2, resolution=16)
    # kept: 1 + i % 4 <= 2 objects, except image 5 whose third object lies outside the crop
    np.testing.assert_array_equal(train.info["source_index"], [4, 8, 9, 12, 13, 16, 17])


def test_outd_has_no_split(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(5):
        write_scene(tmp_path / "clevrtex_outd", "outd", i, "0", rng)
    for split in ("train", "val", "test"):
        assert len(CLEVRTex(tmp_path, "outd", split, resolution=8)) == 5


def test_rendered_scenes_train_with_the_clevrtex_preset(tmp_path):
    render_dataset("tex", 10, tmp_path, seed=0, workers=1, size="48x64")
    preset = get_preset("clevrtex").data
    assert (preset.name, preset.variant, preset.max_objects) == ("clevrtex", "tex", 0)
    train = build_dataset(replace(preset, root=str(tmp_path), resolution=32), "train")
    assert len(train) == 8 and train.images.shape[1:] == (32, 32, 3)
    assert isinstance(train.images, np.memmap)  # the preset caches: memory-mapped from disk
    record = json.loads((tmp_path / "clevrtex_tex" / "0" / "CLEVRTEX_tex_000002.json").read_text())
    values = train.info["property_values"]
    for m, obj in enumerate(record["objects"]):
        names = [values[p][i] for p, i in zip(train.info["property_names"], train.extras["obj_props"][0, m])]
        assert names == [obj["shape"], obj["size"], obj["material"], obj["color"]]
        np.testing.assert_allclose(train.extras["obj_coords"][0, m], (np.array(obj["3d_coords"]) + 3) / 6,
                                   atol=1e-6)


# ---------------------------------------------------------------------------------------------------- folders
def colour_folder(root, background=(0, 0, 0)):
    """images/ (RGBA) and masks/ (RGB colour-coded): red, green and blue rectangles on ``background``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(2)
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    for i in range(10):
        image = rng.integers(0, 256, size=(H, W, 4), dtype=np.uint8)
        mask = np.zeros((H, W, 3), dtype=np.uint8)
        mask[:] = background
        mask[8:16, 12:20] = colours["red"]
        mask[18:26, 22:30] = colours["green"]
        mask[28:34, 30:40] = colours["blue"]
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"img{i}.png")


def expected_ids(red: int, green: int, blue: int, background: int = 0) -> np.ndarray:
    ids = np.full((H, W), background, dtype=np.uint8)
    ids[8:16, 12:20], ids[18:26, 22:30], ids[28:34, 30:40] = red, green, blue
    return ids[4:36, 9:41]  # the 32x32 centre crop


def test_colour_masks_decode_to_ids(tmp_path):
    colour_folder(tmp_path / "a")
    train = ImageFolder(tmp_path / "a", "train", resolution=32)  # 32 = the crop side: no resampling
    assert len(train) == 8 and train.info["image_files"][0].endswith("img2.png")  # natural order, train [0.2, 1)
    # Background black (most frequent on the border); objects by colour value: blue < green < red.
    np.testing.assert_array_equal(train.masks[0], expected_ids(red=3, green=2, blue=1))
    rgba = Image.open(tmp_path / "a" / "images" / "img2.png")
    np.testing.assert_array_equal(train.images[0], np.asarray(rgba.crop(BOX))[..., :3])

    colour_folder(tmp_path / "b", background=(255, 255, 255))
    white = ImageFolder(tmp_path / "b", "val", resolution=32)
    np.testing.assert_array_equal(white.masks[0], expected_ids(red=3, green=2, blue=1))

    given = ImageFolder(tmp_path / "a", "val", resolution=32, background=(0, 0, 255))  # blue declared background
    np.testing.assert_array_equal(given.masks[0], expected_ids(red=3, green=2, blue=0, background=1))


def test_split_folders_and_single_channel_masks(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir()
        for i in range(count):
            ids = np.zeros((H, W), dtype=np.uint8)
            ids[10:20, 10:20], ids[20:30, 25:35] = 4, 9
            Image.fromarray(np.full((H, W, 3), 80 + i, dtype=np.uint8)).save(tmp_path / split / "images" / f"{i}.jpg")
            Image.fromarray(ids).save(tmp_path / split / "masks" / f"{i}.png")
    train = ImageFolder(tmp_path, "train", resolution=32, max_objects=2)
    val = ImageFolder(tmp_path, "val", resolution=32)
    assert (len(train), len(val), train.info["split_by"]) == (3, 2, "the train/ folder")
    assert set(np.unique(val.masks[0])) == {0, 4, 9}  # ids kept as stored
    assert len(ImageFolder(tmp_path, "train", resolution=32, max_objects=1)) == 0


def test_folder_without_masks(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(10):
        Image.fromarray(np.full((H, W, 3), i, dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image: ignored")
    train = ImageFolder(tmp_path, "train", resolution=8)
    assert len(train) == 8 and train.masks is None


# ---------------------------------------------------------------------------------------------------- cache
def test_cache_matches_decoding_and_follows_file_changes(clevrtex_root, monkeypatch):
    plain = CLEVRTex(clevrtex_root, "full", "train", resolution=16)
    cached = CLEVRTex(clevrtex_root, "full", "train", resolution=16, cache=True)
    again = CLEVRTex(clevrtex_root, "full", "train", resolution=16, cache=True)
    assert isinstance(again.images, np.memmap) and again.info["cache_dir"] == cached.info["cache_dir"]
    for name in ("images", "masks"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(again, name))
    for name in ("obj_coords", "obj_props"):
        np.testing.assert_array_equal(plain.extras[name], again.extras[name])
    np.testing.assert_array_equal(again.info["source_index"], plain.info["source_index"])

    # Decoding in worker processes gives the same arrays.
    monkeypatch.setattr(cache_module, "PARALLEL_MIN_ITEMS", 1)
    parallel = CLEVRTex(clevrtex_root, "full", "train", resolution=16, workers=2)
    np.testing.assert_array_equal(parallel.images, plain.images)

    # A changed source file gets a new cache; the stale one is removed.
    image = Image.open(stem_path(clevrtex_root, 4))
    Image.fromarray(255 - np.asarray(image)).save(stem_path(clevrtex_root, 4))
    changed = CLEVRTex(clevrtex_root, "full", "train", resolution=16, cache=True)
    assert changed.info["cache_dir"] != cached.info["cache_dir"]
    assert not (clevrtex_root / cached.info["cache_dir"]).exists()
    assert not np.array_equal(changed.images[0], plain.images[0])

    # The cache is never inside the data folder.
    changed_dir = Path(changed.info["cache_dir"])
    assert changed_dir.is_dir() and not changed_dir.resolve().is_relative_to(clevrtex_root.resolve())

    # A damaged cache (derived data) is rebuilt.
    del changed, again
    images_bin = changed_dir / "images.bin"
    with open(images_bin, "r+b") as handle:
        handle.truncate(100)
    rebuilt = CLEVRTex(clevrtex_root, "full", "train", resolution=16, cache=True)
    assert len(rebuilt) == 16 and images_bin.stat().st_size == 16 * 16 * 16 * 3


def test_cache_command(capsys, clevrtex_root):
    assert main(cache_cli(clevrtex_root)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("train: 16 images 16x16 in ") and lines[1].startswith("val: 2 images")



def test_procedural_splits_are_drawn_once_and_then_read_from_the_cache(capsys, tmp_path, monkeypatch):
    import slotlab.data.sprites as sprites

    monkeypatch.setenv("SLOTLAB_CACHE_DIR", str(tmp_path))
    assert main(["data", "cache", "--preset", "smoke"]) == 0
    assert capsys.readouterr().out.startswith(f"train: 16 images 16x16 in {tmp_path / 'procedural'}")
    drawn = build_dataset(get_preset("smoke").data, "train")
    monkeypatch.setattr(sprites, "make_sprites", lambda *a, **k: pytest.fail("drawn again instead of read"))
    again = build_dataset(get_preset("smoke").data, "train")
    assert np.array_equal(again.images, drawn.images) and np.array_equal(again.masks, drawn.masks)
    for name in drawn.extras:
        assert np.array_equal(again.extras[name], drawn.extras[name])
    other = apply_overrides(get_preset("smoke"), ["data.seed=3"]).data  # other settings: another file
    monkeypatch.undo()
    assert not np.array_equal(build_dataset(other, "train").images, drawn.images)


# ---------------------------------------------------------------------------------------------------- bad input
def _missing_mask(root):
    stem_path(root, 3, "_flat.png").unlink()
    return "CLEVRTEX_full_000003.png: missing mask CLEVRTEX_full_000003_flat.png"


def _duplicated(root):
    for suffix in (".png", "_flat.png", ".json"):
        shutil.copy(stem_path(root, 12, suffix), root / "clevrtex_full" / "0" / stem_path(root, 12, suffix).name)
    return "duplicated index 12"


def _missing_index(root):
    for suffix in (".png", "_flat.png", ".json"):
        stem_path(root, 7, suffix).unlink()
    return "missing CLEVRTEX_full_000007.png"


def _truncated(root):
    path = stem_path(root, 15)
    path.write_bytes(path.read_bytes()[:200])
    return "CLEVRTEX_full_000015.png: not a readable image"


def _not_an_image(root):
    stem_path(root, 9).write_text("hello")
    return "CLEVRTEX_full_000009.png: not a readable image"


def _size_mismatch(root):
    Image.fromarray(np.zeros((H, W + 2), dtype=np.uint8)).save(stem_path(root, 11, "_flat.png"))
    return "CLEVRTEX_full_000011.png: image is 50x40 but its mask CLEVRTEX_full_000011_flat.png is 52x40"


def _too_many_objects(root):
    ids = np.zeros((H, W), dtype=np.uint16)
    ids[5, 5] = 300
    Image.fromarray(ids).save(stem_path(root, 2, "_flat.png"))  # a 16-bit mask
    return "CLEVRTEX_full_000002_flat.png: mask id 300: more than 255 objects"


def _bad_json(root):
    path = stem_path(root, 18, ".json")
    record = json.loads(path.read_text())
    record["objects"][0] = "a cube"
    path.write_text(json.dumps(record))
    return "CLEVRTEX_full_000018.json: object 0 is not a mapping"


@pytest.mark.parametrize("damage", [_missing_mask, _duplicated, _missing_index, _truncated, _not_an_image,
                                    _size_mismatch, _too_many_objects, _bad_json])
def test_bad_files_are_named_or_skipped(capsys, clevrtex_root, damage):
    fragment = damage(clevrtex_root)
    assert main(cache_cli(clevrtex_root)) == 2
    line = one_error(capsys)
    assert fragment in line and "--skip-bad" in line
    assert main(cache_cli(clevrtex_root, "--skip-bad")) == 0
    assert "bad files skipped" in capsys.readouterr().out
    # A cache built while skipping must not be read silently without skip_bad.
    assert main(cache_cli(clevrtex_root)) == 2
    assert fragment.split(":")[0] in one_error(capsys)


def test_empty_and_missing_folders(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(cache_cli(tmp_path / "empty")) == 2
    line = one_error(capsys)
    assert "no CLEVRTEX_full_NNNNNN.png images under" in line and "empty" in line
    with pytest.raises(UserError, match="no images in"):
        (tmp_path / "folder" / "images").mkdir(parents=True)
        ImageFolder(tmp_path / "folder", "train")
    with pytest.raises(UserError, match="render some with: slotlab data render --variant tex"):
        CLEVRTex(tmp_path / "nowhere", "tex", "train")


def test_folder_bad_masks(tmp_path):
    colour_folder(tmp_path)
    (tmp_path / "masks" / "img4.png").unlink()
    with pytest.raises(UserError, match=r"img4.png: missing mask"):
        ImageFolder(tmp_path, "train", resolution=16)
    skipped = ImageFolder(tmp_path, "train", resolution=16, skip_bad=True)
    assert len(skipped.info["skipped_files"]) == 1 and "img4.png" in skipped.info["skipped_files"][0]
    rainbow = np.arange(H * W * 3, dtype=np.uint32).reshape(H, W, 3) % 256  # ~2000 distinct colours
    rainbow[..., 0] = np.arange(H * W).reshape(H, W) % 256
    rainbow[..., 1] = np.arange(H * W).reshape(H, W) // 256
    Image.fromarray(rainbow.astype(np.uint8)).save(tmp_path / "masks" / "img4.png")
    with pytest.raises(UserError, match=r"img4.png: \d+ colours: more than 255 objects"):
        ImageFolder(tmp_path, "train", resolution=16)


def test_training_lists_skipped_files(tmp_path):
    render_dataset("clevr", 10, tmp_path / "data", seed=0, workers=1, size="48x64")
    broken = tmp_path / "data" / "clevrtex_clevr" / "0" / "CLEVRTEX_clevr_000006.png"
    broken.write_bytes(b"not a png")
    from slotlab.train.loop import Trainer

    config = apply_overrides(get_preset("smoke"), [
        "data.name=clevrtex", f"data.root={tmp_path / 'data'}", "data.variant=clevr", "data.max_objects=0",
        "data.skip_bad=true"])
    Trainer(config, tmp_path / "run")  # the list is written when the datasets are built
    listed = (tmp_path / "run" / "skipped_files.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(str(broken)) and "not a readable image" in listed[0]


def test_unknown_metadata_values_are_kept_as_unknown(clevrtex_root, capsys, tmp_path):
    """A dataset made by a modified generator (a new material, a colour as RGB) still trains object discovery."""
    from slotlab.train.loop import Trainer

    for index in range(NUM_IMAGES):  # every image: with skip_bad every one of them was skipped before
        path = stem_path(clevrtex_root, index, ".json")
        record = json.loads(path.read_text())
        record["objects"][0]["material"] = "PoliigonBrandNew001"
        record["objects"][0]["color"] = [255, 0, 0]
        path.write_text(json.dumps(record))
    train = CLEVRTex(clevrtex_root, "full", "train", resolution=16)
    assert len(train) == int(0.8 * NUM_IMAGES)
    assert "unknown material 'PoliigonBrandNew001'" in capsys.readouterr().err
    props = train.extras["obj_props"]
    assert (props[:, 0, 2:] == -1).all() and (props[:, 0, :2] >= 0).all()  # object 0: material, colour unknown
    settings = ["data.name=clevrtex", f"data.root={clevrtex_root}", "data.variant=full", "data.max_objects=0",
                "data.resolution=16", "train.steps=1"]
    trainer = Trainer(apply_overrides(get_preset("smoke"), settings), tmp_path / "discovery")
    assert torch.isfinite(trainer.train_step()["loss"])
    with pytest.raises(UserError, match="set prediction needs every object's properties.*PoliigonBrandNew001"):
        Trainer(apply_overrides(get_preset("setpred-smoke"), settings), tmp_path / "setpred")


def test_a_folder_dataset_keeps_every_image_uncropped_and_says_how_it_is_split(tmp_path, capsys):
    from slotlab.train.loop import train as train_run

    colour_folder(tmp_path / "data")
    switch = ["data.name=folder", f"data.root={tmp_path / 'data'}"]
    config = apply_overrides(get_preset("smoke"), switch)
    assert (config.data.max_objects, config.data.crop) == (0, 1.0)  # not the sprites' 6 objects, not a 0.8 crop
    assert apply_overrides(get_preset("smoke"), [*switch, "data.crop=0.8"]).data.crop == 0.8  # unless asked

    before = sorted(p.name for p in (tmp_path / "data").iterdir())
    train_run(apply_overrides(config, ["train.steps=1", "data.resolution=16", "model.decoder_grid=4"]),
              tmp_path / "run")
    out = capsys.readouterr().out
    assert "8 train / 1 val images" in out
    assert "train split by file order: train is files 20%-100% of 10 sorted by name" in out
    assert "cache: " in out and str(tmp_path / "data") not in out.split("cache: ")[1].splitlines()[0]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == before  # nothing written into the data folder
