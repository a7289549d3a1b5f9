"""Metrics against independent references (sklearn ARI, a scipy port of the CLEVRTex evaluator) and hand-built masks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

from slotlab.metrics import (
    ARIMetric,
    MBOMetric,
    MIoUMetric,
    MSEMetric,
    ObjectDiscoveryMetrics,
    ari,
    contingency,
    fg_ari,
    mask_ids,
    mbo,
    miou,
    object_discovery_scores,
)
from slotlab.metrics.overlap import hungarian_matched_iou


# ---------------------------------------------------------------------------------------------- references
def sklearn_ari(pred_ids: np.ndarray, true_ids: np.ndarray, foreground_only: bool = False) -> float:
    pred, true = pred_ids.ravel(), true_ids.ravel()
    if foreground_only:
        pred, true = pred[true > 0], true[true > 0]
    return adjusted_rand_score(true, pred)


def clevrtex_miou_fg(pred_ids: np.ndarray, true_ids: np.ndarray, num_slots: int) -> float:
    """A per-image port of CLEVRTEX_Evaluator.update's mIoU_fg: padded one-hot masks, IoU, Hungarian, visible pairs."""
    k = max(num_slots, int(true_ids.max()) + 1)
    pred = np.stack([pred_ids == i for i in range(k)])  # [K, H, W]
    true = np.stack([true_ids == i for i in range(k)])
    iou = np.zeros((k, k))  # [pred, true]
    for p in range(k):
        for t in range(k):
            union = (pred[p] | true[t]).sum()
            if pred[p].any() and true[t].any():
                iou[p, t] = (pred[p] & true[t]).sum() / union
    true_ind, pred_ind = linear_sum_assignment(iou.T, maximize=True)
    ious = iou.T[true_ind, pred_ind]
    visible = true.any(axis=(1, 2)) | pred[pred_ind].any(axis=(1, 2))
    return ious[1:].sum() / (visible.sum() - 1)


def reference_mbo(pred_ids: np.ndarray, true_ids: np.ndarray) -> float:
    scores = []
    for t in np.unique(true_ids):
        if t == 0:
            continue
        obj = true_ids == t
        scores.append(max((obj & (pred_ids == p)).sum() / (obj | (pred_ids == p)).sum() for p in np.unique(pred_ids)))
    return float(np.mean(scores))


def noisy_scenes(batch: int, size: int, num_slots: int, noise: float, seed: int):
    """True ids from random rectangles; predicted ids = a permutation of them, with ``noise`` of pixels randomised."""
    rng = np.random.default_rng(seed)
    true = np.zeros((batch, size, size), dtype=np.int64)
    for b in range(batch):
        for obj in range(1, rng.integers(1, num_slots) + 1):
            y, x = rng.integers(0, size - 4, 2)
            h, w = rng.integers(4, size // 2, 2)
            true[b, y : y + h, x : x + w] = obj
    permutation = rng.permutation(num_slots)
    pred = permutation[true % num_slots]
    flip = rng.random(pred.shape) < noise
    pred[flip] = rng.integers(0, num_slots, int(flip.sum()))
    return torch.from_numpy(pred), torch.from_numpy(true)


# ---------------------------------------------------------------------------------------------- ARI
@pytest.mark.parametrize("num_pred,num_true", [(2, 2), (7, 4), (11, 11), (3, 9)])
def test_ari_matches_sklearn_on_random_ids(num_pred, num_true):
    rng = np.random.default_rng(num_pred * 100 + num_true)
    # Blocky ids (4x4 cells) so scores spread away from 0; one image uses a single true id.
    pred = rng.integers(0, num_pred, (6, 8, 8)).repeat(4, 1).repeat(4, 2)
    true = rng.integers(0, num_true, (6, 8, 8)).repeat(4, 1).repeat(4, 2)
    true[0] = 3 % num_true
    ours = ari(torch.from_numpy(pred), torch.from_numpy(true)).numpy()
    ours_fg = fg_ari(torch.from_numpy(pred), torch.from_numpy(true)).numpy()
    for b in range(len(pred)):
        assert ours[b] == pytest.approx(sklearn_ari(pred[b], true[b]), abs=1e-6)
        assert ours_fg[b] == pytest.approx(sklearn_ari(pred[b], true[b], foreground_only=True), abs=1e-6)


def test_ari_matches_sklearn_on_noisy_masks_and_soft_masks():
    pred_ids, true = noisy_scenes(8, 32, num_slots=7, noise=0.3, seed=1)
    soft = torch.nn.functional.one_hot(pred_ids, 7).permute(0, 3, 1, 2).float() * 0.8 + 0.02  # [B, K, H, W]
    scores = ari(soft, true).numpy()
    assert len(set(np.round(scores, 3))) > 4  # the data really spreads the score
    for b in range(8):
        assert scores[b] == pytest.approx(sklearn_ari(pred_ids[b].numpy(), true[b].numpy()), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64])
