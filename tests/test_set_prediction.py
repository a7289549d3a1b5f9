"""Set property prediction: the paper's AP against a direct reference, the Hungarian loss, and the CLI."""

from __future__ import annotations

import itertools
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from slotlab.config import apply_overrides, get_preset
from slotlab.errors import UserError
from slotlab.metrics import average_precision
from slotlab.metrics.set_prediction import AP_THRESHOLDS, set_targets
from slotlab.tasks import build_model

PAPER_THRESHOLDS = (-1, 1.0, 0.5, 0.25, 0.125)


def reference_average_precision(pred: np.ndarray, target: np.ndarray, threshold: float) -> float:
    """A plain transcription of the Slot Attention paper's ``average_precision_clevr`` loop (one detection at a time).

    Rows are ``(x, y, z, properties..., score)`` for predictions and ``(x, y, z, properties..., real)`` for targets.
    """
    batch, num_pred, size = pred.shape
    flat = pred.reshape(batch * num_pred, size)
    order = np.argsort(flat[:, -1])[::-1]
    tp, fp, claimed = np.zeros(len(order)), np.zeros(len(order)), set()
    for rank, flat_id in enumerate(order):
        image = flat_id // num_pred
        best_distance, best_id = 10000, None
        for obj in range(target.shape[1]):
            if target[image, obj, -1]:
                if list(target[image, obj, 3:-1]) == list(flat[flat_id, 3:-1]):
                    distance = np.linalg.norm((target[image, obj, :3] - flat[flat_id, :3]) * 6.0)
                    if distance < best_distance:
                        best_distance, best_id = distance, obj
        if best_distance < threshold or threshold == -1:
            if best_id is not None and (image, best_id) not in claimed:
                tp[rank] = 1
                claimed.add((image, best_id))
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    recall = (np.cumsum(tp) / np.sum(target[:, :, -1])).astype(np.float32).tolist()
    precision = (np.cumsum(tp) / (np.cumsum(tp) + np.cumsum(fp))).astype(np.float32).tolist()
    recall, precision = [0] + recall + [1], [0] + precision + [0]
    for i in range(len(precision) - 1, 0, -1):
        precision[i - 1] = max(precision[i - 1], precision[i])
    return sum(precision[i + 1] * (recall[i + 1] - recall[i]) for i in range(len(recall) - 1)
               if recall[i + 1] != recall[i])


def scene_targets(rng: np.random.Generator, batch: int, max_objects: int, sizes=(3, 2, 4)) -> np.ndarray:
    """Random targets with distinct property tuples per image, padded rows at the end."""
    target = np.zeros((batch, max_objects, 3 + len(sizes) + 1))
    all_props = list(itertools.product(*[range(s) for s in sizes]))
    for b in range(batch):
        count = rng.integers(1, max_objects + 1)
        picks = rng.choice(len(all_props), size=count, replace=False)
        for m, pick in enumerate(picks):
            target[b, m, :3] = rng.uniform(0, 1, size=3)
            target[b, m, 3:-1] = all_props[pick]
            target[b, m, -1] = 1
    return target


def perfect_predictions(target: np.ndarray, num_slots: int) -> np.ndarray:
    pred = np.zeros((target.shape[0], num_slots, target.shape[2]))
    pred[:, : target.shape[1]] = target  # real objects get score 1, padding rows score 0
    return pred


def test_perfect_predictions_give_ap_one_at_every_threshold():
    target = scene_targets(np.random.default_rng(0), batch=6, max_objects=4)
    pred = torch.from_numpy(perfect_predictions(target, num_slots=5))
    for threshold in (*AP_THRESHOLDS, -1):
        assert average_precision(pred, torch.from_numpy(target), threshold) == pytest.approx(1.0)


