"""Shapes, invariances and gradients of the spine's model (Slot Attention autoencoder)."""

from __future__ import annotations

import pytest
import torch

from slotlab.config import apply_overrides, get_preset
from slotlab.errors import UserError
from slotlab.models import SlotAttention, SlotAutoencoder, SpatialBroadcastDecoder, position_grid
from slotlab.tasks import build_model


def test_slot_attention_shapes_and_softmax_over_slots():
    torch.manual_seed(0)
    sa = SlotAttention(num_slots=5, dim=32, iters=3, hidden_dim=64, input_dim=24)
    out = sa(torch.randn(2, 50, 24))
    assert out.slots.shape == (2, 5, 32)
    assert out.attn.shape == (2, 5, 50)
    assert len(out.attn_per_iter) == 3
    torch.testing.assert_close(out.attn.sum(dim=1), torch.ones(2, 50))


def test_number_of_slots_can_change_at_inference_with_gaussian_init():
    sa = SlotAttention(num_slots=4, dim=16)
    assert sa(torch.randn(1, 10, 16), num_slots=9).slots.shape == (1, 9, 16)


def test_learned_init_refuses_another_number_of_slots():
    sa = SlotAttention(num_slots=4, dim=16, slot_init="learned")
    with pytest.raises(ValueError):
        sa(torch.randn(1, 10, 16), num_slots=6)