def test_mask_ids_equal_argmax_with_ties_negatives_and_nan(dtype, monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules["slotlab.metrics.ari"], "_ARGMAX_CHUNK_VALUES", 3 * 5 * 6 * 7)  # chunks of 3
    generator = torch.Generator().manual_seed(0)
    masks = torch.randint(-2, 3, (10, 5, 6, 7), generator=generator).to(dtype)  # [B, K, H, W], many ties
    masks[1] = torch.randn(5, 6, 7, generator=generator).to(dtype)  # no ties
    masks[2] = -torch.rand(5, 6, 7, generator=generator).to(dtype) - 1  # only negatives
    if dtype.is_floating_point:
        masks[4, 3, 0, 0] = float("nan")  # NaN wins, as in argmax (its chunk falls back)
        masks[5, :, 1, 1] = torch.tensor([-0.0, 0.0, -1.0, 0.0, -0.0], dtype=dtype)  # -0.0 == 0.0: lowest slot
    ids = mask_ids(masks)
    assert ids.shape == (10, 6, 7)
    assert torch.equal(ids.long(), masks.argmax(dim=1))
    assert torch.equal(mask_ids(masks[:0]).long(), masks[:0].argmax(dim=1))  # no images
    wide = torch.randn(2, 256, 3, 3, generator=generator)  # K > 255: argmax itself
    assert torch.equal(mask_ids(wide), wide.argmax(dim=1))
    widest = torch.randn(2, 255, 3, 3, generator=generator)
    widest[:, 254] = 10.0  # the last of 255 slots wins: its id still fits a byte
    widest[1, 0, 0, 0] = float("nan")  # and a NaN beside it
    assert torch.equal(mask_ids(widest).long(), widest.argmax(dim=1))
    views = torch.randn(8, 6, 7, 5, generator=generator).permute(0, 2, 3, 1)[::2]  # [4, K=7, 5, 6], not contiguous
    assert torch.equal(mask_ids(views).long(), views.argmax(dim=1))
    logits = torch.randn(3, 4, 5, 5, requires_grad=True)  # masks straight from a model, outside no_grad
    assert torch.equal(mask_ids(logits.softmax(dim=1)).long(), logits.argmax(dim=1))


def test_ari_hand_built_cases():
    true = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1]]])  # background | one object
    one_slot = torch.zeros_like(true)
    assert ari(one_slot, true).item() == pytest.approx(0.0)  # sklearn: 2 true clusters vs 1 predicted -> 0
    assert fg_ari(one_slot, true).item() == pytest.approx(1.0)  # only one object: one cluster in both
    no_fg = torch.zeros_like(true)
    assert fg_ari(torch.tensor([[[0, 1, 2, 3], [0, 1, 2, 3]]]), no_fg).item() == 1.0  # no pixels: sklearn says 1.0
    swapped = torch.tensor([[[1, 0, 1, 0], [0, 1, 0, 1]]])
    assert ari(swapped, true).item() == pytest.approx(sklearn_ari(swapped.numpy(), true.numpy()))
    assert ari(swapped, true).item() < 0


def test_contingency_chunked_and_single_bincount_paths_agree():
    pred, true = noisy_scenes(5, 16, num_slots=5, noise=0.4, seed=2)
    fast = contingency(pred, true)  # CPU: chunked int32 bincount
    weighted = contingency(pred, true, weights=torch.ones_like(true))  # torch.bincount path
    assert torch.equal(fast, weighted)
    assert fast.shape == (5, int(true.max()) + 1, 5)
    assert fast.sum().item() == 5 * 16 * 16
    assert contingency(pred, true, num_pred=9).shape[-1] == 9  # empty slots keep a column


def test_ari_metric_averages_fg_over_images_with_objects():
    pred, true = noisy_scenes(6, 16, num_slots=5, noise=0.2, seed=3)
    true[2] = 0  # no foreground: left out of the FG-ARI mean
    metric = ARIMetric()
    metric.update(pred[:4], true[:4])
    metric.update(pred[4:], true[4:])
    result = metric.compute()
    expected_fg = np.mean([sklearn_ari(pred[b].numpy(), true[b].numpy(), True) for b in (0, 1, 3, 4, 5)])
    expected = np.mean([sklearn_ari(pred[b].numpy(), true[b].numpy()) for b in range(6)])
    assert result["fg_ari"] == pytest.approx(expected_fg, abs=1e-9)
    assert result["ari"] == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------------------------- mIoU and mBO
