"""VQ-SA: the slot quantiser, the autoencoder with discrete slot codes, object editing and the disentanglement view."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from cli_helpers import assert_one_error_line, run
from slotlab.config import apply_overrides, get_preset
from slotlab.data import ArrayDataset, build_dataset, to_model_batch
from slotlab.errors import UserError
from slotlab.generate.edit import decode_with_codes, edit_effect
from slotlab.metrics.disentanglement import match_slots_to_objects
from slotlab.models.quantiser import (
    SlotQuantiser,
    attention_centroids,
    build_quantiser,
    gumbel_temperature,
    kl_to_uniform,
)
from slotlab.tasks import build_model
from slotlab.tasks.autoencoder import DisentanglementView
from slotlab.train.loop import train


def make_quantiser(**overrides) -> SlotQuantiser:
    kwargs = dict(slot_dim=12, num_variables=3, codebook_size=5, code_dim=4, tau_start=1.0, tau_end=0.1,
                  anneal_steps=10, hard_after=10)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return SlotQuantiser(**kwargs)


# ------------------------------------------------------------------------------------------------ quantiser
def test_straight_through_samples_are_one_hot_and_gradients_reach_the_codebooks():
    quantiser = make_quantiser().train()
    slots = torch.randn(2, 4, 12, requires_grad=True)
    out = quantiser(slots, step=10)  # step >= hard_after: hard samples
    ones = torch.ones(2, 4, 3)
    torch.testing.assert_close(out.weights.sum(-1), ones)
    torch.testing.assert_close(out.weights.max(-1).values, ones)  # exactly one 1 per variable, the rest 0
    assert ((out.weights == 0) | (out.weights == 1)).all()
    torch.testing.assert_close(out.slots, quantiser.slots_from_codes(out.codes))  # forward = the chosen embeddings
    (out.slots**2).sum().backward()
    assert quantiser.codebooks.grad is not None and quantiser.codebooks.grad.abs().sum() > 0
    assert quantiser.to_query.weight.grad.abs().sum() > 0  # straight-through: the logits get gradient too
    assert slots.grad.abs().sum() > 0


def test_soft_samples_before_hard_after_are_not_one_hot():
    quantiser = make_quantiser().train()
    out = quantiser(torch.randn(2, 4, 12), step=0)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(2, 4, 3))
    assert out.weights.max() < 1 and (out.weights > 0).all()  # relaxed: every code gets some weight
    assert out.tau == 1.0


def test_kl_to_uniform_is_zero_for_uniform_logits_and_log_m_for_one_hot():
    uniform = torch.zeros(3, 7)
    torch.testing.assert_close(kl_to_uniform(uniform), torch.zeros(3))
    peaked = torch.full((3, 7), -1e4)
    peaked[:, 2] = 0
    torch.testing.assert_close(kl_to_uniform(peaked), torch.full((3,), math.log(7)))
    q = torch.tensor([0.5, 0.25, 0.25])
    reference = (q * (q / (1 / 3)).log()).sum()  # KL(q || uniform) written out
    torch.testing.assert_close(kl_to_uniform(q.log()), reference)


def test_quantiser_kl_is_zero_when_its_logits_are_uniform():
    quantiser = make_quantiser().train()
    with torch.no_grad():
        quantiser.to_query.weight.zero_()  # every logit is 0
    out = quantiser(torch.randn(2, 4, 12), step=3)
    assert out.kl.shape == ()
    assert abs(float(out.kl.detach())) < 1e-6
    out = make_quantiser().train()(torch.randn(2, 4, 12), step=3)
    assert 0 < float(out.kl.detach()) <= 3 * math.log(5)  # summed over the 3 variables


def test_temperature_is_annealed_exponentially():
    assert gumbel_temperature(0, 1.0, 0.1, 100) == pytest.approx(1.0)
    assert gumbel_temperature(50, 1.0, 0.1, 100) == pytest.approx(0.1**0.5)
    assert gumbel_temperature(100, 1.0, 0.1, 100) == pytest.approx(0.1)
    assert gumbel_temperature(10_000, 1.0, 0.1, 100) == pytest.approx(0.1)
    taus = [gumbel_temperature(step, 1.0, 0.1, 100) for step in range(0, 120, 10)]
    assert all(a > b for a, b in zip(taus[:10], taus[1:11]))


def test_eval_mode_uses_the_argmax_code():
    quantiser = make_quantiser().eval()
    slots = torch.randn(2, 4, 12)
    first, second = quantiser(slots, step=0), quantiser(slots, step=0)
    torch.testing.assert_close(first.codes, first.logits.argmax(-1))
    torch.testing.assert_close(first.slots, second.slots)  # no sampling noise
    torch.testing.assert_close(first.slots, quantiser.slots_from_codes(first.codes))


def test_slots_from_codes_rejects_codes_out_of_range_and_missing_positions():
    quantiser = make_quantiser(position_dim=2)
    with pytest.raises(ValueError, match="codes must lie in"):
        quantiser.slots_from_codes(torch.full((1, 2, 3), 5), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="position"):
        quantiser(torch.randn(1, 2, 12))
    out = quantiser.eval()(torch.randn(1, 2, 12), positions=torch.rand(1, 2, 2))
    assert out.slots.shape == (1, 2, 12)


def test_attention_centroids_find_the_attended_pixel():
    attn = torch.zeros(1, 2, 4 * 5)  # h = 4, w = 5
    attn[0, 0, 1 * 5 + 4] = 1.0  # row 1, column 4
    attn[0, 1] = 1.0  # everywhere: the centre
    centres = attention_centroids(attn, (4, 5))
    torch.testing.assert_close(centres[0, 0], torch.tensor([1.0, 1 / 3]))
    torch.testing.assert_close(centres[0, 1], torch.tensor([0.5, 0.5]))


def test_bad_quantiser_settings_are_user_errors(capsys, tmp_path):
    config = apply_overrides(get_preset("vqsa-smoke"), ["vq.codebook_size=1"])
    with pytest.raises(UserError, match="vq.codebook_size=1"):
        build_quantiser(config)
    code, _, err = run(capsys, "train", "--preset", "vqsa-smoke", "--set", "vq.tau_end=0", "--out",
                       str(tmp_path / "run"))
    assert code == 2
    assert_one_error_line(err, "vq.tau_end")
    assert not (tmp_path / "run").exists()
    code, _, err = run(capsys, "train", "--preset", "smoke", "--set", "model.quantiser=vqq", "--out",
                       str(tmp_path / "run"))
    assert code == 2
    assert_one_error_line(err, "model.quantiser", "vqq")


# ------------------------------------------------------------------------------------------------ autoencoder
def test_vq_autoencoder_outputs_codes_and_encode_gives_the_quantised_slots():
    config = get_preset("vqsa-smoke")
    torch.manual_seed(0)
    model = build_model(config).eval()
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    out = model(image)
    k, vq = config.model.num_slots, config.vq
    assert out.codes.shape == (2, k, vq.num_variables) and out.codes.dtype == torch.int64
    assert out.code_logits.shape == (2, k, vq.num_variables, vq.codebook_size)
    assert out.positions.shape == (2, k, 2)
    torch.manual_seed(1)
    grouped, _ = model.encode(image)
    torch.testing.assert_close(grouped.slots, out.slots)  # compose / mix see the slots the decoder sees
    torch.testing.assert_close(model.decode(out.slots).recon, out.recon)
    loss, logs = model.train().compute_loss({"image": image}, step=0)
    assert {"mse", "kl", "tau"} <= set(logs)
    torch.testing.assert_close(loss, logs["mse"] + vq.beta * logs["kl"])


def test_vq_preset_without_init_run_trains_everything_end_to_end():
    model = build_model(get_preset("vqsa-sprites"))  # freeze_grouping=true applies to vq.init_run's weights only
    assert all(p.requires_grad for p in model.parameters())


def test_plain_autoencoder_has_no_quantiser():
    model = build_model(get_preset("smoke")).eval()
    out = model(torch.zeros(1, 3, 16, 16))
    assert model.quantiser is None and out.codes is None and out.kl is None
    assert not any(name.startswith("quantiser.") for name in model.state_dict())
    _, logs = model.compute_loss({"image": torch.zeros(1, 3, 16, 16)})
    assert set(logs) == {"mse"}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A plain (continuous slots) smoke run, one step."""
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    train(apply_overrides(get_preset("smoke"), ["train.steps=1"]), run_dir)
    return run_dir


