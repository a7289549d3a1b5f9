"""``slotlab report``: a self-contained HTML page and its Markdown twin, checked in headless Chromium."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from slotlab.cli import main
from slotlab.config import get_preset, save_config
from slotlab.report.html import dump_dom, find_chromium, write_report
from slotlab.report.plots import plot_curves, save_png


def picture(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


@pytest.fixture
def run_dir(tmp_path):
    """A run directory with what train, eval, compose and mix leave behind (hand-made, no model needed)."""
    run = tmp_path / "run"
    save_config(get_preset("smoke"), run / "config.json")
    records = [{"step": s, "split": "train", "loss": 0.5 / s, "lr": 1e-3, "epoch": s / 4, "images_per_s": 50.0}
               for s in range(1, 9)]
    records += [{"step": s, "split": "val", "loss": 0.6 / s, "ari": 0.1 * s, "fg_ari": 0.11 * s, "epoch": s / 4}
                for s in (4, 8)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(
        {"split": "val", "num_images": 8, "ari": 0.8125, "fg_ari": 0.9375, "miou": 0.5, "mbo": 0.625,
         "mse": 0.01, "clevrtex_mse": 12.5}))
    for index, name in enumerate(("best", "worst", "slots", "attention", "disentanglement_all")):
        save_png(picture(index), run / "eval" / f"{name}.png")
    (run / "compose").mkdir()
    (run / "compose" / "metrics.json").write_text(json.dumps({"fid_compose": 143.4, "fid_recon": 61.2,
                                                              "cluster_sizes": [3, 4]}))
    save_png(picture(10), run / "compose" / "gallery.png")
    save_png(picture(11), run / "mix" / "mix_0_1.png")
    return run


def test_curves_show_loss_lr_and_val_ari(run_dir):
    path = plot_curves(run_dir)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[1] > 1.3 * image.shape[0]  # three panels side by side when ARI is logged
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "val", "loss": 1.0}) + "\n")
    assert plot_curves(run_dir) is None  # nothing trained yet: no picture


def test_report_embeds_every_present_file(run_dir):
    plot_curves(run_dir)
    path = write_report(run_dir)
    assert path == str(run_dir / "report.html")
    page = (run_dir / "report.html").read_text()
    assert 'src="file:' not in page and 'src="eval/' not in page  # self-contained: no links to files
    # best, worst, slots, attention, disentanglement, curves, compose gallery, mix.
    sources = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(sources) == 8
    assert base64.b64decode(sources[0])[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("0.8125", "0.9375", "mIoU", "143.4", "Slot mixing", "Disentanglement", "num_slots"):
        assert text in page, text
    markdown = (run_dir / "report.md").read_text()
    assert "| fg_ari | 0.9375 |" in markdown
    assert "![" in markdown and "(eval/best.png)" in markdown and "(compose/gallery.png)" in markdown


def test_report_of_a_bare_run_has_no_empty_sections(tmp_path):
    run = tmp_path / "bare"
    save_config(get_preset("smoke"), run / "config.json")
    page = (tmp_path / "bare" / "report.html")
    write_report(run)
    text = page.read_text()
    assert "slotlab eval" in text  # tells the user how to get metrics
    assert "Composition" not in text and "<img" not in text


@pytest.mark.parametrize("setup, fragment", [
    (lambda run: None, "missing run directory"),
    (lambda run: run.mkdir(), "not a run directory"),
    (lambda run: (save_config(get_preset("smoke"), run / "config.json"),
                  (run / "eval").mkdir(), (run / "eval" / "metrics.json").write_text("{oops")), "metrics.json"),
    (lambda run: (save_config(get_preset("smoke"), run / "config.json"),
                  (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')), "metrics.jsonl (line 2)"),
])
def test_report_bad_run_dirs(tmp_path, capsys, setup, fragment):
    run = tmp_path / "run"
    setup(run)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err
    assert not (run / "report.html").exists()


@pytest.mark.skipif(find_chromium() is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    plot_curves(run_dir)
    html_path = write_report(run_dir)
    shot = tmp_path / "report.png"
    dom = dump_dom(html_path, shot, width=1000, height=1200)
    table = re.search(r'<table id="metrics">(.*?)</table>', dom, re.S)
    assert table is not None
    rows = dict(re.findall(r"<tr><td>(\w+)</td><td class=\"num\">([^<]+)</td>", table.group(1)))
    assert rows["fg_ari"] == "0.9375" and rows["miou"] == "0.5000"
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert loaded is not None and int(loaded.group(1)) == dom.count("<img") == 8  # every picture decoded
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (1200, 1000, 3)
    assert image.std() > 20  # text, table and pictures, not a blank page


def test_attention_figure_shows_at_most_eight_iterations_from_first_to_last():
    from slotlab.report.plots import MAX_ATTENTION_ROWS, shown_iterations

    assert shown_iterations(7) == list(range(7))
    forty = shown_iterations(40)  # slotlab eval --iters 40
    assert len(forty) == MAX_ATTENTION_ROWS and forty[0] == 0 and forty[-1] == 39
    assert forty == sorted(set(forty))