@pytest.mark.parametrize("noise,seed", [(0.05, 4), (0.3, 5), (0.7, 6)])
def test_miou_and_mbo_match_references_on_noisy_masks(noise, seed):
    pred, true = noisy_scenes(8, 24, num_slots=7, noise=noise, seed=seed)
    masks = torch.nn.functional.one_hot(pred, 7).permute(0, 3, 1, 2).float()  # [B, K, H, W]
    ours_miou, ours_mbo = miou(masks, true).numpy(), mbo(masks, true).numpy()
    for b in range(8):
        assert ours_miou[b] == pytest.approx(clevrtex_miou_fg(pred[b].numpy(), true[b].numpy(), 7), abs=1e-9)
        assert ours_mbo[b] == pytest.approx(reference_mbo(pred[b].numpy(), true[b].numpy()), abs=1e-9)
    assert 0 <= ours_miou.min() and ours_miou.max() <= 1


def test_miou_mbo_hand_built_cases():
    true = torch.tensor([[[0, 0, 1, 1]] * 4])  # left half background, right half one object
    perfect = torch.tensor([[[5, 5, 2, 2]] * 4])
    assert miou(perfect, true).item() == 1.0 and mbo(perfect, true).item() == 1.0
    # The object split over two slots: each half has IoU 0.5; three non-empty pairs, less the background -> 0.5 / 2.
    split = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 2, 2]]])
    assert miou(split, true).item() == pytest.approx(0.25)
    assert mbo(split, true).item() == pytest.approx(0.5)
    assert miou(split, true).item() == pytest.approx(clevrtex_miou_fg(split[0].numpy(), true[0].numpy(), 3))
    # Everything in one slot: the slot goes to the background (IoU 0.5 either way, ties broken canonically) or
    # the object; mBO sees the object's best overlap 0.5.
    one_slot = torch.zeros_like(true)
    assert mbo(one_slot, true).item() == pytest.approx(0.5)
    assert miou(one_slot, true).item() in (pytest.approx(0.0), pytest.approx(0.5))


def test_edge_cases_are_defined_never_nan():
    no_fg = torch.zeros(1, 4, 4, dtype=torch.long)
    one_segment = torch.zeros(1, 4, 4, dtype=torch.long)
    two_segments = torch.tensor([[[0, 0, 1, 1]] * 4])
    assert miou(one_segment, no_fg).item() == 1.0  # nothing to find, nothing extra found
    assert miou(two_segments, no_fg).item() == 0.0  # an extra segment on an empty scene
    assert mbo(two_segments, no_fg).item() == 1.0
    single = torch.tensor([[[0, 0, 0, 0], [0, 3, 3, 0], [0, 3, 3, 0], [0, 0, 0, 0]]])
    assert miou(single, single).item() == 1.0 and mbo(single, single).item() == 1.0
    assert fg_ari(single, single).item() == 1.0
    # Empty predicted slots (K = 6, two slots win pixels) change nothing.
    masks = torch.zeros(1, 6, 4, 4)
    masks[0, 4] = (single[0] == 0).float()
    masks[0, 1] = (single[0] == 3).float()
    assert miou(masks, single).item() == 1.0 and ari(masks, single).item() == 1.0
    for fn in (ari, fg_ari, miou, mbo):
        for pred, true in [(two_segments, no_fg), (masks, single), (one_segment, two_segments)]:
            assert torch.isfinite(fn(pred, true)).all()


def test_scores_do_not_depend_on_slot_order():
    pred, true = noisy_scenes(6, 16, num_slots=7, noise=0.5, seed=7)
    masks = torch.nn.functional.one_hot(pred, 7).permute(0, 3, 1, 2).float()  # [B, K, H, W]
    permuted = masks[:, torch.tensor([3, 6, 0, 2, 5, 1, 4])]
    for fn in (ari, fg_ari, miou, mbo):
        assert torch.allclose(fn(masks, true), fn(permuted, true), atol=1e-12)
    # Two optimal matchings with different foreground IoU (0.2 + 0.3 = 0.0 + 0.5); scipy alone picks either,
    # depending on the column order. The canonical slot order makes every order give the same one.
    iou = torch.tensor([[[0.0, 0.0, 0.2], [0.0, 0.3, 0.5]]], dtype=torch.float64)  # [1, T, K], row 0 = background
    results = {tuple(hungarian_matched_iou(iou[:, :, list(order)])[0].tolist())
               for order in itertools.permutations(range(3))}
    assert len(results) == 1