def test_two_stage_run_starts_from_a_plain_run_and_freezes_the_grouping(plain_run, tmp_path, capsys):
    plain = plain_run
    config = apply_overrides(get_preset("vqsa-smoke"), [f"vq.init_run={plain}", "vq.freeze_grouping=true",
                                                        "train.steps=1"])
    trainer = train(config, tmp_path / "vq")
    base = torch.load(plain / "checkpoints" / "last.pt", weights_only=True)["model"]
    weights = trainer.model.state_dict()
    for name in ("encoder.cnn.0.weight", "grouping.to_q.weight"):  # frozen: still the plain run's weights
        torch.testing.assert_close(weights[name], base[name])
    assert not trainer.model.decoder.net[0].weight.equal(base["decoder.net.0.weight"])  # trained on
    assert all(not p.requires_grad for p in trainer.model.grouping.parameters())
    capsys.readouterr()  # the progress bars of the runs above
    code, _, err = run(capsys, "train", "--preset", "vqsa-smoke", "--set", f"vq.init_run={tmp_path / 'nope'}",
                       "--out", str(tmp_path / "bad"))
    assert code == 2
    assert_one_error_line(err, "vq.init_run", "nope")
    code, _, err = run(capsys, "train", "--preset", "vqsa-smoke", "--set", f"vq.init_run={plain}",
                       "--set", "model.slot_dim=8", "--out", str(tmp_path / "bad2"))
    assert code == 2
    assert_one_error_line(err, "vq.init_run")


