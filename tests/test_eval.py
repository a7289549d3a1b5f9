"""``slotlab eval``: metrics.json, per_image.csv and pictures of a tiny trained run; task dispatch; bad input."""

from __future__ import annotations

import csv
import json
import os
import types
from unittest.mock import ANY

import numpy as np
import pytest
import torch

from slotlab import evaluate
from slotlab.cli import main
from slotlab.config import apply_overrides, config_to_dict, get_preset, save_config
from slotlab.errors import UserError
from slotlab.evaluate import evaluate_run
from slotlab.io import save_checkpoint
from slotlab.tasks import build_model
from slotlab.tasks.autoencoder import _Extremes
from slotlab.train.loop import train


def untrained_run(run_dir, overrides=()):
    """A run directory holding a freshly initialised smoke model (what ``slotlab train`` saves, without training)."""
    config = apply_overrides(get_preset("smoke"), ["data.num_val=12", *overrides])
    torch.manual_seed(0)
    save_config(config, run_dir / "config.json")
    save_checkpoint(run_dir / "checkpoints" / "last.pt",
                    {"model": build_model(config).state_dict(), "config": config_to_dict(config), "step": 0})
    return run_dir


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    run_dir = untrained_run(tmp_path_factory.mktemp("eval") / "run")
    metrics = evaluate_run(run_dir, limit=10, batch_size=4, device="cpu")
    return run_dir, metrics


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_eval_writes_every_metric_and_per_image_scores(evaluated_run):
    run_dir, metrics = evaluated_run
    saved = json.loads((run_dir / "eval" / "val-last-first10" / "metrics.json").read_text())
    assert saved == metrics
    for name in ("ari", "fg_ari", "miou", "mbo", "mse", "clevrtex_mse"):
        assert np.isfinite(saved[name]), name
    assert saved["num_images"] == 10 and saved["split"] == "val"
    rows = read_csv(run_dir / "eval" / "val-last-first10" / "per_image.csv")
    assert [int(r["index"]) for r in rows] == list(range(10))  # three batches of 4, 4, 2
    # The means in metrics.json are the means of the per-image scores (FG scores over images with objects).
    with_objects = [r for r in rows if int(r["num_objects"]) > 0]
    assert saved["images_with_objects"] == len(with_objects)
    assert saved["ari"] == pytest.approx(np.mean([float(r["ari"]) for r in rows]), abs=1e-5)
    for name in ("fg_ari", "miou", "mbo"):
        assert saved[name] == pytest.approx(np.mean([float(r[name]) for r in with_objects]), abs=1e-5), name
    assert saved["clevrtex_mse"] == pytest.approx(np.mean([float(r["clevrtex_mse"]) for r in rows]), rel=1e-4)
    # Where the object pixels go: per image in the CSV, pooled over the images' object pixels in metrics.json.
    places = ("own", "background", "other_object", "spare")
    pixels = np.array([int(r["object_pixels"]) for r in rows])
    for place in places:
        name = f"objects_in_{place}_slot"
        shares = np.array([float(r[name]) for r in rows])
        assert saved[name] == pytest.approx((shares * pixels).sum() / pixels.sum(), abs=1e-5), name
    assert sum(saved[f"objects_in_{place}_slot"] for place in places) == pytest.approx(1.0)
    # 16x16 RGB: the per-image CLEVRTex sum on [0, 1] is 3*16*16/4 times the [-1, 1] mean.
    assert saved["clevrtex_mse"] == pytest.approx(saved["mse"] * 3 * 16 * 16 / 4, rel=1e-4)


def test_eval_scores_slot_attention_masks_beside_the_decoder_masks():
    from slotlab.data import build_dataset
    from slotlab.metrics import ObjectDiscoveryMetrics
    from slotlab.models.slot_attention import attention_masks
    from slotlab.tasks.autoencoder import ObjectDiscoveryEvaluator

    config = apply_overrides(get_preset("smoke"), ["data.num_val=8", "model.encoder=strided_cnn"])  # 16 -> 4x4
    torch.manual_seed(0)
    model = build_model(config).eval()
    dataset = build_dataset(config.data, "val")
    evaluator = ObjectDiscoveryEvaluator(model, attention_scores=True)
    decoder, attention = ObjectDiscoveryMetrics(), ObjectDiscoveryMetrics()
    for _, batch in dataset.batches(8, 4, torch.device("cpu")):
        torch.manual_seed(1)
        with torch.no_grad():
            out = model(batch["image"])
        assert out.feature_size == (4, 4)
        decoder.update(out.masks, batch["mask"])
        attention.update(attention_masks(out.attn, (4, 4), (16, 16)), batch["mask"])
        torch.manual_seed(1)  # the same slot noise inside the evaluator
        with torch.no_grad():
            evaluator.update(batch, None)
    scores = evaluator.summary()
    for name in ("ari", "fg_ari", "miou", "mbo"):
        assert scores[name] == pytest.approx(decoder.compute()[name], abs=1e-6), name
        assert scores[f"attn_{name}"] == pytest.approx(attention.compute()[name], abs=1e-6), name
    assert scores["attn_fg_ari"] != scores["fg_ari"]  # two different sets of masks
    assert "decoder_fg_ari" not in scores  # the decoder's masks are the scored ones


