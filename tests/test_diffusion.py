"""SlotDiffusion (Part 2): schedulers and samplers, the stage-1 VAE, the slot-conditioned denoiser, EMA, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slotlab.cli import main
from slotlab.config import DiffusionConfig, apply_overrides, get_preset
from slotlab.diffusion.sampling import sample, sampling_scheduler, train_scheduler
from slotlab.diffusion.slot_diffusion import SlotDiffusion, attention_masks
from slotlab.diffusion.vae import ImageVAE, psnr_from_mse
from slotlab.errors import UserError
from slotlab.train.loop import Trainer, build_optimizer, train

SCHEDULE = DiffusionConfig()  # linear betas 1e-4 .. 0.02 over 1000 steps
ALPHA_BAR = train_scheduler(SCHEDULE).alphas_cumprod  # [T]


def _gaussian_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a trained UNet: the ideal denoiser for data ~ N(0, 0.5^2), slightly bent."""
    a = ALPHA_BAR[t].reshape(-1, 1, 1, 1)
    return (1 - a).sqrt() * x / (0.25 * a + 1 - a) + 0.05 * torch.tanh(x)


def _oracle_denoiser(x0: torch.Tensor):
    """The noise that turns x0 into x_t, exactly: sampling with it must return x0."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ALPHA_BAR[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return eps


# ------------------------------------------------------------------------------------------------ schedulers


def test_add_noise_and_one_step_round_trips():
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    scheduler = train_scheduler(SCHEDULE)
    xt = scheduler.add_noise(x0, noise, t)
    a = ALPHA_BAR[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    # Given the true noise, a DDPM step recovers x0 and a deterministic DDIM step lands on q(x_{t'} | x0) exactly.
    ddpm = sampling_scheduler(SCHEDULE, "ddpm")
    ddpm.set_timesteps(1000)
    step = ddpm.step(noise[2:3], 500, xt[2:3], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(step.pred_original_sample, x0[2:3], atol=1e-5, rtol=1e-5)
    ddim = sampling_scheduler(SCHEDULE, "ddim")
    ddim.set_timesteps(50)  # timesteps 980, 960, ..., 0
    prev = ddim.step(noise[2:3], 500, xt[2:3], eta=0.0).prev_sample
    torch.testing.assert_close(prev, scheduler.add_noise(x0[2:3], noise[2:3], torch.tensor([480])),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("ddim", 7), ("ddpm", 1000)])
def test_sampling_with_the_true_noise_returns_x0(sampler, steps):
    torch.manual_seed(1)
    x0 = torch.randn(2, 3, 4, 4)
    out = sample(_oracle_denoiser(x0), tuple(x0.shape), sampling_scheduler(SCHEDULE, sampler), steps,
                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=1e-3)


def _algorithm_2(eps_fn, shape, generator: torch.Generator) -> torch.Tensor:
    """DDPM ancestral sampling written out (Ho et al. 2020, Algorithm 2) with sigma_t^2 = the posterior variance."""
    betas = torch.linspace(SCHEDULE.beta_start, SCHEDULE.beta_end, SCHEDULE.num_train_timesteps)
    alphas = 1 - betas
    x = torch.randn(shape, generator=generator)
    for t in range(SCHEDULE.num_train_timesteps - 1, -1, -1):
        z = torch.randn(shape, generator=generator) if t > 0 else torch.zeros(shape)
        a_bar, a_bar_prev = ALPHA_BAR[t], ALPHA_BAR[t - 1] if t > 0 else torch.tensor(1.0)
        sigma = ((1 - a_bar_prev) / (1 - a_bar) * betas[t]).sqrt()
        eps = eps_fn(x, torch.full((shape[0],), t))
        x = (x - betas[t] / (1 - a_bar).sqrt() * eps) / alphas[t].sqrt() + sigma * z
    return x


def test_ddim_with_eta_one_over_all_steps_equals_ddpm_ancestral_sampling():
    shape = (2, 3, 4, 4)

    def run(sampler: str, eta: float) -> torch.Tensor:
        return sample(_gaussian_denoiser, shape, sampling_scheduler(SCHEDULE, sampler), 1000, eta=eta,
                      generator=torch.Generator().manual_seed(7))

    ddpm, ddim_eta1, ddim_eta0 = run("ddpm", 0.0), run("ddim", 1.0), run("ddim", 0.0)
    written_out = _algorithm_2(_gaussian_denoiser, shape, torch.Generator().manual_seed(7))
    torch.testing.assert_close(ddpm, written_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ddim_eta1, ddpm, atol=1e-4, rtol=1e-4)
    assert (ddim_eta0 - ddpm).abs().max() > 0.1  # the comparison can fail: deterministic DDIM is another sampler
    assert 0.2 < float(ddpm.std()) < 1.0  # the chain stayed on the data scale (std 0.5)


def test_unknown_sampler_and_bad_step_counts_are_user_errors():
    with pytest.raises(UserError, match="sampler"):
        sampling_scheduler(SCHEDULE, "euler")
    model = SlotDiffusion(get_preset("slotdiffusion-smoke"))
    slots = torch.randn(1, 3, 16)
    for steps in (0, 1001):
        with pytest.raises(UserError, match="steps"):
            model.decode(slots, steps=steps)


# ------------------------------------------------------------------------------------------------ VAE


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vae") / "run"
    train(get_preset("vae-smoke"), run_dir)
    return run_dir


def test_vae_loss_is_mse_plus_weighted_kl_and_latents_are_a_quarter_side():
    config = apply_overrides(get_preset("vae-smoke"), ["vae.kl_weight=0.5"])
    model = ImageVAE(config)
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    loss, logs = model.compute_loss({"image": image})
    torch.testing.assert_close(loss, logs["mse"] + 0.5 * logs["kl"])
    assert model.encode(image).shape == (2, 3, 8, 8)  # two blocks: one downsampling
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert psnr_from_mse(0.04) == pytest.approx(20.0)  # images in [-1, 1]: peak-to-peak 2


def test_slotlab_eval_of_a_vae_run_reports_psnr(vae_run, capsys):
    assert main(["eval", str(vae_run), "--limit", "4", "--device", "cpu"]) == 0
    metrics = json.loads((vae_run / "eval" / "val-best-first4" / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and metrics["latent_shape"] == [3, 8, 8]
    assert metrics["psnr"] == pytest.approx(10 * math.log10(4 / metrics["mse"]))
    assert (vae_run / "eval" / "val-best-first4" / "recon.png").is_file()


# ------------------------------------------------------------------------------------------------ SlotDiffusion


def test_one_training_step_trains_encoder_and_unet_and_keeps_the_vae_frozen(vae_run, tmp_path):
    config = apply_overrides(get_preset("slotdiffusion-smoke"), [f"diffusion.vae_run={vae_run}"])
    trainer = Trainer(config, tmp_path)
    model = trainer.model
    assert model.latent_shape == (3, 8, 8)
    vae_before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    logs = trainer.train_step()
    assert torch.isfinite(logs["loss"]) and logs["mse"] > 0
    after = dict(model.named_parameters())
    for prefix in ("encoder.", "grouping.", "denoiser."):  # the diffusion loss reaches Slot Attention end to end
        assert any(not torch.equal(trained[n], after[n]) for n in trained if n.startswith(prefix)), prefix
    assert all(torch.equal(v, model.vae.state_dict()[k]) for k, v in vae_before.items())
    optimised = {id(p) for group in build_optimizer(model, config.train).param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in [*model.vae.parameters(), *model.ema.parameters()]}
    assert float(model.latent_scale) > 0  # measured on the first batch


def test_ema_update_is_an_exponential_moving_average():
    config = apply_overrides(get_preset("slotdiffusion-smoke"), ["diffusion.ema_decay=0.9"])
    model = SlotDiffusion(config)
    assert model.sampling_denoiser() is model.denoiser  # no EMA yet
    model.after_optimizer_step(0)  # the first update copies the weights
    weight = next(model.denoiser.parameters())
    ema_weight = next(model.ema.module.parameters())
    torch.testing.assert_close(ema_weight, weight)
    old = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1.0)
    model.after_optimizer_step(1)
    torch.testing.assert_close(ema_weight, 0.9 * old + 0.1 * (old + 1.0))
    assert model.sampling_denoiser() is model.ema.module
    assert any(k.startswith("ema.module.") for k in model.state_dict())  # saved with the checkpoint
    assert not ema_weight.requires_grad


def test_decode_shape_range_and_seeding():
    torch.manual_seed(0)
    model = SlotDiffusion(get_preset("slotdiffusion-smoke")).eval()
    slots = torch.randn(2, 3, 16)
    a = model.decode(slots, steps=3, seed=0)
    assert a.recon.shape == (2, 3, 16, 16) and a.masks is None
    assert a.recon.min() >= -1 and a.recon.max() <= 1
    torch.testing.assert_close(model.decode(slots, steps=3, seed=0).recon, a.recon)
    assert not torch.equal(model.decode(slots, steps=3, seed=1).recon, a.recon)
    ddpm = model.decode(slots, steps=5, sampler="ddpm", seed=0).recon
    assert ddpm.shape == (2, 3, 16, 16) and ddpm.abs().max() <= 1
    guided = model.decode(slots, steps=3, seed=0, guidance_scale=3.0).recon
    assert guided.shape == (2, 3, 16, 16) and not torch.equal(guided, a.recon)


def test_guidance_needs_conditioning_dropout():
    model = SlotDiffusion(apply_overrides(get_preset("slotdiffusion-smoke"), ["diffusion.cond_dropout=0"]))
    with pytest.raises(UserError, match="cond_dropout"):
        model.decode(torch.randn(1, 3, 16), steps=2, guidance_scale=2.0)


def test_forward_gives_attention_masks_and_a_sampled_reconstruction():
    model = SlotDiffusion(get_preset("slotdiffusion-smoke")).eval()
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(3)
    out = model(image)
    assert out.recon.shape == image.shape and out.slot_recons is None
    assert out.masks.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out.masks.sum(dim=1), torch.ones(2, 16, 16))
    torch.manual_seed(3)  # the same slot initialisation noise
    torch.testing.assert_close(model.predict_masks(image), out.masks.detach())


def test_attention_masks_are_upsampled_and_still_sum_to_one():
    attn = torch.rand(2, 4, 16).softmax(dim=1)  # [B, K, N] on a 4x4 grid
    masks = attention_masks(attn, (4, 4), (16, 16))
    assert masks.shape == (2, 4, 16, 16)
    torch.testing.assert_close(masks.sum(dim=1), torch.ones(2, 16, 16))
    assert masks.argmax(dim=1)[0, 0, 0] == attn.reshape(2, 4, 4, 4).argmax(dim=1)[0, 0, 0]


@pytest.fixture(scope="module")
def diffusion_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("slotdiffusion") / "run"
    assert main(["train", "--preset", "slotdiffusion-smoke", "--out", str(run_dir), "--set", "train.device=cpu"]) == 0
    return run_dir


def test_slotlab_eval_and_mix_of_a_slot_diffusion_run(diffusion_run, capsys):
    run_dir = diffusion_run
    assert main(["eval", str(run_dir), "--limit", "4", "--device", "cpu"]) == 0
    metrics = json.loads((run_dir / "eval" / "val-best-first4" / "metrics.json").read_text())
    assert -1 <= metrics["ari"] <= 1 and metrics["mse"] > 0
    assert (run_dir / "eval" / "val-best-first4" / "masks.png").is_file()
    # slot mixing decodes through decode(slots) and falls back to attention masks: unchanged for this model
    assert main(["mix", str(run_dir), "--a", "0", "--b", "1", "--take-from-b", "1", "--device", "cpu"]) == 0
    assert (run_dir / "mix" / "mix_0_1.png").is_file()


@pytest.mark.parametrize("overrides, fragment", [
    (["diffusion.vae_run=/no/such/run"], "diffusion.vae_run"),
    (["diffusion.unet_channels=16,20"], "attention_head_dim"),
    (["data.resolution=15", "model.decoder_grid=15"], "halved"),
    (["diffusion.sampler=euler"], "diffusion.sampler"),
])
def test_bad_diffusion_settings_are_user_errors(overrides, fragment, tmp_path, capsys):
    out = tmp_path / "run"
    sets = [arg for item in overrides for arg in ("--set", item)]
    code = main(["train", "--preset", "slotdiffusion-smoke", "--out", str(out), *sets])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and fragment in err
    assert not out.exists()


def test_vae_run_must_be_a_vae_run(diffusion_run, tmp_path, capsys):
    code = main(["train", "--preset", "slotdiffusion-smoke", "--out", str(tmp_path / "sd"),
                 "--set", f"diffusion.vae_run={diffusion_run}"])
    err = capsys.readouterr().err
    assert code == 2 and "not a vae run" in err
