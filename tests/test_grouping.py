"""Every grouping module behind one interface: shapes, invariances, slot initialisations, and the mixture's E-step."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from slotlab.config import ModelConfig, apply_overrides, get_preset
from slotlab.errors import UserError
from slotlab.models import GROUPINGS, build_grouping
from slotlab.models.slot_mixture import SlotMixture, gaussian_log_likelihood, log_responsibilities
from slotlab.models.soft_kmeans import SoftKMeans, soft_kmeans_step
from slotlab.tasks import build_model

NAMES = GROUPINGS.names()
FRAMED = ("invariant_slot_attention",)  # slots with frames: inputs on a grid, K fixed by the learned frames
SET_NAMES = [name for name in NAMES if name not in FRAMED]  # order-free over the inputs
GRID = (4, 5)  # the inputs below are 20 tokens on a 4 x 5 grid


def small_config(grouping: str, slot_init: str = "gaussian") -> ModelConfig:
    return ModelConfig(input_dim=12, num_slots=4, slot_dim=16, slot_hidden_dim=24, iters=3, grouping=grouping,
                       slot_init=slot_init)


def test_all_three_groupings_are_registered():
    assert {"slot_attention", "invariant_slot_attention", "slot_mixture", "soft_kmeans"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_output_contract(name):
    torch.manual_seed(0)
    module = build_grouping(small_config(name))
    out = module(torch.randn(3, 20, 12), feature_size=GRID)
    assert out.slots.shape == (3, 4, 16)
    assert out.attn.shape == (3, 4, 20)
    assert len(out.attn_per_iter) == 3
    torch.testing.assert_close(out.attn.sum(dim=1), torch.ones(3, 20))
    if name not in FRAMED:
        assert module(torch.randn(2, 20, 12), num_slots=6).slots.shape == (2, 6, 16)  # Gaussian init: any K


@pytest.mark.parametrize("name", NAMES)
def test_test_iters_apply_outside_training_only(name):
    config = dataclasses.replace(small_config(name), test_iters=7)
    module = build_grouping(config)
    inputs = torch.randn(2, 20, 12)
    assert len(module(inputs, feature_size=GRID).attn_per_iter) == 3  # training: T = iters
    module.eval()
    torch.manual_seed(0)
    out = module(inputs, feature_size=GRID)
    assert len(out.attn_per_iter) == 7  # validation, eval, generation: T = test_iters
    module.test_iters = 0
    torch.manual_seed(0)
    assert not torch.allclose(module(inputs, feature_size=GRID).slots, out.slots)  # the 7 iterations moved them


@pytest.mark.parametrize("name", SET_NAMES)
def test_permuting_inputs_keeps_slots_and_permutes_attention(name):
    module = build_grouping(small_config(name)).eval()
    inputs = torch.randn(2, 30, 12)
    perm = torch.randperm(30)
    torch.manual_seed(1)  # the same initial slot noise for both calls
    out = module(inputs)
    torch.manual_seed(1)
    out_perm = module(inputs[:, perm])
    torch.testing.assert_close(out_perm.slots, out.slots, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_perm.attn, out.attn[:, :, perm], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_permuting_initial_slots_permutes_output_slots(name):
    torch.manual_seed(0)
    module = build_grouping(small_config(name, "learned")).eval()
    inputs = torch.randn(2, 25, 12)
    out = module(inputs, feature_size=(5, 5))
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        module.init.slots.copy_(module.init.slots[:, perm])
        if name in FRAMED:  # a slot's initial frame goes with it
            module.init_position.copy_(module.init_position[:, perm])
    out_perm = module(inputs, feature_size=(5, 5))
    torch.testing.assert_close(out_perm.slots, out.slots[:, perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_perm.attn, out.attn[:, perm], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_bo_qsa_gives_learned_queries_a_straight_through_gradient(name):
    torch.manual_seed(0)
    plain = build_grouping(small_config(name, "learned"))
    bo_qsa = build_grouping(small_config(name, "bo_qsa"))
    bo_qsa.load_state_dict(plain.state_dict())  # same weights: bo_qsa = learned queries + the gradient trick
    inputs = torch.randn(2, 20, 12)
    out_plain, out_bo = plain(inputs, feature_size=GRID), bo_qsa(inputs, feature_size=GRID)
    torch.testing.assert_close(out_bo.slots, out_plain.slots)  # the trick changes gradients only
    out_bo.slots.pow(2).sum().backward()
    out_plain.slots.pow(2).sum().backward()
    grad_bo, grad_plain = bo_qsa.init.slots.grad, plain.init.slots.grad
    assert grad_bo is not None and grad_bo.abs().sum() > 0
    assert not torch.allclose(grad_bo, grad_plain)  # the earlier iterations are cut out of the gradient


@pytest.mark.parametrize("name", NAMES)
def test_implicit_grad_keeps_outputs_and_sends_the_last_iteration_gradient_to_mu_and_sigma(name):
    torch.manual_seed(0)
    plain = build_grouping(small_config(name))
    implicit = build_grouping(dataclasses.replace(small_config(name), implicit_grad=True))
    implicit.load_state_dict(plain.state_dict())
    inputs = torch.randn(2, 20, 12)
    torch.manual_seed(1)
    out_plain = plain(inputs, feature_size=GRID)
    torch.manual_seed(1)  # the same slot noise
    out_implicit = implicit(inputs, feature_size=GRID)
    torch.testing.assert_close(out_implicit.slots, out_plain.slots)  # only the gradient changes
    out_plain.slots.pow(2).sum().backward()
    out_implicit.slots.pow(2).sum().backward()
    for name_ in ("mu", "log_sigma"):
        grad, grad_plain = getattr(implicit.init, name_).grad, getattr(plain.init, name_).grad
        assert grad is not None and grad.abs().sum() > 0, name_
        assert not torch.allclose(grad, grad_plain), name_  # the first T-1 iterations are out of the gradient


def test_bo_qsa_gradient_equals_one_iteration_from_the_converged_slots():
    """Jia et al. 2023: d loss / d queries = d loss / d (input of the last iteration), the identity Jacobian."""
    torch.manual_seed(0)
    from slotlab.models import SlotAttention

    sa = SlotAttention(num_slots=3, dim=8, iters=3, hidden_dim=16, slot_init="learned", detach_last=True)
    inputs = torch.randn(1, 10, 8)
    sa(inputs).slots.sum().backward()
    # Reference: run T-1 iterations without gradient, then one iteration from a leaf tensor holding those slots.
    with torch.no_grad():
        k, v = sa.to_kv(sa.norm_inputs(inputs)).chunk(2, dim=-1)
        slots = sa.init(1)
        for _ in range(2):
            slots, _ = sa.step(slots, k, v)
    leaf = slots.clone().requires_grad_(True)
    k, v = sa.to_kv(sa.norm_inputs(inputs)).chunk(2, dim=-1)
    sa.step(leaf, k, v)[0].sum().backward()
    torch.testing.assert_close(sa.init.slots.grad, leaf.grad)


def test_slot_init_names_are_checked_through_the_cli(tmp_path, capsys):
    from slotlab.cli import main

    code = main(["train", "--preset", "smoke", "--set", "model.grouping=slot_mixtures", "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.grouping='slot_mixtures' is not one of the known values")
    assert "did you mean 'slot_mixture'" in err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ slot mixture
def test_log_likelihood_equals_torch_distributions():
    torch.manual_seed(0)
    points, mu, log_sigma = torch.randn(2, 7, 5), torch.randn(2, 3, 5), 0.3 * torch.randn(2, 3, 5)
    expected = torch.distributions.Normal(mu.unsqueeze(2), log_sigma.exp().unsqueeze(2)).log_prob(
        points.unsqueeze(1)).sum(-1)  # [B, K, N]
    torch.testing.assert_close(gaussian_log_likelihood(points, mu, log_sigma), expected, atol=1e-4, rtol=1e-4)


def test_responsibilities_sum_to_one_and_stay_finite_far_from_every_slot():
    torch.manual_seed(0)
    mu, log_sigma = torch.randn(1, 4, 8), torch.full((1, 4, 8), -2.0)
    far = torch.randn(1, 6, 8) + 1e3  # every likelihood underflows: exp(-1e7) == 0 in float32
    log_lik = gaussian_log_likelihood(far, mu, log_sigma)
    log_pi = torch.full((1, 4, 1), -math.log(4))
    naive = log_lik.exp() * log_pi.exp()
    assert torch.isnan(naive / naive.sum(dim=1, keepdim=True)).all()  # what the pseudocode would do
    resp = log_responsibilities(log_lik, log_pi).exp()
    assert torch.isfinite(resp).all()
    torch.testing.assert_close(resp.sum(dim=1), torch.ones(1, 6))
    # The nearest component still wins, as exact arithmetic says.
    nearest = ((far.unsqueeze(1) - mu.unsqueeze(2)) ** 2).sum(-1).argmin(dim=1)  # [1, N]
    assert torch.equal(resp.argmax(dim=1), nearest)


def test_mixing_weights_enter_the_e_step():
    log_lik = torch.zeros(1, 2, 3)  # both components explain every point equally well
    log_pi = torch.log(torch.tensor([0.8, 0.2])).view(1, 2, 1)
    torch.testing.assert_close(log_responsibilities(log_lik, log_pi).exp()[0, :, 0], torch.tensor([0.8, 0.2]))


def test_slot_mixture_module_is_finite_for_huge_inputs_and_gets_gradients():
    torch.manual_seed(0)
    smm = SlotMixture(num_slots=4, dim=8, hidden_dim=16, input_dim=6)
    inputs = (torch.randn(2, 15, 6) * 1e4).requires_grad_(True)
    out = smm(inputs)
    assert torch.isfinite(out.slots).all() and torch.isfinite(out.attn).all()
    torch.testing.assert_close(out.attn.sum(dim=1), torch.ones(2, 15))
    out.slots.sum().backward()
    assert torch.isfinite(inputs.grad).all()
    assert smm.init.mu.grad.abs().sum() > 0 and smm.to_q.weight.grad.abs().sum() > 0


def test_slot_mixture_step_matches_a_direct_em_computation():
    """The fused E- and M-steps equal the slides' pseudocode written out with [B, K, N, D] tensors."""
    torch.manual_seed(0)
    smm = SlotMixture(num_slots=3, dim=4, hidden_dim=8, eps=0.0)
    mu, log_sigma = torch.randn(2, 3, 4), 0.2 * torch.randn(2, 3, 4)
    log_pi = torch.log_softmax(torch.randn(2, 3, 1), dim=1)
    k, v = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    new_mu, new_log_sigma, new_log_pi, resp = smm.step(mu, log_sigma, log_pi, k, v)

    q = smm.to_q(smm.norm_mu(mu))  # [B, K, D]
    density = torch.distributions.Normal(q.unsqueeze(2), log_sigma.exp().unsqueeze(2))
    scores = density.log_prob(k.unsqueeze(1)).sum(-1) / smm.temperature + log_pi  # [B, K, N]
    expected_resp = scores.exp() / scores.exp().sum(dim=1, keepdim=True)
    weights = expected_resp / expected_resp.sum(dim=-1, keepdim=True)
    updates = torch.einsum("bkn,bnd->bkd", weights, v)
    expected_mu = smm.gru(updates.reshape(-1, 4), mu.reshape(-1, 4)).reshape(2, 3, 4)
    expected_mu = expected_mu + smm.mlp(smm.norm_mlp(expected_mu))
    spread = (weights.unsqueeze(-1) * (v.unsqueeze(1) - expected_mu.unsqueeze(2)) ** 2).sum(2)  # [B, K, D]
    torch.testing.assert_close(resp, expected_resp, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(new_mu, expected_mu, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(new_log_sigma, 0.5 * spread.log(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(new_log_pi.exp(), expected_resp.mean(dim=-1, keepdim=True), atol=1e-6, rtol=1e-5)
    assert smm.to_slot.in_features == 8  # the slot is read from concat(mu, log_sigma)


# ------------------------------------------------------------------------------------------------ soft k-means
def test_soft_kmeans_at_low_temperature_finds_the_same_centres_as_sklearn():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(c, 0.3, size=(40, 2)) for c in ((0, 0), (4, 0), (0, 4))]).astype(np.float32)
    init = np.array([[0.5, 0.5], [3.0, 1.0], [1.0, 3.0]], dtype=np.float32)
    expected = KMeans(n_clusters=3, init=init, n_init=1).fit(blobs).cluster_centers_
    centres = torch.from_numpy(init)[None]
    for _ in range(20):
        centres, weights = soft_kmeans_step(torch.from_numpy(blobs)[None], centres, temperature=1e-3)
    np.testing.assert_allclose(centres[0].numpy(), expected, atol=1e-4)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(1, 120))


def test_soft_kmeans_module_has_no_learned_update():
    km = SoftKMeans(num_slots=3, dim=16, input_dim=16)
    assert [name for name, _ in km.named_parameters()] == ["init.mu", "init.log_sigma"]  # only the initialisation
    assert not any(isinstance(m, torch.nn.GRUCell) for m in km.modules())


@pytest.mark.parametrize("name", ["slot_mixture", "soft_kmeans"])
def test_autoencoder_trains_one_step_with_each_grouping(name):
    config = apply_overrides(get_preset("smoke"), [f"model.grouping={name}", "model.slot_init=bo_qsa"])
    model = build_model(config)
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1}
    loss, _ = model.compute_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.grouping.init.slots.grad.abs().sum() > 0
    assert dataclasses.is_dataclass(model(batch["image"]))