# ------------------------------------------------------------------------------------------------ editing
@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    """vqsa-smoke trained for 12 steps (16x16 sprites, K = 3, 2 variables x 4 codes)."""
    run_dir = tmp_path_factory.mktemp("vq") / "run"
    train(apply_overrides(get_preset("vqsa-smoke"), ["train.steps=12", "train.val_every=12", "train.ckpt_every=12",
                                                     "train.log_every=4", "vq.anneal_steps=10",
                                                     "vq.hard_after=8"]), run_dir)
    return run_dir


def test_editing_a_variable_changes_that_slot_most(vq_run):
    from slotlab.tasks import load_trained_model

    config, model = load_trained_model(vq_run, "best", "cpu")
    dataset = build_dataset(config.data, "val")
    num_codes, wins, trials = model.quantiser.codebook_size, 0, 0
    for index in range(3):
        image = to_model_batch(dataset.batch(np.array([index])), "cpu")["image"]
        for slot in range(config.model.num_slots):
            for variable in range(model.quantiser.num_variables):
                torch.manual_seed(0)
                before, edited = decode_with_codes(model, image, slot, variable, list(range(num_codes)))
                effect = edit_effect(before, edited)["layer"]  # [M, K]
                others = torch.cat([effect[:, :slot], effect[:, slot + 1:]], dim=1).amax(dim=1)  # [M]
                changed = edited.recon.sub(before.recon).abs().amax(dim=(1, 2, 3)) > 1e-6  # codes that do something
                wins += int((effect[changed, slot] > others[changed]).sum())
                trials += int(changed.sum())
    assert trials > 0
    assert wins == trials  # every edit changed the edited slot's decoded content more than any other slot's


def test_edit_command_saves_before_after_and_every_code(vq_run, capsys):
    code, out, _ = run(capsys, "edit", str(vq_run), "--image", "1", "--slot", "2", "--variable", "1", "--code", "3",
                       "--device", "cpu")
    assert code == 0
    path = vq_run / "edit" / "image1_slot2_var1_code3.png"
    assert out.strip() == str(path) and path.stat().st_size > 1000
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["slot"] == 2 and record["code"] == 3 and len(record["layer_change"]) == 3
    assert record["codes_before"][2][1] == record["code_before"]


@pytest.mark.parametrize("option, value, fragment", [
    ("--slot", "3", "slot 3"), ("--variable", "2", "variable 2"), ("--code", "4", "code 4"),
    ("--image", "8", "image 8"), ("--slot", "-1", "slot -1"),
])
def test_edit_rejects_indices_out_of_range(vq_run, capsys, option, value, fragment):
    args = {"--image": "0", "--slot": "0", "--variable": "0", "--code": "0", option: value}
    code, _, err = run(capsys, "edit", str(vq_run), *[item for pair in args.items() for item in pair],
                       "--device", "cpu")
    assert code == 2
    assert_one_error_line(err, fragment, "out of range")


def test_edit_needs_a_vq_run(plain_run, tmp_path, capsys):
    capsys.readouterr()
    code, _, err = run(capsys, "edit", str(plain_run), "--image", "0", "--slot", "0", "--variable", "0", "--code", "0")
    assert code == 2
    assert_one_error_line(err, "no discrete slot codes", "quantiser")
    code, _, err = run(capsys, "edit", str(tmp_path / "missing"), "--image", "0", "--slot", "0", "--variable", "0",
                       "--code", "0")
    assert code == 2
    assert_one_error_line(err, "missing")


# ------------------------------------------------------------------------------------------------ disentanglement
def test_hungarian_matching_follows_the_masks_not_the_slot_order():
    true = torch.zeros(1, 4, 4, dtype=torch.long)
    true[0, :2, :2] = 1
    true[0, 2:, 2:] = 2
    pred = torch.zeros(1, 3, 4, 4)
    pred[0, 2] = (true[0] == 1).float()  # slot 2 is object 1
    pred[0, 0] = (true[0] == 2).float()  # slot 0 is object 2
    pred[0, 1] = (true[0] == 0).float()  # slot 1 is the background
    image, slot, row, iou = match_slots_to_objects(pred, true)
    assert sorted(zip(row.tolist(), slot.tolist())) == [(0, 2), (1, 0)]
    np.testing.assert_allclose(iou, 1.0)
    pred[0, 0, 2:, 2:] = 0
    pred[0, 0, 3, 3] = 1  # slot 0 now covers 1 of object 2's 4 pixels: IoU 0.25, dropped
    pred[0, 1, 2:, 2:] = 1
    pred[0, 1, 3, 3] = 0
    _, slot, row, _ = match_slots_to_objects(pred, true, min_iou=0.5)
    assert row.tolist() == [0] and slot.tolist() == [2]