def test_permuting_initial_slots_permutes_output_slots():
    torch.manual_seed(0)
    sa = SlotAttention(num_slots=6, dim=16, hidden_dim=32).eval()
    inputs = torch.randn(3, 40, 16)
    init = torch.randn(3, 6, 16)
    perm = torch.randperm(6)
    out = sa(inputs, slots=init)
    out_perm = sa(inputs, slots=init[:, perm])
    torch.testing.assert_close(out_perm.slots, out.slots[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_perm.attn, out.attn[:, perm], atol=1e-5, rtol=1e-5)


def test_permuting_inputs_permutes_attention_and_keeps_slots():
    torch.manual_seed(0)
    sa = SlotAttention(num_slots=4, dim=16).eval()
    inputs, init = torch.randn(2, 30, 16), torch.randn(2, 4, 16)
    perm = torch.randperm(30)
    out, out_perm = sa(inputs, slots=init), sa(inputs[:, perm], slots=init)
    torch.testing.assert_close(out_perm.slots, out.slots, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_perm.attn, out.attn[:, :, perm], atol=1e-5, rtol=1e-5)


def test_gradients_reach_mu_and_sigma():
    sa = SlotAttention(num_slots=3, dim=8, hidden_dim=16)
    sa(torch.randn(2, 12, 8)).slots.pow(2).sum().backward()
    assert sa.init.mu.grad is not None and sa.init.mu.grad.abs().sum() > 0
    assert sa.init.log_sigma.grad is not None and sa.init.log_sigma.grad.abs().sum() > 0


def test_bo_qsa_queries_get_gradient():
    sa = SlotAttention(num_slots=3, dim=8, slot_init="learned", detach_last=True)
    sa(torch.randn(2, 12, 8)).slots.sum().backward()
    assert sa.init.slots.grad is not None and sa.init.slots.grad.abs().sum() > 0


def test_position_grid_corners():
    grid = position_grid(3, 5)
    assert grid.shape == (3, 5, 4)
    torch.testing.assert_close(grid[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(grid[-1, -1], torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_decoder_masks_sum_to_one_and_recon_is_the_mask_weighted_sum():
    torch.manual_seed(0)
    decoder = SpatialBroadcastDecoder(slot_dim=16, resolution=32, channels=8, grid=8)
    out = decoder.decode(torch.randn(2, 5, 16))
    assert out.masks.shape == (2, 5, 32, 32)
    assert out.slot_recons.shape == (2, 5, 3, 32, 32)
    torch.testing.assert_close(out.masks.sum(dim=1), torch.ones(2, 32, 32))
    torch.testing.assert_close(out.recon, (out.masks.unsqueeze(2) * out.slot_recons).sum(1))


@pytest.mark.parametrize(("kernel", "octaves"), [(1, 0), (3, 0), (5, 0), (3, 3)])
def test_full_resolution_decoder_first_layer_is_exactly_the_plain_convolution(kernel, octaves):
    torch.manual_seed(0)
    decoder = SpatialBroadcastDecoder(slot_dim=16, resolution=12, channels=8, grid=12, kernel=kernel,
                                      full_res_layers=2, octaves=octaves).double()
    with torch.no_grad():
        decoder.pos.proj.bias.normal_()  # a position embedding that is not ~0, so the shared part matters
    slots = torch.randn(2, 3, 16, dtype=torch.double, requires_grad=True)
    assert decoder.factorised
    fast = decoder.decode(slots).recon
    (fast_grad,) = torch.autograd.grad(fast.square().sum(), slots)
    decoder.factorised = False  # the plain path: broadcast maps through nn.ConvTranspose2d
    plain = decoder.decode(slots).recon
    (plain_grad,) = torch.autograd.grad(plain.square().sum(), slots)
    torch.testing.assert_close(fast, plain)
    torch.testing.assert_close(fast_grad, plain_grad)


def test_fourier_features_are_the_coordinates_then_sines_and_cosines_of_doubling_frequency():
    from slotlab.models.encoders import fourier_features

    coords = torch.tensor([[0.25, -0.5]])
    features = fourier_features(coords, octaves=2)  # [1, 2 + 8]
    angles = torch.pi * torch.tensor([0.25, 0.5, -0.5, -1.0])  # (x 2^0, x 2^1, y 2^0, y 2^1) * pi
    torch.testing.assert_close(features, torch.cat([coords[0], angles.sin(), angles.cos()])[None])
    assert fourier_features(coords, octaves=0) is coords
    decoder = SpatialBroadcastDecoder(slot_dim=8, resolution=8, channels=4, grid=8, octaves=3)
    assert decoder.pos.proj.in_features == 14
    # with a frame per slot the embedding is of the slot's own coordinates: still a masks-sum-to-one decoder
    framed = SpatialBroadcastDecoder(slot_dim=8, resolution=8, channels=4, grid=8, octaves=3, frames=True)
    out = framed.decode(torch.randn(2, 3, 8), torch.rand(2, 3, 2) - 0.5, torch.rand(2, 3, 2) + 0.1)
    torch.testing.assert_close(out.masks.sum(dim=1), torch.ones(2, 8, 8))


def test_fourier_features_keep_their_precision_in_bf16():
    from slotlab.models.encoders import SoftPositionEmbed, fourier_features

    coords = torch.linspace(-1, 1, 35).unsqueeze(-1).expand(35, 2).to(torch.bfloat16)  # [35, 2]
    exact = fourier_features(coords.float(), octaves=8)  # the same coordinates, fp32 throughout
    half = fourier_features(coords, octaves=8)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), exact, atol=1e-2, rtol=0)  # bf16 angles would be off by whole turns
    embed = SoftPositionEmbed(4, octaves=8)
    features = torch.zeros(1, 4, 35, 35)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = embed(features.to(torch.bfloat16))
    torch.testing.assert_close(mixed.float(), embed(features), atol=0.05, rtol=0.02)


def test_fourier_octaves_fade_in_from_coarse_to_fine_and_the_stage_is_saved():
    from slotlab.models.encoders import fourier_features

    coords = torch.rand(5, 2) * 2 - 1
    full = fourier_features(coords, octaves=4)  # [5, 2 + 16]: x, y, then sines, then cosines
    torch.testing.assert_close(fourier_features(coords, 4, torch.tensor(0.0)), torch.cat(
        [coords, torch.zeros(5, 16)], dim=-1))  # nothing but the coordinates at the start
    torch.testing.assert_close(fourier_features(coords, 4, torch.tensor(1.0)), full)
    half = fourier_features(coords, 4, torch.tensor(0.5))  # octaves 0 and 1 in full, 2 and 3 not yet
    for start in (2, 10):  # the sines, then the cosines: [x at octaves 0-3, y at octaves 0-3] each
        part, whole = half[:, start:start + 8].reshape(5, 2, 4), full[:, start:start + 8].reshape(5, 2, 4)
        torch.testing.assert_close(part[..., :2], whole[..., :2])  # x and y, octaves 0 and 1
        assert part[..., 2:].abs().max() == 0

    config = apply_overrides(get_preset("smoke"), ["model.decoder_octaves=4", "model.decoder_octave_fade=100"])
    model = SlotAutoencoder(config).train()
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1}
    model.set_step(25)  # the trainer's hook before each step
    assert model.decoder.pos.progress.item() == 0.25
    model.set_step(1000)
    assert model.decoder.pos.progress.item() == 1.0
    model.set_step(50)
    model.compute_loss(batch, step=50)
    state = model.state_dict()  # the stage travels with the weights, and through .to()
    assert state["decoder.pos.progress"].item() == 0.5
    restored = SlotAutoencoder(config).to(torch.float64)
    restored.load_state_dict(state)
    assert restored.decoder.pos.progress.item() == 0.5
    restored.eval().float()
    assert restored.decoder.pos.progress.dtype == torch.float32 and restored.decoder.pos.progress.item() == 0.5
    torch.manual_seed(0)  # the same slot-initialisation noise for both
    expected = model.eval()(batch["image"]).recon
    torch.manual_seed(0)
    torch.testing.assert_close(restored(batch["image"]).recon, expected)


def test_the_mlp_decoder_decodes_any_subset_of_pixels_as_the_whole_image_does():
    from slotlab.models.mlp_decoder import PixelMLPDecoder

    torch.manual_seed(0)
    decoder = PixelMLPDecoder(slot_dim=8, resolution=6, channels=16, layers=2)
    slots = torch.randn(2, 3, 8)
    whole = decoder.decode(slots)
    assert whole.recon.shape == (2, 3, 6, 6) and whole.masks.shape == (2, 3, 6, 6)
    assert whole.slot_recons.shape == (2, 3, 3, 6, 6)
    torch.testing.assert_close(whole.masks.sum(dim=1), torch.ones(2, 6, 6))
    pixels = torch.tensor([0, 7, 35, 20])  # row-major: (0, 0), (1, 1), (5, 5), (3, 2)
    recon, masks, slot_recons = decoder.decode_pixels(slots, pixels)
    rows, cols = pixels // 6, pixels % 6
    torch.testing.assert_close(recon, whole.recon[:, :, rows, cols].transpose(1, 2))  # [B, P, 3]
    torch.testing.assert_close(masks, whole.masks[:, :, rows, cols])  # [B, K, P]
    torch.testing.assert_close(slot_recons, whole.slot_recons[..., rows, cols].transpose(2, 3))  # [B, K, P, 3]
    # The factorised first layer is the plain per-pixel MLP of (slot + position embedding).
    position = decoder.pos(torch.zeros(1, 8, 6, 6))[0, :, 2, 3]  # [D] at row 2, column 3
    logits = decoder.net(decoder.first(slots + position))  # [B, K, 4]
    torch.testing.assert_close(whole.masks[:, :, 2, 3], logits[..., 0].softmax(dim=1))


def test_a_pixel_sampled_training_loss_estimates_the_full_one_and_evaluation_decodes_every_pixel():
    config = apply_overrides(get_preset("smoke"), ["model.decoder_kind=mlp", "model.decoder_pixels=0.25"])
    torch.manual_seed(0)
    model = SlotAutoencoder(config)
    image = torch.rand(4, 3, 16, 16) * 2 - 1
    batch = {"image": image}
    model.eval()
    torch.manual_seed(1)
    full, _ = model.compute_loss(batch)
    torch.manual_seed(1)  # the same slot-initialisation noise
    assert model(image).recon.shape == (4, 3, 16, 16)
    torch.manual_seed(1)
    torch.testing.assert_close(full, torch.nn.functional.mse_loss(model(image).recon, image))
    model.train()
    samples = []
    for seed in range(40):
        torch.manual_seed(seed)
        loss, logs = model.compute_loss(batch)
        samples.append(loss.item())
    assert len(set(samples)) > 1  # other pixels every step
    assert abs(sum(samples) / len(samples) - full.item()) < 0.1 * full.item()  # unbiased: the mean is close
    loss.backward()
    assert model.decoder.first.weight.grad.abs().sum() > 0 and model.encoder.mlp[0].weight.grad.abs().sum() > 0


def test_decoder_rejects_a_resolution_that_is_not_grid_times_power_of_two():
    with pytest.raises(ValueError):
        SpatialBroadcastDecoder(slot_dim=8, resolution=40, grid=8)


@pytest.mark.parametrize("encoder", ["paper_cnn", "resnet"])
def test_autoencoder_output_shapes(encoder):
    config = apply_overrides(get_preset("smoke"), [f"model.encoder={encoder}"])
    model = build_model(config)
    assert isinstance(model, SlotAutoencoder)
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(image)
    k, d = config.model.num_slots, config.model.slot_dim
    assert out.recon.shape == (2, 3, 16, 16)
    assert out.masks.shape == (2, k, 16, 16)
    assert out.slot_recons.shape == (2, k, 3, 16, 16)
    assert out.slots.shape == (2, k, d)
    assert out.attn.shape == (2, k, 16 * 16)  # stride 1: N = H * W
    torch.testing.assert_close(out.masks.sum(1), torch.ones(2, 16, 16))


def test_loss_is_the_mse_of_the_reconstruction():
    model = build_model(get_preset("smoke"))
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    loss, logs = model.compute_loss({"image": image})
    torch.manual_seed(1)
    expected = (model(image).recon - image).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_a_model_at_half_the_data_resolution_takes_and_returns_full_size_images():
    """model.resolution: the encoder sees the image averaged down, the decoder draws at half the side, and its masks
    and slot images are upsampled, so the output, the masks and the loss are at the data's side."""
    config = apply_overrides(get_preset("smoke"), ["model.resolution=8"])
    model = build_model(config)
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(0)
    out = model(image)
    k = config.model.num_slots
    assert out.feature_size == (8, 8) and out.attn.shape == (2, k, 64)  # attention on the 8x8 grid
    assert out.recon.shape == (2, 3, 16, 16) and out.slot_recons.shape == (2, k, 3, 16, 16)
    torch.testing.assert_close(out.masks.sum(1), torch.ones(2, 16, 16))
    torch.testing.assert_close(out.recon, (out.masks.unsqueeze(2) * out.slot_recons).sum(1))
    # What the encoder saw: the 2x2 means of the image (the same slots as from the averaged image itself).
    averaged = image.unflatten(2, (8, 2)).unflatten(4, (8, 2)).mean(dim=(3, 5))  # [2, 3, 8, 8]
    torch.manual_seed(0)
    grouped, _ = model.group(image)
    model.image_resolution = 8  # the same weights, fed the averaged image directly
    torch.manual_seed(0)
    direct, _ = model.group(averaged)
    torch.testing.assert_close(grouped.slots, direct.slots)
    # The full-size masks are the decoder's half-size ones, upsampled bilinearly.
    half = model.decoder.decode(out.slots)
    assert half.masks.shape == (2, k, 8, 8)
    upsampled = torch.nn.functional.interpolate(half.masks, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.masks, upsampled)


def test_the_background_slot_is_slot_0_drawn_smooth_from_a_coarse_grid():
    """model.background_grid: slot 0 is drawn by its own decoder on a 4x4 map upsampled bilinearly (it cannot paint
    a small object); the other slots by the broadcast decoder; all masks still compete in one softmax."""
    from slotlab.models.broadcast_decoder import compose

    config = apply_overrides(get_preset("smoke"), ["model.slot_init=bo_qsa", "model.background_grid=4"])
    model = build_model(config)
    slots = torch.randn(2, config.model.num_slots, config.model.slot_dim)
    decoded = model.decode(slots)
    coarse = model.background.mlp(slots[:, 0]).view(2, 4, 4, 4)  # [B, 4, g, g]: mask logit, RGB
    smooth = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(decoded.slot_recons[:, 0], smooth[:, 1:])
    rgb, logits = model.decoder.draw(slots[:, 1:])
    expected = compose(torch.cat([smooth[:, None, 1:], rgb], 1), torch.cat([smooth[:, :1], logits], 1))
    torch.testing.assert_close(decoded.masks, expected.masks)
    torch.testing.assert_close(decoded.recon, expected.recon)
    torch.testing.assert_close(decoded.masks.sum(1), torch.ones(2, 16, 16))


@pytest.mark.parametrize("overrides", [["model.background_grid=4"],  # Gaussian slots have no identity: no slot 0
                                       ["model.slot_init=bo_qsa", "model.background_grid=32"]])  # above the side
def test_a_background_slot_needs_slot_identities_and_a_grid_within_the_image(overrides):
    with pytest.raises(UserError, match="model.background_grid"):
        apply_overrides(get_preset("smoke"), overrides)


def test_the_folded_step_equals_algorithm_1_in_value_and_gradient():
    """The reordered k/v form (used by default) gives the slots and gradients of the line-by-line step."""
    torch.manual_seed(0)
    sa = SlotAttention(num_slots=4, dim=16, input_dim=12, iters=3)
    inputs = torch.randn(2, 30, 12)
    slots = torch.randn(2, 4, 16)
    results = []
    for folded in (False, True):
        sa.zero_grad()
        normed = sa.norm_inputs(inputs)
        if folded:
            new, attn = sa.step_folded(slots, normed)
        else:
            k, v = sa.to_kv(normed).chunk(2, dim=-1)
            new, attn = sa.step(slots, k, v)
        (new.square().sum() + attn.square().sum()).backward()
        results.append((new.detach(), attn.detach(), {n: p.grad.clone() for n, p in sa.named_parameters()
                                                      if p.grad is not None}))
    (slots_a, attn_a, grads_a), (slots_b, attn_b, grads_b) = results
    torch.testing.assert_close(slots_b, slots_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn_b, attn_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and "to_kv.weight" in grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5)


def test_slot_edges_give_each_slot_its_own_edge_directions_in_the_first_layer():
    torch.manual_seed(0)
    decoder = SpatialBroadcastDecoder(slot_dim=8, resolution=8, channels=4, grid=8, kernel=3, slot_edges=True)
    slots = torch.randn(3, 8)
    term = decoder.edge_term(slots, 8)  # [3, 4, 8, 8]
    u, v = decoder.slot_edges(slots).view(3, 4, 2).unbind(-1)  # [3, 4] each
    # linear in the pixel's (x, y): one pixel right adds 2 / 8 u, one pixel down 2 / 8 v, for each slot its own
    torch.testing.assert_close(term[..., 3, 5] - term[..., 3, 4], u * 0.25)
    torch.testing.assert_close(term[..., 6, 2] - term[..., 5, 2], v * 0.25)
    # the decoder adds it to the first layer, before its ReLU: zeroing the map gives the paper's decoder back
    out = decoder.decode(slots.view(1, 3, 8))
    torch.nn.init.zeros_(decoder.slot_edges.weight), torch.nn.init.zeros_(decoder.slot_edges.bias)
    plain = SpatialBroadcastDecoder(slot_dim=8, resolution=8, channels=4, grid=8, kernel=3)
    plain.load_state_dict({name: value for name, value in decoder.state_dict().items()
                           if not name.startswith("slot_edges.")})
    torch.testing.assert_close(decoder.decode(slots.view(1, 3, 8)).recon, plain.decode(slots.view(1, 3, 8)).recon)
    assert not torch.allclose(out.recon, plain.decode(slots.view(1, 3, 8)).recon)


def test_mask_agreement_teaches_the_decoder_the_attention_and_leaves_the_attention_alone():
    """model.mask_agreement adds the decoder masks' cross-entropy against the attention masks: it trains the decoder
    masks (and the slots they come from), never the attention it is measured against, and is smallest when the two
    agree."""
    from dataclasses import replace

    from slotlab.models.autoencoder import mask_agreement
    from slotlab.models.slot_attention import attention_masks

    config = apply_overrides(get_preset("smoke"), ["model.mask_agreement=0.5"])
    model = build_model(config).train()
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1}
    torch.manual_seed(0)
    loss, logs = model.compute_loss(batch)
    torch.testing.assert_close(loss, logs["mse"] + 0.5 * logs["mask_agreement"])
    torch.manual_seed(0)
    out = model(batch["image"])
    agreement = mask_agreement(out)
    agreement.backward()
    assert all(p.grad is not None and p.grad.any() for p in model.decoder.parameters())
    # The attention is the target: with the decoder masks held fixed nothing is left to train.
    assert not mask_agreement(replace(out, masks=out.masks.detach())).requires_grad
    # Cross-entropy: at least the attention masks' own entropy, reached where the decoder masks equal them.
    target = attention_masks(out.attn.detach(), out.feature_size, (16, 16))
    entropy = -(target * target.clamp_min(1e-6).log()).sum(1).mean()
    assert agreement > entropy
    torch.testing.assert_close(mask_agreement(replace(out, masks=target)), entropy)
    # Validation scores the reconstruction alone: the loss there is the MSE.
    model.eval()
    loss, logs = model.compute_loss(batch)
    assert "mask_agreement" not in logs and torch.equal(loss, logs["mse"])


