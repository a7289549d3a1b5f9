"""SLATE (issue 19): the dVAE's tokens, a causal transformer decoder with a key/value cache, and SLATE runs that go
through eval, report, compose and mix like any slot model."""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import run
from slotlab.config import apply_overrides, get_preset
from slotlab.generate.compose import compose
from slotlab.models import DiscreteVAE, Slate
from slotlab.runs import read_metrics
from slotlab.train.loop import train

SHORT = ["train.steps=2", "train.val_every=2", "data.num_train=8", "data.num_val=4"]


def _slate(**slate) -> Slate:
    config = get_preset("slate-smoke")
    overrides = [f"slate.{key}={value}" for key, value in slate.items()]
    torch.manual_seed(0)
    return Slate(apply_overrides(config, overrides)).eval()


def test_dvae_straight_through_tokens_are_one_hot_and_gradients_reach_the_encoder():
    torch.manual_seed(0)
    dvae = DiscreteVAE(get_preset("dvae-smoke"))
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    z = dvae.relaxed_tokens(image, tau=0.5, hard=True)  # [B, V, 4, 4]
    assert z.shape == (2, 16, 4, 4)
    assert torch.equal(z.sum(1), torch.ones(2, 4, 4)) and set(z.unique().tolist()) <= {0.0, 1.0}
    ((dvae.decoder(z) - image) ** 2).mean().backward()
    assert dvae.encoder[0].weight.grad is not None and dvae.encoder[0].weight.grad.abs().sum() > 0
    assert torch.equal(dvae.tokens(image), dvae.logits(image).argmax(1))


def test_dvae_temperature_anneals_from_start_to_end():
    dvae = DiscreteVAE(apply_overrides(get_preset("dvae-smoke"), ["slate.tau_steps=100"]))
    taus = [dvae.temperature(step) for step in (0, 50, 100, 1000)]
    assert taus[0] == pytest.approx(1.0) and taus[2] == pytest.approx(0.1) and taus[3] == pytest.approx(0.1)
    assert taus[0] > taus[1] > taus[2]


def test_the_transformer_is_causal():
    model = _slate()
    tokens = torch.randint(0, 16, (2, 16))
    slots = torch.randn(2, 3, 16)
    changed = tokens.clone()
    t = 7
    changed[:, t] = (tokens[:, t] + 1) % 16
    before, after = model.next_token_logits(tokens, slots), model.next_token_logits(changed, slots)
    assert torch.allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-6)  # predictions of tokens <= t
    assert not torch.allclose(before[:, t + 1], after[:, t + 1])  # token t + 1 sees token t


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_key_value_cache_gives_the_same_tokens_and_a_seed_the_same_image(temperature):
    model = _slate()
    slots = torch.randn(2, 3, 16)
    draw = {use_cache: model.sample_tokens(slots, temperature, torch.Generator().manual_seed(3), use_cache)
            for use_cache in (True, False)}
    assert torch.equal(draw[True], draw[False])
    first, again = model.decode(slots, temperature, seed=5).recon, model.decode(slots, temperature, seed=5).recon
    assert first.shape == (2, 3, 16, 16) and torch.equal(first, again)
    if temperature > 0:  # a sampled draw depends on the seed
        assert not torch.equal(draw[True], model.sample_tokens(slots, temperature, torch.Generator().manual_seed(4)))


def test_the_cached_logits_equal_teacher_forcing():
    """Greedy decoding re-scored by teacher forcing picks the same tokens (the cache computes the same logits)."""
    model = _slate()
    slots = torch.randn(2, 3, 16)
    tokens = model.sample_tokens(slots, 0.0)
    assert torch.equal(model.next_token_logits(tokens, slots).argmax(-1), tokens)


@pytest.mark.parametrize("name", ["dvae-smoke", "slate-smoke", "dvae-sprites", "slate-sprites", "dvae-clevrtex",
                                  "slate-clevrtex"])
def test_every_slate_preset_builds_its_model_and_takes_a_loss_step(name):
    config = apply_overrides(get_preset(name), ["slate.dvae_run=", "data.resolution=16", "model.decoder_grid=4"])
    model = DiscreteVAE(config) if config.task == "dvae" else Slate(config)
    loss, _ = model.compute_loss({"image": torch.rand(2, 3, 16, 16) * 2 - 1}, step=0)
    loss.backward()
    assert torch.isfinite(loss)


def test_a_slate_run_goes_through_eval_report_compose_and_mix(tmp_path, capsys, monkeypatch):
    dvae_run, slate_run = tmp_path / "dvae", tmp_path / "slate"
    train(apply_overrides(get_preset("dvae-smoke"), SHORT), dvae_run)
    train(apply_overrides(get_preset("slate-smoke"), [*SHORT, f"slate.dvae_run={dvae_run}"]), slate_run)
    config = json.loads((slate_run / "config.json").read_text())
    assert config["slate"]["vocab_size"] == 16  # copied from the dVAE run
    validation = [r for r in read_metrics(slate_run) if r["split"] == "val"]
    assert validation and all("fg_ari" in r and "mbo" in r for r in validation)  # masks scored while training
    monkeypatch.chdir(tmp_path)
    for command in (["eval", str(dvae_run), "--device", "cpu"], ["eval", str(slate_run), "--device", "cpu"],
                    ["report", str(slate_run)],
                    ["mix", str(slate_run), "--a", "0", "--b", "1", "--take-from-b", "0", "--device", "cpu"]):
        code, _, err = run(capsys, *command)
        assert code == 0, (command, err)
    metrics = json.loads(next((slate_run / "eval").glob("*/metrics.json")).read_text())
    assert {"fg_ari", "ari", "mbo", "mse"} <= metrics.keys()
    assert compose(slate_run, num_images=4, device="cpu", fid=False)["num_images"] == 4


def test_a_dvae_run_is_refused_as_a_slate_runs_dvae_when_it_is_not_one(tmp_path, capsys):
    train(apply_overrides(get_preset("smoke"), SHORT), tmp_path / "sa")
    code, _, err = run(capsys, "train", "--preset", "slate-smoke", "--set", f"slate.dvae_run={tmp_path / 'sa'}",
                       "--out", str(tmp_path / "slate"))
    assert code == 2 and "not a dvae run" in err
    assert not (tmp_path / "slate").exists()