# ------------------------------------------------------------------------------------------------ invariant SA
def test_invariant_slot_attention_frames_are_the_attention_mean_and_spread():
    from slotlab.models.invariant_slot_attention import InvariantSlotAttention, frame_of, grid_positions

    grid = grid_positions(4, 6)  # [24, 2]
    assert grid.shape == (24, 2) and torch.allclose(grid[0], torch.tensor([-5 / 6, -0.75]))
    weights = torch.zeros(1, 2, 24)
    weights[0, 0, [0, 1]] = 0.5  # two neighbours on the top row
    weights[0, 1] = 1 / 24  # everything
    position, scale = frame_of(weights, grid)
    torch.testing.assert_close(position[0, 0], (grid[0] + grid[1]) / 2)
    torch.testing.assert_close(position[0, 1], torch.zeros(2), atol=1e-6, rtol=0)
    # spread added in quadrature to the smallest scale (0.02): x spans two pixels of width 2 / 6, y one row
    assert scale[0, 0, 0] == pytest.approx(math.hypot(1 / 6, 0.02)) and scale[0, 0, 1] == pytest.approx(0.02)
    torch.manual_seed(0)
    isa = InvariantSlotAttention(num_slots=3, dim=16, iters=2, input_dim=8)
    out = isa(torch.randn(2, 24, 8), feature_size=(4, 6))
    assert out.slots.shape == (2, 3, 16) and out.attn.shape == (2, 3, 24)
    assert out.positions.shape == out.scales.shape == (2, 3, 2) and (out.scales > 0).all()
    torch.testing.assert_close(out.attn.sum(dim=1), torch.ones(2, 24))


