"""The Python API (slotlab.load, segment, decode), shareable exported folders, and the tutorial (issue 18)."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import slotlab
import slotlab.cli
from cli_helpers import assert_one_error_line, run
from slotlab.config import apply_overrides, get_preset
from slotlab.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("api") / "run"
    train(apply_overrides(get_preset("smoke"), ["train.steps=4", "train.val_every=2"]), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    assert slotlab.cli.main(["export", str(smoke_run), "--out", str(out)]) == 0
    return out


def test_segment_accepts_paths_arrays_and_tensors(smoke_run, tmp_path):
    model = slotlab.load(smoke_run, device="cpu")
    picture = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)  # not square, not 16x16
    Image.fromarray(picture).save(tmp_path / "mine.png")
    from_path = model.segment(tmp_path / "mine.png")
    from_array = model.segment(picture)
    assert from_path.masks.shape == (1, 3, 16, 16) and from_path.slots.shape == (1, 3, 16)
    torch.testing.assert_close(from_path.masks, from_array.masks)
    torch.testing.assert_close(from_path.masks.sum(dim=1), torch.ones(1, 16, 16))
    assert torch.equal(from_path.ids, from_path.masks.argmax(dim=1))
    batch = model.segment(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert batch.masks.shape == (2, 3, 16, 16)
    assert model.decode(batch.slots).recon.shape == (2, 3, 16, 16)


def test_export_then_load_gives_the_same_masks_and_holds_no_pickle(smoke_run, exported):
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not any(p.suffix in (".pt", ".pkl", ".pth") for p in exported.rglob("*"))
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    from_run = slotlab.load(smoke_run, device="cpu").segment(image)
    from_export = slotlab.load(exported, device="cpu").segment(image)
    torch.testing.assert_close(from_export.masks, from_run.masks, rtol=0, atol=0)
    card = (exported / "README.md").read_text()
    assert "slotlab.load" in card and "smoke" in card


def test_commands_take_an_exported_folder(exported, capsys):
    code, out, _ = run(capsys, "eval", str(exported), "--limit", "4", "--device", "cpu")
    assert code == 0 and '"fg_ari"' in out
    code, _, err = run(capsys, "export", str(exported), "--out", str(exported.parent / "again"))
    assert code == 2
    assert_one_error_line(err, "exported folder already")


def test_export_refuses_a_folder_that_holds_files(smoke_run, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "export", str(smoke_run), "--out", str(tmp_path))
    assert code == 2
    assert_one_error_line(err, "not empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_the_tutorial_runs(exported, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("SLOTLAB_RUN", str(exported))
    monkeypatch.setenv("SLOTLAB_IMAGE", str(ROOT / "docs/images/scenes.png"))
    monkeypatch.setenv("SLOTLAB_OUT", str(tmp_path))
    runpy.run_path(str(ROOT / "docs/tutorial.py"), run_name="__main__")
    for name in ("slots.png", "edited.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