def test_mask_agreement_starts_at_its_fraction_of_training():
    config = apply_overrides(get_preset("smoke"), ["model.mask_agreement=0.5", "model.mask_agreement_from=0.5"])
    model = build_model(config).train()
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1}
    model.set_progress(0.49)
    loss, logs = model.compute_loss(batch)
    assert "mask_agreement" not in logs and torch.equal(loss, logs["mse"])
    model.set_progress(0.5)
    loss, logs = model.compute_loss(batch)
    assert logs["mask_agreement"] > 0
    torch.testing.assert_close(loss, logs["mse"] + 0.5 * logs["mask_agreement"])


def test_attention_recon_masks_compose_the_slot_images_with_the_attention():
    """model.recon_masks=attention: the reconstruction is the decoder's slot images weighted by the attention masks,
    so the MSE reaches the attention itself; the decoder's own masks (drawing from slots alone) are handed out and
    learn the attention's through the mask agreement."""
    from dataclasses import replace

    from slotlab.models.autoencoder import mask_agreement
    from slotlab.models.slot_attention import attention_masks

    image = torch.rand(2, 3, 16, 16) * 2 - 1
    config = apply_overrides(get_preset("smoke"), ["model.recon_masks=attention", "model.mask_agreement=0.5"])
    model = build_model(config).train()
    torch.manual_seed(0)
    out = model(image)
    target = attention_masks(out.attn, out.feature_size, (16, 16))  # [B, K, H, W]
    torch.testing.assert_close(out.masks, target)
    torch.testing.assert_close(out.recon, (target.unsqueeze(2) * out.slot_recons).sum(dim=1))
    torch.testing.assert_close(model.decode(out.slots).masks, out.decoder_masks)  # from slots alone: the decoder's
    assert not torch.allclose(out.decoder_masks, out.masks)
    torch.testing.assert_close(mask_agreement(out), mask_agreement(replace(out, masks=out.decoder_masks,
                                                                           decoder_masks=None)))
    out.attn.retain_grad()
    torch.nn.functional.mse_loss(out.recon, image).backward()
    assert out.attn.grad is not None and out.attn.grad.any()
    # The paper's model: the last attention reaches the MSE only through the slots it updated, not as masks.
    plain = build_model(get_preset("smoke")).train()
    plain.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    plain_out = plain(image)
    torch.testing.assert_close(plain_out.masks, out.decoder_masks)
    assert plain_out.decoder_masks is None
    with pytest.raises(UserError, match="model.recon_masks=attention"):
        apply_overrides(get_preset("smoke"), ["model.recon_masks=attention", "model.decoder_kind=mlp",
                                              "model.decoder_pixels=0.5"])
    # VQ-SA: the slot images come from the quantised slots, the masks from the attention of the continuous ones.
    vq = build_model(apply_overrides(get_preset("vqsa-smoke"), ["model.recon_masks=attention"])).eval()
    torch.manual_seed(0)
    vq_out = vq(image)
    torch.testing.assert_close(vq_out.masks, attention_masks(vq_out.attn, vq_out.feature_size, (16, 16)))
    torch.testing.assert_close(vq.decode(vq_out.slots).masks, vq_out.decoder_masks)
    assert vq_out.codes is not None