def test_invariant_slot_attention_step_is_the_papers_keys_and_values_of_inputs_seen_from_each_frame():
    """The step never forms the [B, K, N, D_in] inputs seen from each slot's frame; check it against them."""
    from slotlab.models.invariant_slot_attention import InvariantSlotAttention, frame_of, grid_positions

    torch.manual_seed(0)
    isa = InvariantSlotAttention(num_slots=3, dim=16, input_dim=8)
    slots, inputs, grid = torch.randn(2, 3, 16), torch.randn(2, 24, 8), grid_positions(4, 6)
    position, scale = torch.rand(2, 3, 2) * 2 - 1, torch.rand(2, 3, 2) + 0.1
    balance = torch.randn(2, 3, 1)
    new_slots, new_position, new_scale, attn = isa.step(slots, position, scale, inputs, grid, balance)

    rel = (grid[None, None] - position[:, :, None]) / scale[:, :, None]  # [B, K, N, 2]
    seen = inputs[:, None] + isa.phi(rel)  # [B, K, N, D_in]
    keys, values = isa.to_k(seen), isa.to_v(seen)  # [B, K, N, D] each
    q = isa.to_q(isa.norm_slots(slots)) * isa.scale  # [B, K, D]
    expected_attn = (torch.einsum("bkd,bknd->bkn", q, keys) + balance).softmax(dim=1)  # [B, K, N]
    weights = (expected_attn + isa.eps) / (expected_attn + isa.eps).sum(dim=-1, keepdim=True)
    updates = torch.einsum("bkn,bknd->bkd", weights, values)  # [B, K, D]
    expected_slots = isa.gru(updates.reshape(-1, 16), slots.reshape(-1, 16)).reshape(2, 3, 16)
    expected_slots = expected_slots + isa.mlp(isa.norm_mlp(expected_slots))
    torch.testing.assert_close(attn, expected_attn, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new_slots, expected_slots, rtol=1e-4, atol=1e-5)
    expected_position, expected_scale = frame_of(weights, grid)
    torch.testing.assert_close(new_position, expected_position)
    torch.testing.assert_close(new_scale, expected_scale)