def test_evaluator_scores_the_decoder_masks_where_the_attention_composes_the_image():
    """model.recon_masks=attention: ``fg_ari`` scores the masks the image is composed with (the attention's) and
    ``decoder_fg_ari`` the decoder's own, with which it draws from slots alone."""
    from slotlab.data import build_dataset
    from slotlab.metrics import ObjectDiscoveryMetrics
    from slotlab.tasks.autoencoder import ObjectDiscoveryEvaluator

    config = apply_overrides(get_preset("smoke"), ["data.num_val=8", "model.recon_masks=attention"])
    torch.manual_seed(0)
    model = build_model(config).eval()
    evaluator = ObjectDiscoveryEvaluator(model, attention_scores=True)
    composed, own = ObjectDiscoveryMetrics(), ObjectDiscoveryMetrics()
    for _, batch in build_dataset(config.data, "val").batches(8, 4, torch.device("cpu")):
        torch.manual_seed(1)
        with torch.no_grad():
            out = model(batch["image"])
        composed.update(out.masks, batch["mask"])
        own.update(out.decoder_masks, batch["mask"])
        torch.manual_seed(1)
        with torch.no_grad():
            evaluator.update(batch, None)
    scores = evaluator.summary()
    for name in ("ari", "fg_ari", "miou", "mbo"):
        assert scores[name] == pytest.approx(composed.compute()[name], abs=1e-6), name
        assert scores[f"attn_{name}"] == pytest.approx(composed.compute()[name], abs=1e-6), name
        assert scores[f"decoder_{name}"] == pytest.approx(own.compute()[name], abs=1e-6), name
    assert scores["decoder_fg_ari"] != scores["fg_ari"]


def test_eval_saves_galleries(evaluated_run):
    from PIL import Image

    run_dir, _ = evaluated_run
    for name in ("best", "worst", "masks", "slots", "attention"):
        path = run_dir / "eval" / "val-last-first10" / f"{name}.png"
        image = np.asarray(Image.open(path).convert("RGB"))
        assert image.shape[0] > 100 and image.shape[1] > 100, name
        assert image.std() > 10, f"{name}.png looks blank"


def test_extremes_keep_the_best_and_worst_images():
    extremes = _Extremes(size=2)
    batch = {"image": torch.zeros(3, 3, 4, 4), "mask": torch.zeros(3, 4, 4, dtype=torch.long)}
    out = types.SimpleNamespace(masks=torch.zeros(3, 2, 4, 4), recon=torch.zeros(3, 3, 4, 4))
    for start, scores in ((0, [0.5, 0.9, 0.1]), (3, [0.7, -0.2, 0.95])):
        extremes.add(np.array(scores), np.arange(start, start + 3), batch, out)
    assert [index for _, index, _ in extremes.best()] == [5, 1]
    assert [index for _, index, _ in extremes.worst()] == [4, 2]


def test_eval_runs_the_task_evaluator_over_the_split(tmp_path, monkeypatch):
    """``slotlab eval`` names no task: it feeds every batch to the task's evaluator and writes its summary."""
    config = apply_overrides(get_preset("smoke"), ["task=setpred"])
    seen = []

    class FakeEvaluator:
        def update(self, batch, indices):
            seen.append(indices.tolist())

        def summary(self):
            return {"ap_inf": 0.75}

    class FakeTask:
        def evaluator(self, model, dataset, out_dir):
            return FakeEvaluator()

    monkeypatch.setattr(evaluate, "load_trained_model",
                        lambda run_dir, checkpoint, device: (config, torch.nn.Linear(1, 1)))
    monkeypatch.setattr(evaluate, "get_task", lambda config: FakeTask())
    metrics = evaluate_run(tmp_path, limit=5, batch_size=2)
    assert metrics["ap_inf"] == 0.75 and "ari" not in metrics
    assert seen == [[0, 1], [2, 3], [4]]
    assert json.loads((tmp_path / "eval" / "val-last-first5" / "metrics.json").read_text())["ap_inf"] == 0.75


