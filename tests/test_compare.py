"""``slotlab compare``: the table reads each run's config, logs and metric files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from slotlab.cli import main
from slotlab.config import apply_overrides, config_to_dict, get_preset
from slotlab.errors import UserError
from slotlab.report.compare import compare_runs, format_duration, training_time


def make_run(root: Path, name: str, overrides=(), eval_metrics=None, compose_metrics=None,
             rates=(100.0, 50.0)) -> Path:
    """A run directory as ``slotlab train`` leaves it (no checkpoints needed): config, log, metric files."""
    run = root / name
    run.mkdir()
    config = apply_overrides(get_preset("sprites-cpu"), list(overrides))  # batch size 32
    (run / "config.json").write_text(json.dumps(config_to_dict(config)))
    records = [{"step": 100 * (i + 1), "split": "train", "loss": 0.1, "images_per_s": rate}
               for i, rate in enumerate(rates)]
    records.append({"step": 100 * len(rates), "split": "val", "loss": 0.1})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if eval_metrics is not None:
        (run / "eval" / "val-best").mkdir(parents=True)
        evaluation = {"split": "val", "num_images": 500, "checkpoint": "best", **eval_metrics}
        (run / "eval" / "val-best" / "metrics.json").write_text(json.dumps(evaluation))
    if compose_metrics is not None:
        (run / "compose").mkdir()
        (run / "compose" / "metrics.json").write_text(json.dumps(compose_metrics))
    return run


def test_table_has_one_row_per_run_with_its_numbers(tmp_path):
    a = make_run(tmp_path, "sa", eval_metrics={"ari": 0.5, "fg_ari": 0.71234, "miou": 0.4, "mbo": 0.45, "mse": 0.0123},
                 compose_metrics={"fid_compose": 81.234, "fid_recon": 60.01})
    b = make_run(tmp_path, "smm", ["model.grouping=slot_mixture", "model.slot_balance=0"],
                 eval_metrics={"ari": 0.6, "fg_ari": 0.8})
    table = compare_runs([a, b])
    lines = table.splitlines()
    assert lines[0] == ("| run | model | evaluated on | ARI | FG-ARI | mIoU | mBO | MSE | FID | FID recon | steps | "
                        "wall time |")
    # 100 steps * 32 images at 100 img/s + 100 steps * 32 images at 50 img/s = 32 s + 64 s
    assert lines[2] == ("| sa | autoencoder / slot_attention / bo_qsa | val 500 img, best | 0.500 | 0.712 | 0.400 | "
                        "0.450 | 0.0123 | 81.2 | 60.0 | 200 | 1m 36s |")
    assert lines[3].startswith("| smm | autoencoder / slot_mixture / bo_qsa | val 500 img, best | 0.600 | 0.800 | - |")
    assert lines[5] == ('Config differences: model.grouping ("slot_attention", "slot_mixture"); '
                        'model.slot_balance (1.0, 0.0)')
    assert "AP∞ %" in lines[-1] and "slotlab eval (set prediction runs)" in lines[-1]  # columns no run has


def test_an_evaluation_with_other_test_time_iterations_says_so(tmp_path):
    trained = get_preset("sprites-cpu").model.iters
    same = make_run(tmp_path, "same", eval_metrics={"fg_ari": 0.7, "iters": trained})
    more = make_run(tmp_path, "more", eval_metrics={"fg_ari": 0.7, "iters": trained + 8})
    lines = compare_runs([same, more]).splitlines()
    assert "| val 500 img, best |" in lines[2]
    assert f"| val 500 img, best, T={trained + 8} |" in lines[3]


def test_an_evaluation_over_several_slot_draws_says_so(tmp_path):
    run = make_run(tmp_path, "draws", eval_metrics={"fg_ari": 0.7, "draws": 5, "std": {"fg_ari": 0.004}})
    assert "| val 500 img, best, mean of 5 draws |" in compare_runs([run]).splitlines()[2]


# sprites-cpu composes its image with the attention masks and one colour per slot; the MLP decoder's pixel sampling
# and the set-prediction head have no such image, so these runs switch that off, as a user must.
PIXEL_DECODER_OFF = ("model.recon_masks=decoder", "model.slot_rgb_grid=0", "model.mask_agreement=0",
                     "model.compactness=0")


def test_the_model_column_names_a_non_default_decoder(tmp_path):
    run = make_run(tmp_path, "mlp", ["model.decoder_kind=mlp", "model.decoder_pixels=0.25", *PIXEL_DECODER_OFF],
                   eval_metrics={})
    assert "| autoencoder / slot_attention / bo_qsa / mlp decoder 25% px |" in compare_runs([run]).splitlines()[2]


def test_set_prediction_runs_show_ap_in_percent(tmp_path):
    run = make_run(tmp_path, "setpred", ["task=setpred", *PIXEL_DECODER_OFF],
                   eval_metrics={"ap_inf": 0.943, "ap_1": 0.867, "ap_0.5": 0.56, "ap_0.25": 0.108, "ap_0.125": 0.009})
    lines = compare_runs([run]).splitlines()
    assert lines[0].startswith("| run | model | evaluated on | AP∞ % | AP1 % | AP0.5 % | AP0.25 % | AP0.125 % |")
    assert "| 94.3 | 86.7 | 56.0 | 10.8 | 0.9 |" in lines[2]


def test_writes_markdown_and_csv(tmp_path):
    run = make_run(tmp_path, "sa", eval_metrics={"ari": 0.5})
    table = compare_runs([run], out=tmp_path / "out" / "table.md")
    assert (tmp_path / "out" / "table.md").read_text() == table + "\n"
    compare_runs([run], out=tmp_path / "table.csv")
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert rows[0]["run"] == "sa" and float(rows[0]["ari"]) == 0.5 and rows[0]["fid"] == ""
    assert float(rows[0]["wall_time_s"]) == pytest.approx(96.0)


def test_training_time_sums_the_logged_windows():
    records = [{"step": 50, "split": "train", "images_per_s": 10.0}, {"step": 50, "split": "val"},
               {"step": 150, "split": "train", "images_per_s": 20.0}]
    assert training_time(records, batch_size=4) == pytest.approx(50 * 4 / 10 + 100 * 4 / 20)
    assert training_time([], batch_size=4) is None
    assert training_time(records + [{"step": 160, "split": "train", "wall_time_s": 7.0}], 4) == 7.0
    assert format_duration(3725) == "1h 02m" and format_duration(59.6) == "1m 00s" and format_duration(None) == "-"


def test_bad_inputs(tmp_path, capsys):
    run = make_run(tmp_path, "sa")
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith(f"error: missing run directory {tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["compare", str(run), "--out", str(tmp_path / "table.txt")]) == 2
    assert capsys.readouterr().err.startswith("error: --out")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt metrics file"):
        compare_runs([run])


def test_cli_prints_the_table(tmp_path, capsys):
    run = make_run(tmp_path, "sa", eval_metrics={"ari": 0.25})
    assert main(["compare", str(run)]) == 0
    assert "| sa | autoencoder / slot_attention / bo_qsa | val 500 img, best | 0.250 |" in capsys.readouterr().out