def test_slot_balance_under_invariant_slot_attention_reaches_the_logits_from_the_second_iteration():
    from slotlab.models.invariant_slot_attention import InvariantSlotAttention

    torch.manual_seed(0)
    plain = InvariantSlotAttention(num_slots=3, dim=16, iters=2, input_dim=8)
    balanced = InvariantSlotAttention(num_slots=3, dim=16, iters=2, input_dim=8, slot_balance=1.0)
    balanced.load_state_dict(plain.state_dict())
    inputs = torch.randn(2, 24, 8)
    first, second = (isa(inputs, feature_size=(4, 6)) for isa in (plain, balanced))
    torch.testing.assert_close(first.attn_per_iter[0], second.attn_per_iter[0])
    assert not torch.allclose(first.attn, second.attn)
    config = apply_overrides(get_preset("smoke"), ["model.grouping=invariant_slot_attention", "model.slot_balance=1"])
    assert build_model(config).grouping.slot_balance == 1.0


def test_framed_decoder_fast_path_equals_the_plain_one():
    from slotlab.models import SpatialBroadcastDecoder

    torch.manual_seed(0)
    decoder = SpatialBroadcastDecoder(8, 12, channels=6, grid=12, kernel=3, full_res_layers=1, frames=True)
    slots, positions, scales = torch.randn(2, 3, 8), torch.rand(2, 3, 2) * 2 - 1, torch.rand(2, 3, 2) + 0.1
    fast = decoder.decode(slots, positions, scales)
    decoder.factorised = False
    plain = decoder.decode(slots, positions, scales)
    torch.testing.assert_close(fast.recon, plain.recon, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="positions and scales"):
        decoder.decode(slots)


