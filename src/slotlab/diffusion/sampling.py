"""The DDPM forward process and the two samplers (DDPM ancestral, DDIM), on diffusers' schedulers.

The schedulers hold no parameters (diffusers' scheduler / denoiser / sampler split): :func:`train_scheduler` gives
the forward process ``q(x_t | x_0)`` used by the loss (``add_noise``), :func:`sampling_scheduler` the reverse one,
and :func:`sample` runs the reverse chain for any denoiser ``eps_fn(x_t, t) -> eps``.

* ``ddpm``: ancestral sampling, Algorithm 2 of Ho et al. (2020), with ``sigma_t^2 = beta~_t`` (the posterior
  variance, diffusers' ``fixed_small``); 1000 steps by default.
* ``ddim``: Song et al. (2021), eq. 12; ``eta = 0`` is deterministic, ``eta = 1`` gives the same ``sigma_t`` as
  ``ddpm`` and, over all 1000 steps with the same noise, the same samples (tested).

``x_0`` is never clipped: latents of an image autoencoder are not bounded to [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from slotlab.config import DiffusionConfig
from slotlab.errors import UserError

SAMPLERS = ("ddpm", "ddim")

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _schedule_kwargs(cfg: DiffusionConfig) -> dict:
    return dict(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                beta_schedule="linear", prediction_type="epsilon", clip_sample=False)


def train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The forward process: linear betas from ``beta_start`` to ``beta_end`` over ``num_train_timesteps``."""
    return DDPMScheduler(**_schedule_kwargs(cfg), variance_type="fixed_small")


def sampling_scheduler(cfg: DiffusionConfig, sampler: str) -> DDPMScheduler | DDIMScheduler:
    """A fresh scheduler for ``sampler`` (``ddpm`` or ``ddim``) on the training noise schedule."""
    if sampler == "ddpm":
        return train_scheduler(cfg)
    if sampler == "ddim":
        # set_alpha_to_one: the last step lands on alpha_bar = 1, i.e. returns the predicted x_0, as DDPM does.
        return DDIMScheduler(**_schedule_kwargs(cfg), set_alpha_to_one=True, steps_offset=0,
                             timestep_spacing="leading")
    raise UserError(f"unknown diffusion sampler {sampler!r} (known: {', '.join(SAMPLERS)})")


def check_steps(steps: int, cfg: DiffusionConfig) -> None:
    if not 1 <= steps <= cfg.num_train_timesteps:
        raise UserError(f"sampling steps={steps}: must be between 1 and diffusion.num_train_timesteps="
                        f"{cfg.num_train_timesteps}")


@torch.no_grad()
def sample(eps_fn: EpsFn, shape: tuple[int, ...], scheduler: DDPMScheduler | DDIMScheduler, steps: int,
           eta: float = 0.0, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           dtype: torch.dtype = torch.float32, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Run the reverse chain from ``x_T ~ N(0, I)`` to ``x_0``.

    Args:
        eps_fn: the denoiser, ``(x_t [B, C, h, w], t [B] int64) -> predicted noise [B, C, h, w]``.
        shape: ``(B, C, h, w)`` of the samples.
        scheduler: from :func:`sampling_scheduler` (its timesteps are set here).
        steps: number of denoising steps (1000 = every training timestep).
        eta: DDIM only: 0 = deterministic, 1 = the DDPM posterior variance.
        generator: random source of ``x_T`` and of the per-step noise (a CPU generator gives the same samples on
            every device); ``None`` uses torch's global generator.
        noise: ``x_T`` itself, instead of drawing it.

    Returns:
        ``x_0`` of ``shape``.
    """
    x = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype) if noise is None \
        else noise.to(device=device, dtype=dtype)  # [B, C, h, w]
    scheduler.set_timesteps(steps)  # timesteps stay on the CPU: plain ints for step(), no device syncs
    extra = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    for t in scheduler.timesteps.tolist():
        t_batch = torch.full((shape[0],), t, device=x.device, dtype=torch.long)  # [B]
        eps = eps_fn(x, t_batch)  # [B, C, h, w]
        # Both schedulers draw their step noise from `generator` in the same order (DDIM also at t = 0, where its
        # sigma is 0), so DDPM and DDIM with eta = 1 consume identical noise.
        x = scheduler.step(eps.to(dtype), t, x, generator=generator, **extra).prev_sample
    return x
