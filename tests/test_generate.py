"""Slot library, compositional generation and slot mixing on a tiny trained run (smoke preset)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_one_error_line, run
from slotlab.config import apply_overrides, get_preset
from slotlab.errors import UserError
from slotlab.generate import slot_library
from slotlab.generate.compose import compose, sample_compositions
from slotlab.generate.mix import mix
from slotlab.train.loop import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """16 train / 8 val images of 16x16, K = 3 slots of 16 dims, two training steps."""
    run_dir = tmp_path_factory.mktemp("gen") / "run"
    train(apply_overrides(get_preset("smoke"), ["train.log_every=1"]), run_dir)
    return run_dir


def cells(path, rows: int, cols: int, size: int) -> list[list[np.ndarray]]:
    """Cut a picture made by report.plots.tile (pad 2, integer zoom) back into its cells."""
    picture = np.asarray(Image.open(path).convert("RGB"))
    scale = picture.shape[1] // (cols * (size + 2) + 2)
    grid = picture[::scale, ::scale]
    return [[grid[2 + i * (size + 2): 2 + i * (size + 2) + size, 2 + j * (size + 2): 2 + j * (size + 2) + size]
             for j in range(cols)] for i in range(rows)]


# ------------------------------------------------------------------------------------------------ library
def test_library_holds_every_slot_and_area(trained_run):
    folder = slot_library.build_library(trained_run, "train", batch_size=5, device="cpu")
    library = slot_library.load_library(trained_run, "train")
    assert folder.endswith("library/train")
    assert library.slots.shape == (16, 3, 16)
    assert library.areas.shape == (16, 3)
    torch.testing.assert_close(library.areas.sum(-1), torch.ones(16))  # attention shares over K sum to 1
    assert library.meta["area"] == "attn.mean(-1)" and library.meta["complete"]


def test_library_resumes_missing_chunks_only(trained_run, monkeypatch):
    monkeypatch.setattr(slot_library, "CHUNK_IMAGES", 5)  # 8 val images -> chunks of 5 and 3
    folder = slot_library.library_dir(trained_run, "val")
    slot_library.build_library(trained_run, "val", batch_size=2, device="cpu")
    complete = slot_library.load_library(trained_run, "val")
    assert len(list(folder.glob("chunk_*.safetensors"))) == 2  # 8 val images
    kept = folder / "chunk_00000.safetensors"
    kept_mtime = kept.stat().st_mtime_ns
    (folder / "chunk_00001.safetensors").unlink()  # as if stopped before the last chunk
    with pytest.raises(UserError, match="missing or damaged"):
        slot_library.load_library(trained_run, "val")
    slot_library.build_library(trained_run, "val", batch_size=2, device="cpu")
    assert kept.stat().st_mtime_ns == kept_mtime  # the finished chunk was not redone
    resumed = slot_library.load_library(trained_run, "val")
    torch.testing.assert_close(resumed.slots, complete.slots)  # each chunk is seeded: same slots as in one go


def test_library_of_another_checkpoint_is_rebuilt(trained_run):
    folder = slot_library.library_dir(trained_run, "train")
    slot_library.build_library(trained_run, "train", device="cpu")
    meta = json.loads((folder / "meta.json").read_text())
    meta["checkpoint_sha256"] = "an older checkpoint"
    (folder / "meta.json").write_text(json.dumps(meta))
    before = (folder / "chunk_00000.safetensors").stat().st_mtime_ns
    slot_library.build_library(trained_run, "train", device="cpu")
    assert (folder / "chunk_00000.safetensors").stat().st_mtime_ns != before


def test_missing_library_is_refused(tmp_path):
    with pytest.raises(UserError, match="no slot library"):
        slot_library.load_library(tmp_path, "train")


# ------------------------------------------------------------------------------------------------ compose
def test_sampling_takes_one_member_of_every_cluster():
    labels = np.array([0, 1, 1, 2, 2, 2, 0])
    picks = sample_compositions(labels, num_images=50, seed=3)
    assert picks.shape == (50, 3)
    assert (labels[picks] == np.arange(3)).all()  # column c holds members of cluster c
    assert len(np.unique(picks[:, 2])) > 1  # random members, not the first one
    assert np.array_equal(picks, sample_compositions(labels, 50, seed=3))


def test_compose_writes_scenes_deterministically(trained_run):
    metrics = compose(trained_run, num_images=6, clusters=2, seed=1, device="cpu", fid=False)
    out = trained_run / "compose"
    first = [p.read_bytes() for p in sorted((out / "images").glob("*.png"))]
    assert len(first) == 6
    assert len(list((out / "reference").glob("*.png"))) == 6 and len(list((out / "recon").glob("*.png"))) == 6
    assert (out / "gallery.png").is_file()
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["num_images"] == 6 and metrics["clusters"] == 2
    assert sum(metrics["cluster_sizes"]) == metrics["library_slots"] == 16 * 3

    compose(trained_run, num_images=6, clusters=2, seed=1, device="cpu", fid=False)
    assert [p.read_bytes() for p in sorted((out / "images").glob("*.png"))] == first
    compose(trained_run, num_images=4, clusters=2, seed=2, device="cpu", fid=False)
    again = [p.read_bytes() for p in sorted((out / "images").glob("*.png"))]
    assert len(again) == 4 and again != first[:4]  # stale files removed; another seed, other scenes


def test_compose_with_a_background_slot_draws_a_background_then_one_object_slot_per_cluster(tmp_path, monkeypatch):
    """model.background_grid: slot 0 is always the background, so scenes take a library background as slot 0 and
    cluster only the object slots (K - 1 clusters by default)."""
    from slotlab.models import SlotAutoencoder

    run_dir = tmp_path / "run"
    train(apply_overrides(get_preset("smoke"), ["model.slot_init=bo_qsa", "model.background_grid=4"]), run_dir)
    decoded, real_decode = [], SlotAutoencoder.decode

    def recording_decode(self, slots):
        decoded.append(slots)
        return real_decode(self, slots)

    monkeypatch.setattr(SlotAutoencoder, "decode", recording_decode)
    metrics = compose(run_dir, num_images=5, seed=0, device="cpu", fid=False)
    assert metrics["clusters"] == 2 and metrics["library_slots"] == 16 * 2
    scenes = decoded[0]  # [5, 3, D]: the compositions come first, then the reconstructions
    assert scenes.shape[:2] == (5, 3)
    library = slot_library.load_library(run_dir, "train").slots  # [16, 3, D]
    backgrounds, objects = library[:, 0], library[:, 1:].reshape(-1, library.shape[-1])

    def is_row_of(vectors, table):
        return ((vectors[:, None] - table[None]).abs().amax(-1) == 0).any(-1)

    assert is_row_of(scenes[:, 0], backgrounds).all()
    assert is_row_of(scenes[:, 1:].reshape(-1, scenes.shape[-1]), objects).all()


def test_compose_records_fid_of_compositions_and_reconstructions(trained_run, tmp_path, monkeypatch):
    """The FID plumbing with a stand-in feature network (the real one is tested in test_fid.py)."""
    from slotlab.metrics import fid

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(fid, "feature_extractor", lambda device: lambda x: x[:, :, ::20, ::20].flatten(1))
    metrics = compose(trained_run, num_images=5, device="cpu")
    for name in ("fid_compose", "fid_recon", "kid_compose", "kid_recon"):
        assert np.isfinite(metrics[name]), name
    assert metrics["fid_compose"] > 0 and metrics["num_reference"] == 5
    reference = fid.folder_features(trained_run / "compose" / "reference", verbose=False)
    recon = fid.folder_features(trained_run / "compose" / "recon", verbose=False)
    assert metrics["fid_recon"] == pytest.approx(fid.frechet_distance(recon, reference))


# ------------------------------------------------------------------------------------------------ mix
def test_mix_taking_every_slot_of_b_gives_the_reconstruction_of_b(trained_run):
    path = mix(trained_run, 0, 1, take_from_b=[0, 1, 2], device="cpu")
    row = cells(path, rows=1, cols=5, size=16)[0]  # A | B | recon A | recon B | mix
    gap_to_b = np.abs(row[4].astype(int) - row[3]).max()
    gap_to_a = np.abs(row[4].astype(int) - row[2]).max()
    assert gap_to_b <= 1 < gap_to_a  # equal up to rounding (a batch of 1 vs 2 may round one level apart)
    record = json.loads((trained_run / "mix" / "mix_0_1.json").read_text())
    assert record["slots_taken_from_b"] == [0, 1, 2]


def test_mix_by_pixel_takes_the_slot_under_it(trained_run):
    mix(trained_run, 2, 3, pixels=[(4, 4)], device="cpu")
    record = json.loads((trained_run / "mix" / "mix_2_3.json").read_text())
    assert len(record["slots_taken_from_b"]) == 1 and 0 <= record["slots_taken_from_b"][0] < 3


@pytest.mark.parametrize("args, fragments", [
    (["--a", "0", "--b", "1"], ["--take-from-b", "--pixels"]),
    (["--a", "0", "--b", "1", "--take-from-b", "7"], ["slot 7", "3 slots"]),
    (["--a", "0", "--b", "1", "--take-from-b", "x"], ["'x'"]),
    (["--a", "0", "--b", "99", "--take-from-b", "1"], ["B = 99", "8 images"]),
    (["--a", "0", "--b", "1", "--pixels", "40,2"], ["pixel 40,2", "16x16"]),
])
def test_mix_bad_input_gives_one_error_line(trained_run, capsys, args, fragments):
    code, _, err = run(capsys, "mix", str(trained_run), *args, "--device", "cpu")
    assert code == 2
    assert_one_error_line(err, *fragments)


def test_compose_and_library_bad_input(tmp_path, trained_run, capsys):
    code, _, err = run(capsys, "compose", str(tmp_path / "none"), "--device", "cpu")
    assert code == 2
    assert_one_error_line(err, "missing run directory")
    code, _, err = run(capsys, "compose", str(trained_run), "--clusters", "1000", "--device", "cpu")
    assert code == 2
    assert_one_error_line(err, "1000 clusters", "48 slots")
    code, _, err = run(capsys, "library", str(tmp_path / "none"), "--device", "cpu")
    assert code == 2
    assert_one_error_line(err, "missing run directory")


def test_a_library_of_the_first_images_only(trained_run, capsys):
    from slotlab.generate.slot_library import build_library, load_library

    assert run(capsys, "library", str(trained_run), "--limit", "5", "--device", "cpu")[0] == 0
    library = load_library(trained_run, "train")
    assert library.slots.shape[0] == 5 and library.meta["num_images"] == 5
    build_library(trained_run, "train", device="cpu")  # all images again: another library, rebuilt
    assert load_library(trained_run, "train").slots.shape[0] > 5