def test_eval_with_more_iterations_at_test_time_keeps_the_plain_evaluation(evaluated_run):
    run_dir, plain = evaluated_run
    assert plain["iters"] == 3  # the smoke preset's T
    more = evaluate_run(run_dir, limit=10, batch_size=4, device="cpu", iters=9)
    assert more["iters"] == 9 and more["fg_ari"] != plain["fg_ari"]
    assert json.loads((run_dir / "eval" / "val-last-first10-T9" / "metrics.json").read_text()) == more
    assert json.loads((run_dir / "eval" / "val-last-first10" / "metrics.json").read_text()) == plain
    again = evaluate_run(run_dir, limit=10, batch_size=4, device="cpu", iters=3)  # T as trained: the plain one
    assert {**again, "eval_seconds": 0} == {**plain, "eval_seconds": 0}
    from slotlab.runs import find_eval

    assert find_eval(run_dir).name == "val-last-first10"  # the report shows the trained T, though T9 came later
    (run_dir / "eval" / "val-last-first10" / "metrics.json").touch()
    os.utime(run_dir / "eval" / "val-last-first10-T9" / "metrics.json")  # now the newest
    assert find_eval(run_dir).name == "val-last-first10"


def test_a_run_with_test_iters_is_evaluated_with_them(evaluated_run, tmp_path):
    run_dir, _ = evaluated_run
    nine = evaluate_run(run_dir, limit=10, batch_size=4, device="cpu", iters=9)
    same = untrained_run(tmp_path / "run", ["model.test_iters=9"])  # the same weights, T=9 outside training
    plain = evaluate_run(same, limit=10, batch_size=4, device="cpu")
    assert plain["iters"] == 9 and plain["fg_ari"] == nine["fg_ari"] and plain["mse"] == nine["mse"]
    assert (same / "eval" / "val-last-first10" / "metrics.json").is_file()  # the run's own T: the plain folder
    assert evaluate_run(same, limit=10, batch_size=4, device="cpu", iters=9) == {**plain, "eval_seconds": ANY}
    three = evaluate_run(same, limit=10, batch_size=4, device="cpu", iters=3)  # as in training, asked for
    assert three["iters"] == 3 and three["fg_ari"] != plain["fg_ari"]


def test_eval_of_several_slot_draws_reports_their_mean_and_spread(evaluated_run):
    run_dir, plain = evaluated_run  # noise seed 0, one draw
    other = evaluate_run(run_dir, limit=10, batch_size=4, device="cpu", seed=1)
    assert other["fg_ari"] != plain["fg_ari"]  # another draw of the initial slots, another score
    assert json.loads((run_dir / "eval" / "val-last-first10-seed1" / "metrics.json").read_text()) == other
    both = evaluate_run(run_dir, limit=10, batch_size=4, device="cpu", draws=2)
    assert both["draws"] == 2 and both["seeds"] == [0, 1]
    for name in ("fg_ari", "ari", "mbo", "mse", "attn_fg_ari"):
        assert both["per_draw"][name] == [plain[name], other[name]]
        assert both[name] == pytest.approx((plain[name] + other[name]) / 2)
        assert both["std"][name] == pytest.approx(abs(plain[name] - other[name]) / 2)
    assert both["num_images"] == 10 and both["split"] == "val"
    folder = run_dir / "eval" / "val-last-first10-draws2"
    assert json.loads((folder / "metrics.json").read_text()) == both
    first_draw = read_csv(run_dir / "eval" / "val-last-first10" / "per_image.csv")
    assert read_csv(folder / "per_image.csv") == first_draw  # pictures and per-image scores: the first draw
    kept = json.loads((run_dir / "eval" / "val-last-first10" / "metrics.json").read_text())
    assert {**kept, "eval_seconds": 0} == {**plain, "eval_seconds": 0}  # the one-draw evaluation is kept


def test_eval_with_restarts_keeps_the_plain_evaluation_and_equals_a_run_with_test_restarts(evaluated_run, tmp_path):
    run_dir, plain = evaluated_run
    three = evaluate_run(run_dir, limit=10, batch_size=4, device="cpu", restarts=3)
    assert three["restarts"] == 3 and plain["restarts"] == 1 and three["fg_ari"] != plain["fg_ari"]
    assert json.loads((run_dir / "eval" / "val-last-first10-R3" / "metrics.json").read_text()) == three
    same = untrained_run(tmp_path / "run", ["model.test_restarts=3"])  # the same weights, 3 restarts outside training
    own = evaluate_run(same, limit=10, batch_size=4, device="cpu")
    assert (own["restarts"], own["fg_ari"], own["mse"]) == (3, three["fg_ari"], three["mse"])
    assert (same / "eval" / "val-last-first10" / "metrics.json").is_file()  # the run's own number: the plain folder
    learned = untrained_run(tmp_path / "learned", ["model.slot_init=bo_qsa"])
    with pytest.raises(UserError, match="model.slot_init=bo_qsa"):
        evaluate_run(learned, limit=10, batch_size=4, device="cpu", restarts=3)
    assert not (learned / "eval").exists()
    assert evaluate_run(learned, limit=10, batch_size=4, device="cpu", restarts=1)["restarts"] == 1  # its own: plain
    assert (learned / "eval" / "val-last-first10" / "metrics.json").is_file()