def test_an_autoencoder_with_framed_slots_trains_and_decodes_its_own_slots():
    config = apply_overrides(get_preset("smoke"), ["model.grouping=invariant_slot_attention"])
    model = build_model(config)
    assert isinstance(model.encoder.pos, torch.nn.Identity)  # no absolute position: the frames carry it
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    loss, _ = model.compute_loss({"image": image})
    loss.backward()
    assert model.grouping.init_position.grad is not None and model.decoder.frame_embed.weight.grad is not None
    with torch.no_grad():
        torch.manual_seed(0)  # the same Gaussian slot noise for both passes
        grouped, _ = model.encode(image)
        assert grouped.slots.shape == (2, 3, 16 + 4) == (2, 3, model.slot_size)
        torch.manual_seed(0)
        torch.testing.assert_close(model.decode(grouped.slots).recon, model(image).recon)


@pytest.mark.parametrize("preset", ["vqsa-smoke", "setpred-smoke", "slotdiffusion-smoke"])
def test_framed_slots_are_refused_where_they_are_not_supported_yet(preset):
    with pytest.raises(UserError, match="not available"):
        build_model(apply_overrides(get_preset(preset), ["model.grouping=invariant_slot_attention"]))


def test_the_mahalanobis_e_step_scores_key_distances_scaled_by_a_key_space_sigma_without_log_determinant():
    torch.manual_seed(0)
    smm = SlotMixture(num_slots=3, dim=4, hidden_dim=8, eps=0.0, likelihood="mahalanobis")
    mu, log_sigma = torch.randn(2, 3, 4), 0.2 * torch.randn(2, 3, 4)
    log_pi = torch.log_softmax(torch.randn(2, 3, 1), dim=1)
    k, v = torch.randn(2, 9, 4), torch.randn(2, 9, 4)
    _, _, _, resp = smm.step(mu, log_sigma, log_pi, k, v)
    q = smm.to_q(smm.norm_mu(mu))  # [B, K, D]
    sigma = smm.to_q(smm.norm_sigma(log_sigma)).exp()  # [B, K, D]
    distance = (((k.unsqueeze(1) - q.unsqueeze(2)) / sigma.unsqueeze(2)) ** 2).sum(-1)  # [B, K, N]
    expected = torch.softmax(-distance / smm.temperature + log_pi, dim=1)
    torch.testing.assert_close(resp, expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ decoder frames (SA)
def test_attention_frames_are_the_attention_centre_and_for_centre_a_unit_scale():
    from slotlab.models.autoencoder import attention_frame
    from slotlab.models.invariant_slot_attention import grid_positions

    grid = grid_positions(4, 4)  # [16, 2]
    attn = torch.full((1, 2, 16), 1e-6)
    attn[0, 0, 5] = 1.0  # slot 0 attends to one pixel, slot 1 to a 2x1 pair
    attn[0, 1, [10, 11]] = 1.0
    centre = attention_frame(attn, (4, 4), "centre")
    torch.testing.assert_close(centre["positions"][0, 0], grid[5], atol=1e-4, rtol=0)
    torch.testing.assert_close(centre["positions"][0, 1], (grid[10] + grid[11]) / 2, atol=1e-4, rtol=0)
    assert (centre["scales"] == 1).all()
    spread = attention_frame(attn, (4, 4), "centre_spread")
    torch.testing.assert_close(spread["positions"], centre["positions"])
    assert spread["scales"][0, 1, 0] == pytest.approx(math.hypot(0.25, 0.02), rel=1e-3)  # x spans two pixels


@pytest.mark.parametrize("frame", ["centre", "centre_spread"])
def test_slot_attention_with_decoder_frames_trains_and_decodes_its_own_slots(frame):
    config = apply_overrides(get_preset("smoke"), [f"model.decoder_frame={frame}"])
    model = build_model(config)
    assert not isinstance(model.encoder.pos, torch.nn.Identity)  # Slot Attention keeps the encoder's positions
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    loss, _ = model.compute_loss({"image": image})
    loss.backward()
    assert model.decoder.frame_embed.weight.grad is not None and model.encoder.pos.proj.weight.grad is not None
    with torch.no_grad():
        torch.manual_seed(0)
        grouped, _ = model.encode(image)
        assert grouped.slots.shape == (2, 3, model.slot_size) == (2, 3, 16 + 4)
        torch.manual_seed(0)
        torch.testing.assert_close(model.decode(grouped.slots).recon, model(image).recon)


def test_a_slot_drawn_in_its_centre_frame_moves_with_its_centre():
    from slotlab.models import SpatialBroadcastDecoder

    torch.manual_seed(0)
    decoder = SpatialBroadcastDecoder(8, 16, channels=6, grid=16, kernel=3, full_res_layers=2, frames=True)
    slots, scales = torch.randn(1, 2, 8), torch.ones(1, 2, 2)
    positions = torch.tensor([[[-0.25, 0.0], [0.5, 0.5]]])
    pixel = 2 / 16  # one pixel in [-1, 1] coordinates
    here = decoder.decode(slots, positions, scales).slot_recons[0, 0]  # [3, H, W]
    moved = decoder.decode(slots, positions + torch.tensor([[[2 * pixel, pixel], [0.0, 0.0]]]), scales)
    # two pixels right and one down: the same picture, shifted (away from the borders, where padding differs)
    torch.testing.assert_close(moved.slot_recons[0, 0, :, 5:12, 6:13], here[:, 4:11, 4:11], rtol=1e-4, atol=1e-5)
