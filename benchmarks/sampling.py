"""Sampling speed of the SlotDiffusion decoder: images/s for DDPM-1000 and DDIM-50 at 128x128.

Builds the model of a preset (default ``slotdiffusion-clevrtex``: K=11 slots of 64 dims, a 3-level UNet on
32x32x3 latents, the VAE decoder back to 128x128) with untrained weights (speed does not depend on them) and times
``decode(slots)``, i.e. the whole sampler plus the VAE decoding.

* On CUDA both samplers run for real, every step.
* On CPU a full DDPM-1000 batch would take most of an hour, so one UNet pass (one step) and one VAE decoding are
  timed (best of ``--repeats``) and a sampler's time is extrapolated as ``steps * UNet + VAE decode``; a whole
  ``--cpu-steps``-step DDIM decode is timed too, as a check. The table says which rows are extrapolated.

The reference (ratio 1.0) is DDPM-1000 in the same process.

    python benchmarks/sampling.py                    # auto device
    python benchmarks/sampling.py --device cpu --batch 2 --cpu-steps 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from slotlab.config import get_preset
from slotlab.diffusion.slot_diffusion import SlotDiffusion, count_parameters
from slotlab.diffusion.vae import ImageVAE
from slotlab.runs import pick_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(model: SlotDiffusion, slots: torch.Tensor, sampler: str, steps: int, precision: str) -> float:
    """Seconds for one ``decode`` of the batch."""
    device = slots.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    _sync(device)
    start = time.perf_counter()
    with autocast:
        model.decode(slots, steps=steps, sampler=sampler, seed=0)
    _sync(device)
    return time.perf_counter() - start


def best_of(repeats: int, fn) -> float:
    return min(fn() for _ in range(repeats))


@torch.no_grad()
def time_unet(model: SlotDiffusion, slots: torch.Tensor, precision: str) -> float:
    """Seconds for one denoising step: one UNet pass (with cross-attention to the slots) on the batch."""
    device = slots.device
    latents = torch.randn(slots.shape[0], *model.latent_shape, device=device)
    t = torch.full((slots.shape[0],), 500, device=device, dtype=torch.long)
    _sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        model.sampling_denoiser()(latents, t, encoder_hidden_states=slots)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def time_vae_decode(model: SlotDiffusion, batch: int, device: torch.device, precision: str) -> float:
    """Seconds for decoding a batch of latents to images (the fixed cost of every decode)."""
    latents = torch.randn(batch, *model.latent_shape, device=device)
    _sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        model.latents_to_image(latents)
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="slotdiffusion-clevrtex")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=0, help="images per decode (default: 16 on CUDA, 2 on CPU)")
    parser.add_argument("--cpu-steps", type=int, default=3, help="CPU: steps of the whole-decode cross-check")
    parser.add_argument("--repeats", type=int, default=3, help="CPU: repeats of each timed part (best is kept)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--full", action="store_true", help="run every step even on CPU (slow)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON (with device and command)")
    args = parser.parse_args()

    device = pick_device(args.device)
    config = get_preset(args.preset)
    # An untrained VAE of the preset's `vae` shape stands in for the trained run named by diffusion.vae_run
    # (presets without one diffuse in pixel space).
    vae = ImageVAE(config) if config.diffusion.vae_run else None
    model = SlotDiffusion(config, vae=vae).to(device).eval()
    batch = args.batch or (16 if device.type == "cuda" else 2)
    slots = torch.randn(batch, config.model.num_slots, config.model.slot_dim, device=device)
    full = device.type == "cuda" or args.full

    runs = [("ddpm", config.diffusion.num_train_timesteps), ("ddim", 50)]
    time_decode(model, slots, "ddim", 2, args.precision)  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, check = [], ""
    if full:
        for sampler, steps in runs:
            seconds = time_decode(model, slots, sampler, steps, args.precision)
            rows.append((sampler, steps, seconds, batch / seconds, "measured"))
    else:
        # A shared, busy CPU: time the two parts of a decode separately (best of a few repeats) and add them up.
        per_step = best_of(args.repeats, lambda: time_unet(model, slots, args.precision))
        fixed = best_of(args.repeats, lambda: time_vae_decode(model, batch, device, args.precision))
        for sampler, steps in runs:
            seconds = fixed + steps * per_step
            how = f"extrapolated: {steps} x {per_step * 1e3:.0f} ms (UNet) + {fixed * 1e3:.0f} ms (VAE decode)"
            rows.append((sampler, steps, seconds, batch / seconds, how))
        n = args.cpu_steps
        measured = time_decode(model, slots, "ddim", n, args.precision)
        check = (f"check: a whole DDIM-{n} decode took {measured:.2f} s, the sum predicts {fixed + n * per_step:.2f} s "
                 f"(a busy machine makes single runs slower than the best-of-{args.repeats} parts)")

    c, h, w = model.latent_shape
    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads), precision {args.precision}, torch {torch.__version__}")
    print(f"preset {args.preset}: image {config.data.resolution}x{config.data.resolution}x3, latents {h}x{w}x{c}, "
          f"K={config.model.num_slots} slots x {config.model.slot_dim}, UNet {config.diffusion.unet_channels} "
          f"({count_parameters(model.denoiser) / 1e6:.1f}M params), batch {batch}")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    reference = rows[0][3]
    print()
    print(f"| {'sampler':8s} | {'steps':>5s} | {'s / batch':>10s} | {'images/s':>9s} | {'vs DDPM-1000':>12s} | how")
    print(f"|{'-' * 10}|{'-' * 7}|{'-' * 12}|{'-' * 11}|{'-' * 14}|-----")
    for sampler, steps, seconds, images_per_s, how in rows:
        print(f"| {sampler:8s} | {steps:5d} | {seconds:10.2f} | {images_per_s:9.3f} | {images_per_s / reference:11.1f}x"
              f" | {how}")
    if check:
        print(check)
    if args.json:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        record = {"device": device_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "precision": args.precision, "preset": args.preset, "batch": batch,
                  "command": "python benchmarks/sampling.py " + " ".join(sys.argv[1:]), "check": check,
                  "rows": [{"sampler": sampler, "steps": steps, "seconds_per_batch": seconds,
                            "images_per_s": images_per_s, "how": how}
                           for sampler, steps, seconds, images_per_s, how in rows]}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