def test_eval_posterior_scores_the_same_slots_with_each_pixels_posterior_and_equals_a_run_with_it(evaluated_run,
                                                                                                     tmp_path):
    run_dir, plain = evaluated_run
    posterior = evaluate_run(run_dir, limit=10, batch_size=4, device="cpu", posterior=True)
    assert posterior["mask_posterior"] and not plain["mask_posterior"] and posterior["ari"] != plain["ari"]
    assert posterior["mse"] == plain["mse"]  # the same reconstruction
    assert posterior["decoder_ari"] == plain["ari"]  # the masks that compose the image, scored beside
    assert json.loads((run_dir / "eval" / "val-last-first10-posterior" / "metrics.json").read_text()) == posterior
    same = untrained_run(tmp_path / "run", ["model.mask_posterior=true"])  # the same weights, the posterior built in
    own = evaluate_run(same, limit=10, batch_size=4, device="cpu")
    assert (own["ari"], own["fg_ari"]) == (posterior["ari"], posterior["fg_ari"])
    mixture = evaluate_run(same, limit=10, batch_size=4, device="cpu", posterior=False)
    assert (mixture["ari"], mixture["mask_posterior"]) == (plain["ari"], False)
    assert (same / "eval" / "val-last-first10-mixture" / "metrics.json").is_file()
    setpred = untrained_run(tmp_path / "setpred", ["task=setpred"])
    with pytest.raises(UserError, match="--posterior: the setpred model"):
        evaluate_run(setpred, limit=4, batch_size=4, device="cpu", posterior=True)


@pytest.mark.parametrize("args, fragment", [
    (["--limit", "-1"], "--limit"),
    (["--posterior", "yes"], "--posterior"),
    (["--restarts", "-2"], "--restarts"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--iters", "x"], "--iters"),
    (["--draws", "0"], "--draws"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64 - 1), "--draws", "2"], "seed"),
])
def test_eval_bad_arguments(evaluated_run, capsys, args, fragment):
    run_dir, _ = evaluated_run
    before = (run_dir / "eval" / "val-last-first10" / "metrics.json").read_text()
    assert main(["eval", str(run_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0]
    assert (run_dir / "eval" / "val-last-first10" / "metrics.json").read_text() == before  # nothing overwritten


def test_eval_missing_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: missing run directory")


def test_evaluations_of_other_splits_and_checkpoints_are_kept_and_the_report_says_which(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(apply_overrides(get_preset("smoke"), ["train.steps=2", "train.val_every=2", "train.keep_every=1"]), run_dir)
    assert main(["eval", str(run_dir), "--device", "cpu"]) == 0
    val = (run_dir / "eval" / "val-best" / "metrics.json").read_text()
    assert main(["eval", str(run_dir), "--checkpoint", "step-1", "--device", "cpu"]) == 0  # a kept snapshot
    assert json.loads((run_dir / "eval" / "val-step-1" / "metrics.json").read_text())["checkpoint"] == "step-1"
    assert main(["eval", str(run_dir), "--split", "train", "--limit", "4", "--device", "cpu"]) == 0
    assert main(["eval", str(run_dir), "--checkpoint", "last", "--device", "cpu"]) == 0
    assert (run_dir / "eval" / "val-best" / "metrics.json").read_text() == val  # untouched
    assert json.loads((run_dir / "eval" / "train-best-first4" / "metrics.json").read_text())["split"] == "train"
    assert (run_dir / "eval" / "val-last" / "metrics.json").is_file()
    assert main(["report", str(run_dir)]) == 0
    assert "## Metrics (eval/val-best: val split, 8 images, checkpoint best)" in (run_dir / "report.md").read_text()


def test_report_and_compare_say_when_scores_are_the_best_of_restarts_and_a_mean_of_draws(tmp_path, capsys):
    from slotlab.report.compare import compare_runs

    run_dir = untrained_run(tmp_path / "run", ["model.test_iters=5"])
    evaluate_run(run_dir, limit=4, batch_size=4, device="cpu", restarts=3, draws=2)  # the run's only evaluation
    assert main(["report", str(run_dir)]) == 0
    assert ("## Metrics (eval/val-last-first4-R3-draws2: val split, 4 images, checkpoint last, T=5, best of 3 "
            "restarts, mean of 2 draws)") in (run_dir / "report.md").read_text()
    assert "| val 4 img, last, T=5, best of 3 restarts, mean of 2 draws |" in compare_runs([run_dir])