class CodesFromProperties(torch.nn.Module):
    """A stand-in VQ-SA model: perfect masks; variable 0 is the object's colour, variable 1 is noise."""

    def __init__(self, dataset: ArrayDataset, num_slots: int):
        super().__init__()
        self.dataset, self.num_slots = dataset, num_slots
        self.quantiser = SimpleNamespace(num_variables=2, codebook_size=8)
        self.rng = np.random.default_rng(0)
        self.calls = 0

    def forward(self, image: torch.Tensor):
        indices = np.arange(self.calls, self.calls + image.shape[0])
        self.calls += image.shape[0]
        ids = torch.from_numpy(self.dataset.masks[indices]).long()  # [B, H, W]
        order = torch.from_numpy(self.rng.permutation(self.num_slots))  # slot k shows object order[k]
        masks = (ids[:, None] == order[None, :, None, None]).float()  # [B, K, H, W]
        props = self.dataset.extras["obj_props"][indices]  # [B, M, 3]
        codes = torch.zeros(image.shape[0], self.num_slots, 2, dtype=torch.long)
        for k, obj in enumerate(order.tolist()):
            if obj > 0:
                codes[:, k, 0] = torch.from_numpy(np.maximum(props[:, obj - 1, 1], 0))  # colour
        codes[..., 1] = torch.from_numpy(self.rng.integers(0, 8, size=(image.shape[0], self.num_slots)))
        return SimpleNamespace(masks=masks, codes=codes)


def _disentanglement(model, dataset: ArrayDataset, count: int, batch_size: int, out_dir):
    """The disentanglement view of ``model`` over the first ``count`` images, as ``slotlab eval`` computes it."""
    view = DisentanglementView(model, dataset.info, out_dir)
    for indices, batch in dataset.batches(count, batch_size):
        view.update(batch, indices, model(batch["image"]))
    return view.summary()


def test_disentanglement_finds_the_variable_that_carries_colour(tmp_path):
    config = get_preset("sprites-cpu").data
    from dataclasses import replace

    dataset = build_dataset(replace(config, num_val=60, max_objects=4), "val")
    model = CodesFromProperties(dataset, num_slots=5)
    metrics = _disentanglement(model, dataset, 60, 16, tmp_path)
    objects = int((dataset.extras["obj_props"][..., 0] >= 0).sum())
    assert metrics["disent_objects"] == objects and metrics["disent_matched"] == objects
    assert metrics["nmi_v0_colour"] == pytest.approx(1.0)
    assert metrics["nmi_colour"] == pytest.approx(1.0)
    assert metrics["nmi_v1_colour"] < 0.2 and metrics["nmi_chance"] < 0.2  # noise: near the chance level
    props = dataset.extras["obj_props"]
    shapes = props[props[..., 0] >= 0][:, 0]
    colours = props[props[..., 0] >= 0][:, 1]
    assert metrics["nmi_v0_shape"] == pytest.approx(normalized_mutual_info_score(shapes, colours))
    assert metrics["codes_used_v0"] == len(np.unique(colours))
    for name in ("disentanglement_v0.png", "disentanglement_v1.png", "disentanglement_all.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_eval_of_a_vq_run_adds_the_disentanglement_view(vq_run, capsys):
    code, out, _ = run(capsys, "eval", str(vq_run), "--device", "cpu")
    assert code == 0
    metrics = json.loads((vq_run / "eval" / "val-best" / "metrics.json").read_text())
    assert metrics["disent_objects"] > 0
    if metrics["disent_matched"]:  # a 12-step smoke model may not cover any object well enough to match it
        assert 0 <= metrics["nmi_colour"] <= 1
        assert (vq_run / "eval" / "val-best" / "disentanglement_all.png").exists()
    else:
        assert metrics["disentanglement"].startswith("skipped")


def test_disentanglement_skips_datasets_without_properties(tmp_path):
    dataset = ArrayDataset(np.zeros((2, 16, 16, 3), dtype=np.uint8))
    model = build_model(get_preset("vqsa-smoke")).eval()
    metrics = _disentanglement(model, dataset, 2, 2, tmp_path)
    assert metrics["disentanglement"].startswith("skipped")
