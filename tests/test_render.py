"""The 3D scene renderer: ray-object intersections, scene rules, the CLEVRTex layout, determinism and resuming."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from slotlab.cli import main
from slotlab.data import scenes3d
from slotlab.data.render import parse_size, render_dataset, scene_paths
from slotlab.data.scenes3d import SceneObject, intersect, make_scene, surface_normal

SIZE = "48x64"  # tiny images keep every test fast


def all_files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


# ---------------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("shape, x, top", [
    ("sphere", 0.0, 1.0), ("cube", 0.0, 1 / math.sqrt(2)), ("cylinder", 0.0, 1.0),
    ("cone", 0.1, 0.8),  # the side, 0.1 r from the axis: radius 0.5 (r - z) there gives z = 0.8 r
    ("torus", 0.7, 0.3),  # the top of the tube (the torus has a hole in the middle)
])
def test_vertical_ray_hits_the_top_of_each_shape(shape, x, top):
    """A ray straight down from z = 5 meets each shape at its top (object frame, size radius r)."""
    obj = SceneObject(shape, "large", 0.0, 0.0, 0.0)
    r = obj.r
    o = np.array([[x * r, 3 * r], [0.0, 0.0], [5.0, 5.0]])  # second ray passes beside the object
    d = np.array([[0.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    t = intersect(obj, o, d)
    assert t[0] == pytest.approx(5.0 - top * r, abs=1e-3)
    assert t[1] == np.inf


@pytest.mark.parametrize("shape", ["sphere", "cube", "cylinder", "cone", "torus"])
def test_horizontal_rays_and_normals(shape):
    """A ray along -x hits the side of the shape; the normal there points back at the ray, out of the object."""
    obj = SceneObject(shape, "medium", 0.0, 0.0, 0.0)
    o = np.array([[10.0], [0.0], [0.0]])
    d = np.array([[-1.0], [0.0], [0.0]])
    t = intersect(obj, o, d)
    assert np.isfinite(t[0]) and 10.0 - t[0] <= obj.r + 1e-6  # within the footprint disc of radius r
    normal = surface_normal(obj, o + t * d)
    assert normal[0, 0] > 0.4 and np.linalg.norm(normal[:, 0]) == pytest.approx(1.0)


def test_rotated_cube_silhouette_changes():
    """A cube turned 45 degrees reaches out to its half-diagonal along x."""
    edge = SceneObject("cube", "large", 0.0, 0.0, 0.0)
    o = np.array([[10.0], [0.0], [0.0]])
    d = np.array([[-1.0], [0.0], [0.0]])
    straight = intersect(edge, o, d)[0]
    frame = SceneObject("cube", "large", 0.0, 0.0, 45.0).frame
    turned = intersect(edge, frame.T @ o, frame.T @ d)[0]
    half = edge.r / math.sqrt(2)
    assert 10 - straight == pytest.approx(half, abs=1e-6)
    assert 10 - turned == pytest.approx(half * math.sqrt(2), abs=1e-6)


# ---------------------------------------------------------------------------------------------------- scenes
def test_scene_rules():
    """3-10 objects, footprints apart, every object visible with its own mask id, ids match the json order."""
    for index in range(4):
        image, ids, record = make_scene(seed=3, index=index, variant="tex", height=48, width=64,
                                        shapes=("cube", "cylinder", "sphere"))
        objects = record["objects"]
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8 and ids.shape == (48, 64)
        assert 3 <= len(objects) <= 10
        assert set(np.unique(ids)) - {0} == set(range(1, len(objects) + 1))
        for m, obj in enumerate(objects):
            assert obj["mask_id"] == m + 1 and obj["visible_pixels"] == np.count_nonzero(ids == m + 1)
            assert obj["shape"] in ("cube", "cylinder", "sphere") and obj["material"] in ("rubber", "metal")
        radius = {"large": 0.7, "medium": 0.5, "small": 0.35}
        for a in range(len(objects)):
            for b in range(a):
                pa, pb = objects[a]["3d_coords"], objects[b]["3d_coords"]
                gap = math.dist(pa[:2], pb[:2]) - radius[objects[a]["size"]] - radius[objects[b]["size"]]
                assert gap >= 0.1 - 1e-6  # no interpenetration


def test_variants_share_layouts_and_differ_in_appearance():
    clevr_image, clevr_ids, clevr_record = make_scene(0, 5, "clevr", 48, 64, ("cube", "cylinder", "sphere"))
    tex_image, tex_ids, tex_record = make_scene(0, 5, "tex", 48, 64, ("cube", "cylinder", "sphere"))
    np.testing.assert_array_equal(clevr_ids, tex_ids)
    assert [o["3d_coords"] for o in clevr_record["objects"]] == [o["3d_coords"] for o in tex_record["objects"]]
    assert not np.array_equal(clevr_image, tex_image)
    assert clevr_record["ground_material"] == "plain" and tex_record["ground_material"] != "plain"


def test_culling_changes_no_pixel(monkeypatch):
    """Screen-rectangle and bounding-sphere culling give exactly the picture of testing every ray on every object."""
    culled = [make_scene(2, i, "tex", 48, 64, ("cube", "cone", "torus")) for i in range(3)]

    def every_pixel(camera, centre, radius):
        return 0, camera.height, 0, camera.width

    def every_floor_ray(scene, dirs, depth, ids):
        rows, cols = np.nonzero((ids == 0) & np.isfinite(depth))
        points = scene.camera.position[:, None] + depth[rows, cols] * dirs[:, rows, cols]
        points[2] = 2e-3
        shadow = np.zeros(depth.shape, dtype=bool)
        shadow[rows, cols] = every_object_ray(scene, points)
        return shadow

    def every_object_ray(scene, points):
        return np.any([scenes3d._shadowed_by(obj, points, scene.light) for obj in scene.objects], axis=0)

    monkeypatch.setattr(scenes3d.Camera, "screen_rect", every_pixel)
    monkeypatch.setattr(scenes3d, "floor_shadows", every_floor_ray)
    monkeypatch.setattr(scenes3d, "object_shadows", every_object_ray)
    for (image, ids, _), index in zip(culled, range(3)):
        plain_image, plain_ids, _ = make_scene(2, index, "tex", 48, 64, ("cube", "cone", "torus"))
        np.testing.assert_array_equal(plain_ids, ids)
        np.testing.assert_array_equal(plain_image, image)


# ---------------------------------------------------------------------------------------------------- files
def test_layout_json_and_same_bytes_for_any_number_of_workers(tmp_path):
    one = render_dataset("tex", 5, tmp_path / "a", seed=7, workers=1, size=SIZE)
    two = render_dataset("tex", 5, tmp_path / "b", seed=7, workers=2, size=SIZE)
    assert one["rendered"] == two["rendered"] == 5
    files_a, files_b = all_files(tmp_path / "a"), all_files(tmp_path / "b")
    assert files_a == files_b  # byte-identical, whatever the number of processes
    image, mask, meta = scene_paths(tmp_path / "a" / "clevrtex_tex", "tex", 3)
    assert image.name == "CLEVRTEX_tex_000003.png" and image.parent.name == "0"
    assert Image.open(image).mode == "RGB" and Image.open(image).size == (64, 48)
    ids = np.asarray(Image.open(mask))
    assert Image.open(mask).mode == "L"
    record = json.loads(meta.read_text())
    assert record["image_index"] == 3 and "ground_material" in record
    for key in ("shape", "material", "size", "rotation", "color", "3d_coords", "pixel_coords"):
        assert all(key in obj for obj in record["objects"])
    assert ids.max() == len(record["objects"])
    other = render_dataset("tex", 5, tmp_path / "c", seed=8, workers=1, size=SIZE)
    assert other["rendered"] == 5 and all_files(tmp_path / "c") != files_a  # another seed, other scenes


def test_resume_renders_only_missing_or_broken_scenes(tmp_path):
    render_dataset("clevr", 4, tmp_path, seed=1, workers=1, size=SIZE)
    before = all_files(tmp_path)
    folder = tmp_path / "clevrtex_clevr"
    scene_paths(folder, "clevr", 1)[1].unlink()  # a missing mask
    image = scene_paths(folder, "clevr", 2)[0]
    image.write_bytes(image.read_bytes()[:100])  # a truncated image
    summary = render_dataset("clevr", 6, tmp_path, seed=1, workers=1, size=SIZE)
    assert summary["rendered"] == 4 and summary["kept"] == 2  # scenes 1 and 2 again, plus the new 4 and 5
    after = all_files(tmp_path)
    assert all(after[name] == data for name, data in before.items())


def test_held_out_shapes(tmp_path):
    render_dataset("tex", 3, tmp_path, seed=0, workers=1, size=SIZE, shapes="cone,torus")
    for i in range(3):
        record = json.loads(scene_paths(tmp_path / "clevrtex_tex", "tex", i)[2].read_text())
        assert {o["shape"] for o in record["objects"]} <= {"cone", "torus"}


@pytest.mark.parametrize("args, fragment", [
    (["--size", "48x"], "--size '48x'"),
    (["--size", "8x8"], "between 16 and 4096"),
    (["--shapes", "cube,pyramid"], "unknown shape 'pyramid'"),
    (["--n", "0"], "--n 0"),
    (["--seed", "-1"], "--seed -1"),
])
def test_bad_render_arguments(capsys, tmp_path, args, fragment):
    base = {"--n": "2", "--size": SIZE}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = ["data", "render", "--variant", "tex", "--out", str(tmp_path / "out")]
    for key, value in base.items():
        argv += [key, value]
    assert main(argv) == 2
    assert fragment in error_line(capsys)
    assert not (tmp_path / "out" / "clevrtex_tex" / "0").exists()


def test_refuses_to_mix_settings_in_one_folder(capsys, tmp_path):
    render_dataset("clevr", 2, tmp_path, seed=0, workers=1, size=SIZE)
    before = all_files(tmp_path)
    capsys.readouterr()
    assert main(["data", "render", "--variant", "clevr", "--n", "3", "--out", str(tmp_path), "--seed", "1",
                 "--size", SIZE]) == 2
    line = error_line(capsys)
    assert "seed=0" in line and str(tmp_path / "clevrtex_clevr") in line
    assert all_files(tmp_path) == before  # nothing written


def test_parse_size():
    assert parse_size("240x320") == (240, 320)
    assert parse_size("64X48") == (64, 48)