def test_overlap_metric_objects_average_over_images_with_objects():
    pred, true = noisy_scenes(5, 16, num_slots=5, noise=0.3, seed=8)
    true[1] = 0
    miou_metric, mbo_metric = MIoUMetric(), MBOMetric()
    for part in (slice(0, 2), slice(2, 5)):
        miou_metric.update(pred[part], true[part])
        mbo_metric.update(pred[part], true[part])
    keep = [0, 2, 3, 4]
    assert miou_metric.compute()["miou"] == pytest.approx(miou(pred, true)[keep].mean().item())
    assert mbo_metric.compute()["mbo"] == pytest.approx(mbo(pred, true)[keep].mean().item())


# ---------------------------------------------------------------------------------------------- MSE and all together
def test_mse_mean_and_clevrtex_sum():
    image = torch.rand(3, 3, 8, 8) * 2 - 1
    recon = (image + 0.2).clamp(-1, 1)
    metric = MSEMetric()
    metric.update(recon, image)
    result = metric.compute()
    error = (recon - image) ** 2
    assert result["mse"] == pytest.approx(error.mean().item(), rel=1e-6)
    # CLEVRTex: images on [0, 1] (error / 4), summed over each image's 3 x 8 x 8 values, averaged over images.
    assert result["clevrtex_mse"] == pytest.approx((error / 4).sum().item() / 3, rel=1e-6)


def test_object_discovery_metrics_agree_with_single_metrics():
    pred, true = noisy_scenes(6, 16, num_slots=5, noise=0.25, seed=9)
    true[4] = 0
    image = torch.rand(6, 3, 16, 16) * 2 - 1
    recon = image * 0.5
    everything, ari_metric, mse_metric = ObjectDiscoveryMetrics(), ARIMetric(), MSEMetric()
    scores = everything.update(pred, true, recon, image)
    ari_metric.update(pred, true)
    mse_metric.update(recon, image)
    result = everything.compute()
    assert result["ari"] == pytest.approx(ari_metric.compute()["ari"])
    assert result["fg_ari"] == pytest.approx(ari_metric.compute()["fg_ari"])
    assert result["clevrtex_mse"] == pytest.approx(mse_metric.compute()["clevrtex_mse"])
    assert result["images_with_objects"] == 5
    assert scores["num_objects"][4].item() == 0
    assert torch.equal(object_discovery_scores(pred, true)["miou"], scores["miou"])
    assert set(scores) >= {"ari", "fg_ari", "miou", "mbo", "mse", "clevrtex_mse", "num_objects", "num_segments"}


def test_object_pixels_are_placed_in_own_background_other_and_spare_slots():
    from slotlab.metrics.object_discovery import PLACE_SCORES, ObjectDiscoveryMetrics
    from slotlab.metrics.overlap import object_pixel_places_from_contingency

    # 8 pixels: background 0-3, object 1 at 4-5, object 2 at 6-7 (the third image has no object 2)
    true = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1]])
    pred = torch.tensor([
        [0, 0, 0, 0, 0, 1, 2, 3],  # object 1 half in the background's slot; object 2 cut in two (one half spare)
        [0, 0, 0, 0, 1, 1, 2, 1],  # one pixel of object 2 in object 1's slot
        [0, 0, 0, 0, 0, 0, 0, 0],  # object 1 drawn by the background's slot (its best match overlaps nothing)
    ])
    table = contingency(pred, true, num_pred=4)  # [3, 3, 4]
    places = object_pixel_places_from_contingency(table)  # own, background, other object, spare
    assert places.tolist() == [[2, 1, 0, 1], [3, 0, 1, 0], [0, 2, 0, 0]]
    # the order of the slots does not matter
    assert object_pixel_places_from_contingency(table.flip(2)).tolist() == places.tolist()
    # a segment absent from an image (object 2 in the second) is matched to a leftover slot with IoU 0: that slot,
    # here holding a cut-off piece of object 1, stays spare
    true_2 = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1]])
    pred_2 = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0, 1, 2]])
    assert object_pixel_places_from_contingency(contingency(pred_2, true_2, num_pred=3)).tolist() == [
        [4, 0, 0, 0], [1, 0, 0, 1]]

    metrics = ObjectDiscoveryMetrics()
    masks = torch.nn.functional.one_hot(pred, 4).permute(0, 2, 1).float().view(3, 4, 1, 8)  # [B, K, H, W]
    scores = metrics.update(masks, true.view(3, 1, 8))
    assert scores["objects_in_own_slot"].tolist() == [0.5, 0.75, 0.0]
    pooled = metrics.compute()  # over the 10 object pixels of the three images
    assert [round(pooled[name], 6) for name in PLACE_SCORES] == [0.5, 0.3, 0.1, 0.1]