def test_slot_rgb_grid_draws_each_slot_in_smooth_colours_with_the_decoder_masks():
    """model.slot_rgb_grid=G: each slot's RGB comes from a G x G map upsampled (one colour per slot at G=1), its
    mask from the broadcast decoder; refused where there is no broadcast decoder of slots in image coordinates."""
    config = apply_overrides(get_preset("smoke"), ["model.slot_rgb_grid=1"])
    model = build_model(config).eval()
    slots = torch.randn(2, 3, 16)
    decoded = model.decode(slots)
    colours = decoded.slot_recons.flatten(3)  # [B, K, 3, H*W]
    torch.testing.assert_close(colours, colours[..., :1].expand_as(colours))  # one colour per slot
    _, mask_logits = model.decoder.draw(slots)
    torch.testing.assert_close(decoded.masks, mask_logits.softmax(dim=1))
    torch.testing.assert_close(decoded.recon, (decoded.masks.unsqueeze(2) * decoded.slot_recons).sum(dim=1))
    smooth = build_model(apply_overrides(get_preset("smoke"), ["model.slot_rgb_grid=4"])).eval()
    colours = smooth.decode(slots).slot_recons  # [B, K, 3, 16, 16], bilinear from 4 x 4
    assert not torch.allclose(colours[..., 0, 0], colours[..., 15, 15])
    framed = build_model(apply_overrides(get_preset("smoke"), ["model.slot_rgb_grid=1",
                                                                "model.grouping=invariant_slot_attention"])).eval()
    decoded = framed.decode(torch.cat([slots, torch.zeros(2, 3, 2), torch.ones(2, 3, 2)], dim=-1))  # frames
    colours = decoded.slot_recons.flatten(3)
    torch.testing.assert_close(colours, colours[..., :1].expand_as(colours))
    for bad in (["model.decoder_kind=mlp"], ["model.background_grid=2", "model.slot_init=bo_qsa"],
                ["model.slot_rgb_grid=17"]):
        with pytest.raises(UserError, match="model.slot_rgb_grid"):
            apply_overrides(get_preset("smoke"), ["model.slot_rgb_grid=1", *bad])