def test_shuffled_coordinates_give_zero_ap_at_tight_thresholds():
    rng = np.random.default_rng(1)
    target = scene_targets(rng, batch=4, max_objects=3)
    target[:, :, -1] = 1  # three real objects per image, distinct properties
    target[:, :, :3] = [[0.1, 0.1, 0.5], [0.5, 0.9, 0.5], [0.9, 0.3, 0.5]]  # >= 0.5 apart: > 3 scene units
    pred = perfect_predictions(target, num_slots=3)
    pred[:, :, :3] = pred[:, [1, 2, 0], :3]  # each prediction gets another object's coordinates
    pred[:, :, -1] = rng.uniform(size=(4, 3))
    pred_t, target_t = torch.from_numpy(pred), torch.from_numpy(target)
    assert average_precision(pred_t, target_t, math.inf) == pytest.approx(1.0)  # properties alone are right
    for threshold in (1.0, 0.5, 0.25, 0.125):
        assert average_precision(pred_t, target_t, threshold) == 0.0


def test_hand_computed_ap():
    # One image, two objects; ranked detections: right, wrong properties, right -> TP, FP, TP.
    target = torch.tensor([[[0.1, 0.1, 0.0, 0, 1], [0.8, 0.8, 0.0, 1, 1]]])
    pred = torch.tensor([[[0.1, 0.1, 0.0, 0, 0.9], [0.5, 0.5, 0.0, 2, 0.8], [0.8, 0.8, 0.0, 1, 0.7]]])
    # recall 0.5, 0.5, 1.0; precision 1, 1/2, 2/3 -> AP = 1 * 0.5 + 2/3 * 0.5
    assert average_precision(pred, target, 0.5) == pytest.approx(0.5 + 0.5 * np.float32(2 / 3))
    # A duplicate of the first detection ranked second claims an object already taken: a false positive.
    pred[0, 1] = torch.tensor([0.1, 0.1, 0.0, 0, 0.8])
    assert average_precision(pred, target, 0.5) == pytest.approx(0.5 + 0.5 * np.float32(2 / 3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_equals_the_paper_reference_loop_on_noisy_predictions(seed):
    rng = np.random.default_rng(seed)
    target = scene_targets(rng, batch=8, max_objects=5, sizes=(2, 2, 2))
    pred = perfect_predictions(target, num_slots=6)
    pred[..., :3] += rng.normal(0, 0.05, size=pred[..., :3].shape)  # distances of roughly 0.1 to 1 scene units
    flip = rng.uniform(size=pred.shape[:2]) < 0.3
    pred[..., 3][flip] = 1 - pred[..., 3][flip]  # some wrong properties
    pred[:, 5] = pred[:, 0]  # duplicates that compete for the same object
    pred[..., -1] = rng.uniform(size=pred.shape[:2])
    for threshold in PAPER_THRESHOLDS:
        expected = reference_average_precision(pred, target, threshold)
        got = average_precision(torch.from_numpy(pred), torch.from_numpy(target), threshold)
        assert got == pytest.approx(expected, abs=1e-9)
    assert 0.0 < reference_average_precision(pred, target, 0.25) < 1.0  # the case is not trivial


def test_ap_rejects_targets_without_objects_and_bad_thresholds():
    with pytest.raises(ValueError, match="no real objects"):
        average_precision(torch.zeros(1, 2, 6), torch.zeros(1, 2, 6), 1.0)
    with pytest.raises(ValueError, match="threshold"):
        average_precision(torch.zeros(1, 2, 6), torch.ones(1, 2, 6), -0.5)


def test_set_targets_marks_padding_rows_and_unknown_properties_match_anything():
    coords = torch.rand(1, 4, 3)
    props = torch.tensor([[[1, 2], [0, 0], [3, -1], [-1, -1]]])  # row 2: colour unknown (CLEVRTex); row 3: padding
    target = set_targets(coords, props)
    assert target.shape == (1, 4, 6)
    assert target[0, :, -1].tolist() == [1.0, 1.0, 1.0, 0.0]
    pred = torch.cat([target[:, :3, :5], torch.ones(1, 3, 1)], dim=-1)  # exact copies of the three real objects
    pred[0, 2, 4] = 7  # any value for the unknown property
    assert average_precision(pred, target, 0.125) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ the model
def smoke_model(overrides=()):
    torch.manual_seed(0)
    return build_model(apply_overrides(get_preset("setpred-smoke"), list(overrides)))


def smoke_batch():
    from slotlab.data import build_dataset, to_model_batch

    dataset = build_dataset(get_preset("setpred-smoke").data, "train")
    return to_model_batch(dataset.batch(np.arange(4)), "cpu")


def test_hungarian_matching_is_the_cheapest_assignment_and_ignores_object_order():
    model = smoke_model()
    batch = smoke_batch()
    out = model(batch["image"])
    real = (batch["obj_props"] >= 0).any(-1)
    costs = model.pair_costs(out, batch["obj_coords"], batch["obj_props"])
    b_idx, s_idx, o_idx = model.match(costs, real)
    cost_np = costs.detach().numpy()
    for b in range(4):
        objects = torch.nonzero(real[b]).flatten().tolist()
        chosen = cost_np[b, s_idx[b_idx == b].numpy(), o_idx[b_idx == b].numpy()].sum()
        brute = min(cost_np[b, list(slots), objects].sum()
                    for slots in itertools.permutations(range(cost_np.shape[1]), len(objects)))
        assert chosen == pytest.approx(brute, rel=1e-6)

    torch.manual_seed(5)
    loss, _ = model.compute_loss(batch)
    perm = torch.tensor([2, 0, 1])
    shuffled = dict(batch, obj_coords=batch["obj_coords"][:, perm], obj_props=batch["obj_props"][:, perm])
    torch.manual_seed(5)  # the same slot noise
    loss_shuffled, _ = model.compute_loss(shuffled)
    torch.testing.assert_close(loss_shuffled, loss)


def test_loss_trains_all_parts_and_predict_has_the_ap_layout():
    model = smoke_model()
    batch = smoke_batch()
    loss, logs = model.compute_loss(batch)
    loss.backward()
    assert set(logs) == {"coord_loss", "property_loss", "object_loss"}
    for name in ("encoder.cnn.0.weight", "grouping.to_q.weight", "head.2.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    pred = model.predict(batch["image"])
    assert pred.shape == (4, 4, 3 + 3 + 1)
    assert ((pred[..., -1] > 0) & (pred[..., -1] < 1)).all()
    assert (pred[..., 3:6] == pred[..., 3:6].round()).all()


def test_quantiser_kl_is_added_with_beta(monkeypatch):
    class FakeQuantiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, slots, step):
            return types.SimpleNamespace(slots=slots * self.scale, kl=torch.tensor(3.0) + 0 * self.scale)

    monkeypatch.setitem(sys.modules, "slotlab.models.quantiser",
                        types.SimpleNamespace(build_quantiser=lambda config: FakeQuantiser()))
    plain = smoke_model()
    quantised = smoke_model(["model.quantiser=vq", "vq.beta=0.5"])
    with torch.no_grad():
        quantised.quantiser.scale.fill_(1.0)  # identity quantiser: only the KL term differs
    batch = smoke_batch()
    torch.manual_seed(3)
    loss_plain, _ = plain.compute_loss(batch)
    torch.manual_seed(3)
    loss_vq, logs = quantised.compute_loss(batch)
    assert float(logs["kl"]) == 3.0
    torch.testing.assert_close(loss_vq, loss_plain + 0.5 * 3.0)


def test_batch_without_object_extras_is_a_user_error():
    model = smoke_model()
    with pytest.raises(UserError, match="obj_coords / obj_props"):
        model.compute_loss({"image": torch.zeros(2, 3, 16, 16)})


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_trains_and_evaluates_a_setpred_run(tmp_path, capsys):
    from slotlab.cli import main

    run = tmp_path / "run"
    assert main(["train", "--preset", "setpred-smoke", "--set", "train.steps=1", "--out", str(run)]) == 0
    assert main(["eval", str(run)]) == 0
    metrics = json.loads((run / "eval" / "val-best" / "metrics.json").read_text())
    assert {"ap_inf", "ap_1", "ap_0.5", "ap_0.25", "ap_0.125"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("ap_inf", "ap_0.125"))
    assert metrics["num_objects"] > 0
    capsys.readouterr()


def test_cli_rejects_property_sizes_that_do_not_fit_the_data(tmp_path, capsys):
    from slotlab.cli import main

    run = tmp_path / "run"
    code = main(["train", "--preset", "setpred-smoke", "--set", "setpred.property_sizes=2,2,2", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: dataset 'sprites' has property values beyond "
                                                   "setpred.property_sizes")
    assert not (run / "checkpoints").exists()
