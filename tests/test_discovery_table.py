"""benchmarks/discovery.py's table: rows kept from earlier runs (--keep-others), the presets' order, the means."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "discovery.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("discovery_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["discovery_benchmark"] = module
    spec.loader.exec_module(module)
    return module


discovery = _load_module()


def _row(preset: str, seed: int, fg_ari: float, **more) -> dict:
    return {"preset": preset, "seed": seed, "dataset": preset.split("-")[0], "budget_minutes": 15.0, "steps": 100,
            "images_per_s": 10.0, "fg_ari": fg_ari, "ari": 0.5, "miou": 0.5, "mbo": 0.5, "mse": 0.01, "curve": [],
            **more}


def test_kept_rows_are_those_of_other_runs_and_say_when_they_were_measured(tmp_path):
    earlier = tmp_path / "discovery.json"
    earlier.write_text(json.dumps({"machine": "AMD EPYC, 2 cores", "rows": [
        _row("tetrominoes-cpu", 0, 0.8), _row("clevr6-cpu", 0, 0.7, measured="2026-12-01, AMD EPYC")]}))
    kept = discovery.kept_rows(earlier, {("tetrominoes-cpu", 0)})
    assert [(r["preset"], r["measured"]) for r in kept] == [("clevr6-cpu", "2026-12-01, AMD EPYC")]
    assert discovery.kept_rows(tmp_path / "none.json", {("tetrominoes-cpu", 0)}) == []

    new = _row("tetrominoes-cpu", 0, 0.95, measured="2026-12-04, Intel Xeon")
    table = discovery.markdown(kept + [new], "header")
    lines = [line for line in table.splitlines() if line.startswith("| `")]
    # the standard presets in their fixed order, whatever the order of the rows; each row says when it was measured
    assert lines[0].startswith("| `tetrominoes-cpu` | 0 ") and lines[0].endswith("| 2026-12-04, Intel Xeon |")
    assert lines[1].startswith("| `clevr6-cpu` | 0 ") and lines[1].endswith("| 2026-12-01, AMD EPYC |")
    assert "measured" in table.splitlines()[2]


def test_a_table_of_one_measurement_has_no_measured_column():
    rows = [_row("tetrominoes-cpu", s, 0.9, measured="2026-12-04, Intel Xeon") for s in (0, 1)]
    table = discovery.markdown(rows, "header")
    assert "measured" not in table
    assert "| `tetrominoes-cpu` | mean | | | | **0.900** |" in table


def test_test_time_iterations_add_both_fg_aris_at_that_t():
    rows = [_row("clevr6-cpu", 0, 0.78, attn_fg_ari=0.83, test_iters=7, test_iters_fg_ari=0.835,
                 test_iters_attn_fg_ari=0.883)]
    table = discovery.markdown(rows, "header").splitlines()
    assert "| FG-ARI | FG-ARI, attn masks | FG-ARI, T=7 | attn, T=7 | ARI |" in table[2]
    assert "| 0.780 | 0.830 | 0.835 | 0.883 | 0.500 |" in table[4]


def test_a_row_scored_at_its_own_test_time_t_says_so():
    rows = [_row("clevr6-cpu", 0, 0.83, iters=7, trained_iters=3), _row("tetrominoes-cpu", 0, 0.9, iters=7,
                                                                       trained_iters=7)]
    lines = [line for line in discovery.markdown(rows, "header").splitlines() if line.startswith("| `")]
    assert lines[0].startswith("| `tetrominoes-cpu` | 0 ")
    assert lines[1].startswith("| `clevr6-cpu` (T=7 at test) | 0 ")


def test_kept_rows_are_those_of_other_runs_so_a_seed_can_be_added(tmp_path):
    earlier = tmp_path / "discovery.json"
    earlier.write_text(json.dumps({"machine": "Intel Xeon", "rows": [
        _row("clevr6-cpu", 0, 0.78), _row("clevr6-cpu", 1, 0.5), _row("tetrominoes-cpu", 1, 0.9)]}))
    kept = discovery.kept_rows(earlier, {("clevr6-cpu", 1), ("clevr6-cpu", 2)})
    assert [(r["preset"], r["seed"]) for r in kept] == [("clevr6-cpu", 0), ("tetrominoes-cpu", 1)]


def test_a_mean_over_runs_scored_at_different_t_is_left_out_but_that_at_one_t_is_given():
    older = _row("clevr6-cpu", 0, 0.78, iters=3, trained_iters=3, test_iters=7, test_iters_fg_ari=0.83,
                 test_iters_attn_fg_ari=0.88)
    newer = _row("clevr6-cpu", 1, 0.87, iters=7, trained_iters=3, test_iters=7, test_iters_fg_ari=0.87,
                 test_iters_attn_fg_ari=0.90)
    lines = discovery.markdown([newer, older], "header").splitlines()
    runs = [line for line in lines if line.startswith("| `")]
    assert runs[0].startswith("| `clevr6-cpu` | 0 ") and runs[1].startswith("| `clevr6-cpu` (T=7 at test) | 1 ")
    # FG-ARI, attn, then the T=7 pair: only the T=7 pair is one measurement in both rows
    assert runs[2].startswith("| `clevr6-cpu` | mean | | | |  |  | 0.850 | 0.890 |  |")


def test_a_run_made_with_an_older_preset_is_named_stale_and_the_presets_own_is_not(tmp_path):
    from slotlab.config import apply_overrides, config_to_dict, get_preset

    sets = ["train.seed=1"]
    config = config_to_dict(apply_overrides(get_preset("clevr6-cpu"), sets))
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert discovery.stale_keys(tmp_path, "clevr6-cpu", sets) == []
    config["model"]["mask_agreement"] = 0.0  # the preset's value before it changed
    del config["model"]["mask_agreement_from"]  # a key the run's slotlab did not have counts at its default
    del config["model"]["test_restarts"]  # a test-time key: the run is evaluated with the preset's value
    config["data"]["root"] = "/elsewhere"  # where the data is does not make another experiment
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert discovery.stale_keys(tmp_path, "clevr6-cpu", sets) == ["model.mask_agreement=0.0 (now 0.02)",
                                                                  "model.mask_agreement_from=0.0 (now 0.25)"]
    config["model"].update(mask_agreement=0.02, mask_agreement_from=0.25)
    config["train"].update(time_budget=12.0, log_every=7, threads=1)  # a rehearsal's budget makes another run
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert discovery.stale_keys(tmp_path, "clevr6-cpu", sets) == ["train.time_budget=12.0 (now 120.0)"]
    assert discovery.stale_keys(tmp_path, "clevr6-cpu", [*sets, "train.time_budget=12"]) == []
    config["model"]["decoder_grid"] = 64  # a config slotlab no longer accepts is stale too
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "decoder_grid" in discovery.stale_keys(tmp_path, "clevr6-cpu", sets)[0]


def test_rows_scored_over_several_slot_draws_show_the_spread_and_say_so():
    rows = [_row("clevr6-cpu", 0, 0.847, draws=5, fg_ari_std=0.004, test_iters=7, test_iters_fg_ari=0.85,
                 test_iters_fg_ari_std=0.006, test_iters_attn_fg_ari=0.86),
            _row("clevr6-cpu", 1, 0.81, draws=1)]
    table = discovery.markdown(rows, "header")
    runs = [line for line in table.splitlines() if line.startswith("| `")]
    assert "| 0.847 ± 0.004 |" in runs[0] and "| 0.850 ± 0.006 | 0.860 |" in runs[0]
    assert "| 0.810 |" in runs[1] and "±" not in runs[1]
    assert "| **0.829** |" in runs[2]  # the mean of the rows' scores
    assert "draws of the initial slots" in table.splitlines()[-1]
    assert "±" not in discovery.markdown([_row("clevr6-cpu", 0, 0.8)], "header")  # one draw: no note, no spread


def test_rows_scored_with_restarts_say_so_and_give_the_one_draw_fg_ari_beside():
    rows = [_row("clevr6-cpu", seed, fg, iters=7, trained_iters=3, restarts=8, one_restart_fg_ari=one)
            for seed, fg, one in ((0, 0.897, 0.850), (1, 0.855, 0.818))]
    rows.append(_row("tetrominoes-cpu", 0, 0.96, iters=7, trained_iters=7, restarts=1))
    table = discovery.markdown(rows, "header").splitlines()
    assert "| FG-ARI | FG-ARI, attn masks | FG-ARI, 1 restart | ARI |" in table[2]
    assert table[3].count("---") == table[2].count("|") - 1  # a separator cell per column
    lines = [line for line in table if line.startswith("| `")]
    assert lines[0].startswith("| `tetrominoes-cpu` | 0 ") and "|  | 0.500 |" in lines[0]  # no one-draw cell
    assert lines[1].startswith("| `clevr6-cpu` (T=7, 8 restarts at test) | 0 ") and "| 0.850 | 0.500 |" in lines[1]
    assert any(line.startswith("| `clevr6-cpu` | mean | | | | **0.876** |  | 0.834 | 0.500 |") for line in table)


def test_a_row_only_scored_names_what_its_run_was_made_with():
    rows = [_row("clevr6-cpu", 0, 0.85, made_with=["model.mask_agreement_from=0.0 (now 0.25)"]),
            _row("clevr6-cpu", 1, 0.82, made_with=[])]
    table = discovery.markdown(rows, "header")
    assert ("`clevr6-cpu` seed 0 was made with another config than the preset's now, and only scored "
            "(`--score-only`): model.mask_agreement_from=0.0 (now 0.25).") in table
    assert "seed 1 was made" not in table


def test_rows_composed_with_the_attention_masks_say_so_and_give_the_decoders_own_masks_beside():
    rows = [_row("multi-dsprites-cpu", 0, 0.78, attn_fg_ari=0.78, recon_masks="attention", decoder_fg_ari=0.31),
            _row("tetrominoes-cpu", 0, 0.96, recon_masks="decoder")]
    table = discovery.markdown(rows, "header").splitlines()
    assert "| FG-ARI | FG-ARI, attn masks | FG-ARI, decoder's own masks | ARI |" in table[2]
    assert table[3].count("---") == table[2].count("|") - 1
    lines = [line for line in table if line.startswith("| `")]
    assert lines[0].startswith("| `tetrominoes-cpu` | 0 ") and lines[0].count("|") == table[2].count("|")
    assert lines[1].startswith("| `multi-dsprites-cpu` (attention masks compose the image) | 0 ")
    assert "| 0.780 | 0.780 | 0.310 | 0.500 |" in lines[1]
    assert "decoder's own" not in discovery.markdown(rows[1:], "header")  # no such row: no column
    posterior = _row("multi-dsprites-cpu", 1, 0.93, attn_fg_ari=0.78, recon_masks="attention", mask_posterior=True)
    line = [line for line in discovery.markdown([posterior], "header").splitlines() if line.startswith("| `")][0]
    assert line.startswith("| `multi-dsprites-cpu` (attention masks compose the image; masks: each pixel's "
                           "posterior) | 1 ")