def test_pixel_posterior_is_bayes_rule_over_the_slots_with_the_images_own_error_as_variance():
    from slotlab.models.autoencoder import pixel_posterior

    torch.manual_seed(0)
    image = torch.rand(2, 3, 4, 4)
    slot_recons = torch.rand(2, 3, 3, 4, 4)  # [B, K, 3, H, W]
    masks = torch.rand(2, 3, 4, 4).softmax(dim=1)
    recon = (masks.unsqueeze(2) * slot_recons).sum(dim=1)
    posterior = pixel_posterior(masks, slot_recons, image, recon)  # [B, K, H, W]
    variance = (recon - image).square().mean(dim=(1, 2, 3)).view(2, 1, 1, 1)
    likelihood = torch.distributions.Normal(slot_recons, variance.unsqueeze(1).sqrt()).log_prob(image.unsqueeze(1))
    joint = masks * likelihood.sum(dim=2).exp()  # [B, K, H, W]: p(k) p(pixel | k)
    torch.testing.assert_close(posterior, joint / joint.sum(dim=1, keepdim=True))
    # A slot that draws the pixel's exact colour takes it from slots that miss it by far; a slot with mask 0 takes
    # (next to) nothing, whatever its colour.
    far = torch.stack([image, image + 1, image], dim=1)  # [B, K=3, 3, H, W]
    sure = pixel_posterior(torch.tensor([0.1, 0.9, 0.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4), far, image, image + 0.1)
    assert (sure[:, 0] > 0.99).all() and (sure[:, 2] < 1e-9).all()


def test_mask_posterior_changes_the_masks_handed_out_outside_training_only():
    from slotlab.models.autoencoder import pixel_posterior

    image = torch.rand(2, 3, 16, 16) * 2 - 1
    config = apply_overrides(get_preset("smoke"), ["model.recon_masks=attention", "model.mask_posterior=true"])
    model = build_model(config).eval()
    plain = build_model(apply_overrides(get_preset("smoke"), ["model.recon_masks=attention"])).eval()
    plain.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    out = model(image)
    torch.manual_seed(0)
    plain_out = plain(image)
    torch.testing.assert_close(out.recon, plain_out.recon)  # the reconstruction and the slots are the same
    torch.testing.assert_close(out.masks, pixel_posterior(plain_out.masks, plain_out.slot_recons, image,
                                                          plain_out.recon))
    assert not torch.allclose(out.masks, plain_out.masks)
    torch.manual_seed(0)
    torch.testing.assert_close(model.train()(image).masks, plain_out.masks)  # training sees the mixing masks
    with pytest.raises(UserError, match="model.mask_posterior=true needs task=autoencoder"):
        apply_overrides(get_preset("smoke"), ["model.mask_posterior=true", "task=setpred"])


def test_mask_agreement_needs_the_whole_image_decoded():
    with pytest.raises(UserError, match="model.mask_agreement"):
        apply_overrides(get_preset("smoke"), ["model.mask_agreement=0.1", "model.decoder_kind=mlp",
                                              "model.decoder_pixels=0.5"])


def test_test_restarts_keep_each_images_most_self_consistent_draw():
    """model.test_restarts=R: outside training, R draws of the Gaussian initial slots; each image keeps everything
    (slots, attention, masks, image) of the draw whose decoder masks agree best with its attention masks."""
    from slotlab.models.autoencoder import mask_disagreement

    torch.manual_seed(0)
    model = build_model(apply_overrides(get_preset("smoke"), ["model.test_restarts=3"])).eval()
    image = torch.rand(8, 3, 16, 16) * 2 - 1
    model.test_restarts = 1
    torch.manual_seed(1)
    with torch.no_grad():
        singles = [model(image) for _ in range(3)]  # the noise a three-restart pass draws, one draw at a time
        model.test_restarts = 3
        torch.manual_seed(1)
        out = model(image)
        torch.manual_seed(1)
        encoded, _ = model.encode(image)
    best = torch.stack([mask_disagreement(s.masks, s.attn, s.feature_size) for s in singles]).argmin(dim=0)  # [B]
    assert len(set(best.tolist())) > 1  # the images chose different draws
    for i, draw in enumerate(best.tolist()):
        for name in ("recon", "masks", "slot_recons", "slots", "attn"):
            torch.testing.assert_close(getattr(out, name)[i], getattr(singles[draw], name)[i])
        torch.testing.assert_close(out.attn_per_iter[0][i], singles[draw].attn_per_iter[0][i])
    torch.testing.assert_close(encoded.slots, out.slots)  # generation starts from the same chosen slots
    assert model.train().restarts() == 1  # training draws once
    learned = build_model(apply_overrides(get_preset("smoke"), ["model.slot_init=bo_qsa"]))
    learned.test_restarts = 3
    assert learned.eval().restarts() == 1  # learned queries: every draw would be the same
    for refused in (["model.slot_init=bo_qsa"], ["model.quantiser=vq"], ["task=slate"]):
        with pytest.raises(UserError, match="model.test_restarts=3"):  # where restarts would do nothing
            apply_overrides(get_preset("smoke"), ["model.test_restarts=3", *refused])


def test_slot_compactness_charges_a_slot_spread_over_two_regions_apart():
    """model.compactness: zero for slots that each hold one compact region (a disc, the background around a small
    one), positive for a slot holding two discs apart, growing with the distance, and its gradient reaches
    the attention."""
    from slotlab.models.autoencoder import slot_compactness

    ys, xs = torch.meshgrid((torch.arange(32) + 0.5) / 16 - 1, (torch.arange(32) + 0.5) / 16 - 1, indexing="ij")

    def disc(x, y, r):
        return ((xs - x) ** 2 + (ys - y) ** 2 < r**2).float()  # [32, 32]

    def two_slots(region):  # the region's slot and the rest of the image's, as attention [1, 2, N]
        return torch.stack([region, 1 - region]).reshape(1, 2, -1)

    assert slot_compactness(two_slots(disc(0.2, -0.1, 0.2)), (32, 32)) == 0
    assert slot_compactness(two_slots(disc(0.0, 0.0, 0.35)), (32, 32)) == 0
    near = slot_compactness(two_slots(torch.maximum(disc(-0.3, 0, 0.2), disc(0.3, 0, 0.2))), (32, 32))
    far = slot_compactness(two_slots(torch.maximum(disc(-0.7, 0, 0.2), disc(0.7, 0, 0.2))), (32, 32))
    assert 0 < near < far
    attn = two_slots(torch.maximum(disc(-0.7, 0, 0.2), disc(0.7, 0, 0.2))).requires_grad_()
    slot_compactness(attn, (32, 32)).backward()
    assert attn.grad.abs().sum() > 0
    config = apply_overrides(get_preset("smoke"), ["model.compactness=0.5"])
    model = build_model(config).train()
    loss, logs = model.compute_loss({"image": torch.rand(2, 3, 16, 16) * 2 - 1})
    torch.testing.assert_close(loss, logs["mse"] + 0.5 * logs["compactness"])


def test_slot_balance_raises_the_logits_of_slots_that_took_few_pixels_from_the_second_iteration_on():
    """model.slot_balance: -gamma * log(share) per slot, so at gamma = 1 a slot holding a ninth of what another holds
    gains log 9 over it; the first iteration is the paper's, later ones differ."""
    import math

    from slotlab.models.slot_attention import slot_balance_logits

    attn = torch.tensor([[0.9, 0.9], [0.1, 0.1]]).unsqueeze(0)  # [1, K=2, N=2]
    balance = slot_balance_logits(attn, 1.0)  # [1, 2, 1]
    torch.testing.assert_close(balance[0, 1, 0] - balance[0, 0, 0], torch.tensor(math.log(9.0)))
    torch.testing.assert_close(slot_balance_logits(attn, 0.5), balance / 2)
    inputs, init = torch.randn(2, 20, 8), torch.randn(2, 3, 8)
    torch.manual_seed(0)
    plain = SlotAttention(num_slots=3, dim=8, iters=3)
    torch.manual_seed(0)
    balanced = SlotAttention(num_slots=3, dim=8, iters=3, slot_balance=1.0)
    first_plain, first_balanced = (m(inputs, slots=init).attn_per_iter for m in (plain, balanced))
    torch.testing.assert_close(first_plain[0], first_balanced[0])
    assert not torch.allclose(first_plain[-1], first_balanced[-1])
    with pytest.raises(UserError, match="model.slot_balance"):
        apply_overrides(get_preset("smoke"), ["model.slot_balance=1", "model.grouping=soft_kmeans"])
