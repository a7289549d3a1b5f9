"""Training-step throughput: slotlab's step against a plain implementation of the same model, in the same process.

For each configuration (``paper``: the ``clevrtex`` preset, 128x128, K=11, paper CNN, batch 64 on a GPU; ``demo``:
the ``sprites-cpu`` preset, 32x32, K=7, batch 32) it prints images/s, peak memory, the model's FLOPs per image
(forward + backward, counted by :class:`torch.utils.flop_counter.FlopCounterMode`), achieved TFLOP/s and, on CUDA,
the fraction of the GPU's dense bf16 peak, for

* **slotlab**: the real :class:`slotlab.train.loop.Trainer` step (uint8 batch gathered and pinned on a thread,
  non-blocking copy, normalisation on the device, bf16 autocast on CUDA, channels-last, ``torch.compile``, fused
  k/v and Adam, no host-device sync), on procedural sprites at the configuration's resolution;
* **plain**: a textbook PyTorch port of the Slot Attention autoencoder (below; as in the popular reference ports:
  separate q/k/v, all B*K slots decoded as one batch, fp32, NCHW, PyTorch's default backend flags), trained by the
  textbook loop: normalise on the CPU, blocking copy, forward, MSE, backward, clip, Adam, ``loss.item()``.

Both see the same images and do the same maths (FLOP counts are printed for both). The ratio is slotlab / plain
images/s. Rounds alternate between the two so that other load on the machine hits both alike.

Usage::

    nice .venv/bin/python benchmarks/train_step.py                       # CPU: both configs, tiny batch at 128x128
    .venv/bin/python benchmarks/train_step.py --device cuda               # GPU: batch 64 / 32, compile on
    .venv/bin/python benchmarks/train_step.py --device cuda --configs paper --compile off   # ablation
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from slotlab.config import Config, apply_overrides, get_preset
from slotlab.train.loop import Trainer, batch_indices

# ------------------------------------------------------------------------------------------------------------------
# The plain reference: Slot Attention autoencoder as a textbook port writes it.


def build_grid(height: int, width: int) -> torch.Tensor:
    ys, xs = torch.linspace(0, 1, height), torch.linspace(0, 1, width)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y, 1 - x, 1 - y], dim=-1)  # [H, W, 4]


class PlainPositionEmbed(nn.Module):
    def __init__(self, channels: int, height: int, width: int):
        super().__init__()
        self.dense = nn.Linear(4, channels)
        self.register_buffer("grid", build_grid(height, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        return x + self.dense(self.grid).permute(2, 0, 1).unsqueeze(0)


class PlainSlotAttention(nn.Module):
    """Algorithm 1, line by line."""

    def __init__(self, num_slots: int, dim: int, input_dim: int, iters: int = 3, hidden_dim: int = 128,
                 eps: float = 1e-8):
        super().__init__()
        self.num_slots, self.iters, self.eps, self.scale = num_slots, iters, eps, dim**-0.5
        self.slots_mu = nn.Parameter(torch.randn(1, 1, dim))
        self.slots_log_sigma = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_inputs, self.norm_slots, self.norm_mlp = nn.LayerNorm(input_dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.project_q = nn.Linear(dim, dim, bias=False)
        self.project_k = nn.Linear(input_dim, dim, bias=False)
        self.project_v = nn.Linear(input_dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        b, d = inputs.shape[0], self.slots_mu.shape[-1]
        inputs = self.norm_inputs(inputs)
        k, v = self.project_k(inputs), self.project_v(inputs)  # [B, N, D]
        noise = torch.randn(b, self.num_slots, d, device=inputs.device)
        slots = self.slots_mu + self.slots_log_sigma.exp() * noise  # [B, K, D]
        for _ in range(self.iters):
            slots_prev = slots
            q = self.project_q(self.norm_slots(slots))  # [B, K, D]
            attn_logits = torch.einsum("bkd,bnd->bkn", q, k) * self.scale  # [B, K, N]
            attn = attn_logits.softmax(dim=1) + self.eps  # softmax over slots
            attn = attn / attn.sum(dim=-1, keepdim=True)  # weighted mean over inputs
            updates = torch.einsum("bkn,bnd->bkd", attn, v)  # [B, K, D]
            slots = self.gru(updates.reshape(-1, d), slots_prev.reshape(-1, d)).reshape(b, -1, d)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots


class PlainAutoencoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        m, resolution = config.model, config.data.resolution
        c = m.encoder_channels
        self.encoder_cnn = nn.Sequential(
            nn.Conv2d(3, c, 5, padding=2), nn.ReLU(), nn.Conv2d(c, c, 5, padding=2), nn.ReLU(),
            nn.Conv2d(c, c, 5, padding=2), nn.ReLU(), nn.Conv2d(c, c, 5, padding=2), nn.ReLU())
        self.encoder_pos = PlainPositionEmbed(c, resolution, resolution)
        self.layer_norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, m.input_dim), nn.ReLU(), nn.Linear(m.input_dim, m.input_dim))
        self.slot_attention = PlainSlotAttention(m.num_slots, m.slot_dim, m.input_dim, m.iters, m.slot_hidden_dim,
                                                 m.eps)
        self.decoder_size = m.decoder_grid
        self.decoder_pos = PlainPositionEmbed(m.slot_dim, m.decoder_grid, m.decoder_grid)
        dc, layers, channels = m.decoder_channels, [], m.slot_dim
        for _ in range(int(math.log2(resolution // m.decoder_grid))):
            layers += [nn.ConvTranspose2d(channels, dc, 5, stride=2, padding=2, output_padding=1), nn.ReLU()]
            channels = dc
        layers += [nn.ConvTranspose2d(channels, dc, 5, padding=2), nn.ReLU(), nn.ConvTranspose2d(dc, 4, 3, padding=1)]
        self.decoder_cnn = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.encoder_pos(self.encoder_cnn(image))  # [B, C, H, W]
        x = x.flatten(2).permute(0, 2, 1)  # [B, N, C]
        x = self.mlp(self.layer_norm(x))
        slots = self.slot_attention(x)  # [B, K, D]
        b, k, d = slots.shape
        x = slots.reshape(b * k, d, 1, 1).repeat(1, 1, self.decoder_size, self.decoder_size)  # spatial broadcast
        x = self.decoder_cnn(self.decoder_pos(x))  # [B*K, 4, H, W]
        x = x.reshape(b, k, 4, x.shape[-2], x.shape[-1])
        recons, masks = x[:, :, 1:], x[:, :, :1].softmax(dim=1)
        return (recons * masks).sum(dim=1)  # [B, 3, H, W]


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, raw_images: torch.Tensor,
               device: torch.device) -> float:
    """The textbook step: CPU normalisation, blocking copy, fp32 forward/backward, clip, Adam, read the loss."""
    image = (raw_images.permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous().to(device)  # [B, 3, H, W]
    loss = F.mse_loss(model(image), image)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


# ------------------------------------------------------------------------------------------------------------------
# Measurements


# Dense bf16 tensor-core peaks (TFLOP/s) from the vendor data sheets; --peak-tflops overrides.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
                    "A10G": 70.0, "L4": 121.0, "4090": 165.0}

CONFIGS = {"paper": "clevrtex", "demo": "sprites-cpu", "tetrominoes": "tetrominoes-cpu"}


@dataclass
class Result:
    name: str
    images_per_s: float
    best_images_per_s: float
    peak_mib: float
    flops_per_image: float


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_peak(device: torch.device, override: float) -> float | None:
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in BF16_PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return value
    return None


def count_flops(step_fn) -> float:
    """FLOPs of the matmuls and convolutions of one call (forward + backward), as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        step_fn()
    return float(counter.get_total_flops())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_memory_mib(step_fn, device: torch.device, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Peak tensor memory over one step: weights, gradients, optimizer state, activations and temporaries."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step_fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    # CPU: the profiler reports every allocation with the running total of bytes allocated since it started.
    from torch.profiler import ProfilerActivity, profile

    before = state_bytes(model, optimizer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step_fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return (before + max([0, *totals])) / 2**20


def count_syncs(step_fn, device: torch.device) -> int | None:
    """Host-device synchronisations in one step (CUDA's sync debug mode turns each into a warning)."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step_fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def benchmark_config(label: str, args: argparse.Namespace, device: torch.device) -> dict:
    preset = CONFIGS[label]
    base = get_preset(preset)
    on_gpu = device.type == "cuda"
    batch = args.batch or (base.train.batch_size if on_gpu else (2 if base.data.resolution >= 128 else 32))
    compile_ = on_gpu if args.compile == "auto" else args.compile == "on"
    config = apply_overrides(base, [
        "data.name=sprites", "data.min_objects=2", "data.max_objects=6", f"data.num_train={batch * 4}",
        f"data.num_val={batch}", f"train.batch_size={batch}",
        f"train.device={device.type}", f"train.compile={compile_}", f"train.precision={args.precision}",
        "train.log_every=1000000", "train.val_every=1000000", "train.ckpt_every=1000000",
    ])
    steps = args.steps or (20 if on_gpu else (1 if base.data.resolution >= 128 else 5))
    rounds = args.rounds or 5
    warmup = args.warmup if args.warmup >= 0 else (3 if on_gpu else 1)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, Path(tmp) / "run")

        def ours_step() -> None:
            trainer.train_step()
            trainer.step += 1

        torch.manual_seed(0)
        plain = PlainAutoencoder(config).to(device)
        plain_opt = torch.optim.Adam(plain.parameters(), lr=config.train.lr)
        images = trainer.train_set.images
        plain_state = {"step": 0}

        def plain_step_() -> None:
            idx = batch_indices(len(images), batch, plain_state["step"], 0)
            plain_step(plain, plain_opt, torch.from_numpy(images[idx]), device)
            plain_state["step"] += 1

        # PyTorch's default backend flags for the plain run (Trainer sets cudnn.benchmark and TF32 matmuls).
        default_flags = {"benchmark": False, "matmul_tf32": False}
        ours_flags = {"benchmark": torch.backends.cudnn.benchmark,
                      "matmul_tf32": torch.backends.cuda.matmul.allow_tf32}

        def use_flags(flags: dict) -> None:
            torch.backends.cudnn.benchmark = flags["benchmark"]
            torch.backends.cuda.matmul.allow_tf32 = flags["matmul_tf32"]

        runs = {"slotlab": (ours_step, ours_flags), "plain": (plain_step_, default_flags)}
        if args.no_plain:
            del runs["plain"]
        times: dict[str, list[float]] = {name: [] for name in runs}
        start = time.perf_counter()
        for fn, flags in runs.values():
            use_flags(flags)
            for _ in range(warmup):  # torch.compile, cuDNN autotuning, allocator warm-up
                fn()
            sync(device)
        compile_seconds = time.perf_counter() - start
        for round_ in range(rounds):
            order = list(runs.items())
            for name, (fn, flags) in order if round_ % 2 else order[::-1]:  # who goes first alternates too
                use_flags(flags)
                sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    fn()
                sync(device)
                times[name].append((time.perf_counter() - t0) / steps)

        syncs = {}
        peaks = {}
        for name, (fn, flags) in runs.items():
            use_flags(flags)
            syncs[name] = count_syncs(fn, device)
            model, optimizer = (trainer.model, trainer.optimizer) if name == "slotlab" else (plain, plain_opt)
            peaks[name] = peak_memory_mib(fn, device, model, optimizer)
        use_flags(ours_flags)

        # FLOPs per image of the model, counted on the meta device (shapes only, nothing computed).
        flop_batch = 2
        from slotlab.tasks import build_model

        with torch.device("meta"):
            meta_model = build_model(config)
            meta_plain = PlainAutoencoder(config)
            x = torch.empty(flop_batch, 3, config.data.resolution, config.data.resolution)

        def ours_flops() -> None:
            meta_model.compute_loss({"image": x}, 0)[0].backward()

        def plain_flops() -> None:
            F.mse_loss(meta_plain(x), x).backward()

        flops = {"slotlab": count_flops(ours_flops) / flop_batch, "plain": count_flops(plain_flops) / flop_batch}
        if trainer.prefetcher is not None:
            trainer.prefetcher.close()

    gc.collect()
    results = []
    for name in runs:
        per_step = statistics.median(times[name])
        results.append(Result(name, batch / per_step, batch / min(times[name]), peaks[name], flops[name]))
    return {"label": label, "preset": preset, "config": config, "batch": batch, "steps": steps, "rounds": rounds,
            "compile": compile_, "compile_seconds": compile_seconds, "results": results, "syncs": syncs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="paper,demo",
                        help="comma-separated: paper (clevrtex), demo (sprites-cpu), tetrominoes (tetrominoes-cpu)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda")
    parser.add_argument("--batch", type=int, default=0, help="0 = the preset's batch on CUDA; 2 / 32 on CPU")
    parser.add_argument("--steps", type=int, default=0, help="steps per timed round (0 = 20 on CUDA, 1-5 on CPU)")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds, alternating slotlab / plain")
    parser.add_argument("--warmup", type=int, default=-1, help="untimed steps first (compile, autotune)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA only")
    parser.add_argument("--precision", default="auto", help="train.precision for slotlab (auto = bf16 on CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 dense peak of the device (TFLOP/s)")
    parser.add_argument("--no-plain", action="store_true", help="time slotlab only")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON (with device and command)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    peak = bf16_peak(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"device: {name}{load}; torch {torch.__version__}; bf16 peak: {f'{peak:.0f} TFLOP/s' if peak else 'n/a'}")
    header = ("| config | impl | batch | images/s (median) | images/s (best) | ratio (median / best) | peak MiB | "
              "GFLOP/image | TFLOP/s | % bf16 peak | syncs/step |")
    rows, records = [], []
    for label in [c.strip() for c in args.configs.split(",") if c.strip()]:
        if label not in CONFIGS:
            raise SystemExit(f"unknown config {label!r} (known: {', '.join(CONFIGS)})")
        out = benchmark_config(label, args, device)
        cfg = out["config"]
        shape = (f"{label} ({out['preset']}): {cfg.data.resolution}x{cfg.data.resolution}, K={cfg.model.num_slots}, "
                 f"batch {out['batch']}, {out['steps']} steps x {out['rounds']} rounds, compile={out['compile']} "
                 f"(warm-up {out['compile_seconds']:.0f} s)")
        print(shape, flush=True)
        results = {r.name: r for r in out["results"]}
        plain = results.get("plain")
        for r in out["results"]:
            tflops = r.flops_per_image * r.images_per_s / 1e12
            ratio = "-"
            if plain:
                ratio = (f"{r.images_per_s / plain.images_per_s:.2f}x / "
                         f"{r.best_images_per_s / plain.best_images_per_s:.2f}x")
            share = f"{100 * tflops / peak:.1f}%" if peak else "-"
            syncs = out["syncs"][r.name]
            records.append({
                "config": label, "preset": out["preset"], "resolution": cfg.data.resolution,
                "num_slots": cfg.model.num_slots, "impl": r.name, "batch": out["batch"],
                "images_per_s_median": r.images_per_s, "images_per_s_best": r.best_images_per_s,
                "peak_mib": r.peak_mib, "gflop_per_image": r.flops_per_image / 1e9, "tflop_per_s": tflops,
                "syncs_per_step": syncs, "compile": out["compile"],
            })
            rows.append(f"| {label} {cfg.data.resolution}px K={cfg.model.num_slots} | {r.name} | {out['batch']} | "
                        f"{r.images_per_s:.2f} | {r.best_images_per_s:.2f} | {ratio} | {r.peak_mib:.0f} | "
                        f"{r.flops_per_image / 1e9:.2f} | {tflops:.3f} | {share} | "
                        f"{'-' if syncs is None else syncs} |")
    print()
    print(header)
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(row)
    if args.json:
        command = "python benchmarks/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "command": command,
                                               "rows": records}, indent=1) + "\n")
    print("\nratio = slotlab / plain images/s, of the median and of the best round; FLOPs = matmuls + convolutions, "
          "forward + backward (slotlab's Slot Attention needs slightly fewer: k and v are folded into the slot side).")


if __name__ == "__main__":
    main()
