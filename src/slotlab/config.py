"""Configs: frozen dataclasses, named presets and type-checked ``a.b=value`` overrides.

A run is fully described by one :class:`Config`. It is written to ``RUN_DIR/config.json`` and into every
checkpoint, so every later command (eval, compose, mix, report) rebuilds the model from the run directory alone.

Example:
    >>> cfg = apply_overrides(get_preset("smoke"), ["train.steps=5", "model.num_slots=4"])
    >>> cfg.train.steps, cfg.model.num_slots
    (5, 4)
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

from slotlab.errors import UserError


@dataclass(frozen=True)
class DataConfig:
    """Which images to train on and how they are prepared."""

    name: str = "sprites"  # registry name: sprites | clevrtex | folder (see slotlab.data)
    root: str = ""  # folder of on-disk datasets (clevrtex, folder); unused by procedural ones
    variant: str = "full"  # CLEVRTex variant: full, pbg, vbg, grassbg, camo, outd (or a rendered one: clevr, tex)
    resolution: int = 64  # side of the square images fed to the model
    num_train: int = 10_000  # size of procedural train split
    num_val: int = 500  # size of procedural val split
    min_objects: int = 2  # procedural scenes: fewest objects
    max_objects: int = 6  # procedural scenes: most objects; on-disk data: keep images with at most this many (0 = all)
    background: str = "noise"  # sprites: plain | noise
    seed: int = 0  # procedural data seed (train and val use disjoint streams)
    cache: bool = True  # keep prepared uint8 arrays (in memory or memory-mapped on disk)
    skip_bad: bool = False  # on-disk data: skip (and list) bad files instead of stopping
    num_workers: int = 0  # DataLoader worker processes


@dataclass(frozen=True)
class ModelConfig:
    """The slot model: encoder -> grouping (Slot Attention or a variant) -> decoder."""

    encoder: str = "paper_cnn"  # paper_cnn (4 conv 5x5) | resnet (report 001)
    encoder_channels: int = 64  # width of the CNN encoder
    input_dim: int = 64  # D_inputs: width of the tokens fed to the grouping module
    num_slots: int = 7  # K
    slot_dim: int = 64  # D_slots
    slot_hidden_dim: int = 128  # hidden width of the slot MLP
    iters: int = 3  # T, Slot Attention iterations
    eps: float = 1e-8  # added to attention before the weighted mean
    grouping: str = "slot_attention"  # slot_attention | slot_mixture | soft_kmeans
    slot_init: str = "gaussian"  # gaussian (learnable mu, sigma) | learned (K fixed queries) | bo_qsa
    decoder: str = "broadcast"  # broadcast | diffusion
    decoder_channels: int = 64  # width of the spatial broadcast decoder
    decoder_grid: int = 8  # side of the grid each slot is broadcast to
    quantiser: str = "none"  # none | vq (discrete slot codes, VQ-SA)


@dataclass(frozen=True)
class VQConfig:
    """Discrete slot codes (VQ-SA, slides 003)."""

    num_variables: int = 4  # L latent variables per slot
    codebook_size: int = 8  # M embeddings per variable
    beta: float = 0.01  # weight of KL(q(z|x) || uniform)
    tau_start: float = 1.0  # Gumbel-softmax temperature at step 0
    tau_end: float = 0.1  # temperature at the end of annealing
    anneal_steps: int = 10_000  # steps over which tau decays (exponentially)
    hard_after: int = 10_000  # straight-through (hard one-hot) from this step on


@dataclass(frozen=True)
class VAEConfig:
    """Stage 1 image autoencoder of the latent diffusion decoder (diffusers AutoencoderKL)."""

    latent_channels: int = 3
    block_out_channels: tuple[int, ...] = (64, 128, 128)  # two downsamplings: 128 -> 32
    layers_per_block: int = 1
    kl_weight: float = 1e-6


@dataclass(frozen=True)
class DiffusionConfig:
    """Stage 2: slot-conditioned latent diffusion (SlotDiffusion)."""

    vae_run: str = ""  # run directory of a trained VAE (task=vae); empty = identity latents (tests only)
    unet_channels: tuple[int, ...] = (64, 128, 256)
    layers_per_block: int = 1
    attention_head_dim: int = 32
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    sampler: str = "ddim"  # ddpm | ddim
    sample_steps: int = 50
    guidance_scale: float = 1.0  # classifier-free guidance; 1 = off
    cond_dropout: float = 0.0  # drop slots with this probability in training (enables guidance)
    ema_decay: float = 0.999


@dataclass(frozen=True)
class SetPredConfig:
    """Set property prediction head (Slot Attention paper, section 4.2)."""

    head_hidden_dim: int = 64
    coord_weight: float = 1.0
    huber_delta: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 4e-4
    schedule: str = "warmup_exp"  # warmup_exp (paper: x decay_rate every decay_steps) | warmup_cosine (report 001)
    warmup_steps: int = 100
    decay_rate: float = 0.5
    decay_steps: int = 100_000
    min_lr: float = 0.0  # floor of the cosine schedule
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    val_every: int = 200  # steps between validations
    val_batches: int = 4  # batches of the val split used for the val loss / ARI during training
    log_every: int = 20  # steps between metrics.jsonl lines
    ckpt_every: int = 200  # steps between 'last' checkpoints
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp32
    compile: bool = False  # torch.compile the model (CUDA recipe)
    threads: int = 0  # torch CPU threads; 0 = torch default


@dataclass(frozen=True)
class Config:
    """Everything that defines a run."""

    preset: str = "custom"
    task: str = "autoencoder"  # autoencoder | vae | slot_diffusion | setpred
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    setpred: SetPredConfig = field(default_factory=SetPredConfig)


# ----------------------------------------------------------------------------------------------------------------
# Presets

PRESETS: dict[str, Callable[[], Config]] = {}


def preset(name: str) -> Callable[[Callable[[], Config]], Callable[[], Config]]:
    """Register a function returning a :class:`Config` under ``name``."""

    def decorator(fn: Callable[[], Config]) -> Callable[[], Config]:
        PRESETS[name] = fn
        return fn

    return decorator


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Config:
    """Return the named preset; raises :class:`UserError` for an unknown name."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (known: {', '.join(list_presets())})")
    return replace(PRESETS[name](), preset=name)


@preset("smoke")
def _smoke() -> Config:
    """Tiny everything: one CPU step in well under a second (tests)."""
    return Config(
        data=DataConfig(resolution=16, num_train=16, num_val=8),
        model=ModelConfig(
            encoder_channels=8, input_dim=16, num_slots=3, slot_dim=16, slot_hidden_dim=16, decoder_channels=8,
            decoder_grid=4,
        ),
        train=TrainConfig(steps=2, batch_size=4, warmup_steps=1, val_every=2, val_batches=1, log_every=1,
                          ckpt_every=1),
    )


@preset("sprites-cpu")
def _sprites_cpu() -> Config:
    """The CPU demo: 2-6 occluding sprites at 32x32, trained in ~10 minutes on 2 cores."""
    return Config(
        data=DataConfig(name="sprites", resolution=32, num_train=20_000, num_val=500, min_objects=2, max_objects=6),
        model=ModelConfig(
            encoder_channels=32, input_dim=32, num_slots=7, slot_dim=64, slot_hidden_dim=128, decoder_channels=32,
            decoder_grid=8, slot_init="learned",
        ),
        train=TrainConfig(steps=3000, batch_size=32, lr=1e-3, schedule="warmup_cosine", warmup_steps=200,
                          val_every=500, val_batches=8, log_every=50, ckpt_every=250),
    )


@preset("clevrtex")
def _clevrtex() -> Config:
    """The assignment's GPU recipe: CLEVRTex at 128x128, K=11, paper CNN, 500k steps at batch 64."""
    return Config(
        data=DataConfig(name="clevrtex", root="data/clevrtex", variant="tex", resolution=128, max_objects=0),
        model=ModelConfig(encoder_channels=64, input_dim=64, num_slots=11, slot_dim=64, slot_hidden_dim=128,
                          decoder_channels=64, decoder_grid=8),
        train=TrainConfig(steps=500_000, batch_size=64, lr=4e-4, warmup_steps=10_000, decay_steps=100_000,
                          val_every=5000, val_batches=16, log_every=100, ckpt_every=2000, compile=True),
    )


# ----------------------------------------------------------------------------------------------------------------
# Overrides, (de)serialisation


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_value(text: str, type_: Any, key: str) -> Any:
    """Parse ``text`` as ``type_``; raise :class:`UserError` naming ``key`` when it does not fit."""
    try:
        if type_ is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if type_ is int:
            return int(text)
        if type_ is float:
            return float(text)
        if type_ is str:
            return text
        if typing.get_origin(type_) is tuple:
            (item_type, _ellipsis) = typing.get_args(type_)
            parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
            return tuple(_parse_value(p.strip(), item_type, key) for p in parts)
    except ValueError:
        name = getattr(type_, "__name__", str(type_))
        raise UserError(f"{key}={text!r}: expected a value of type {name}") from None
    raise UserError(f"{key}: cannot set a value of type {type_}")


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings, checking each key exists and each value parses as the field's type."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        config = _set_path(config, path, text, key)
    return config


def _set_path(obj: Any, path: list[str], text: str, key: str) -> Any:
    types_ = _field_types(type(obj))
    name = path[0]
    if name not in types_:
        raise UserError(f"unknown config key {key!r}")
    current = getattr(obj, name)
    if len(path) == 1:
        if is_dataclass(current):
            raise UserError(f"config key {key!r} is a section; set one of its fields")
        return replace(obj, **{name: _parse_value(text, types_[name], key)})
    if not is_dataclass(current):
        raise UserError(f"unknown config key {key!r}")
    return replace(obj, **{name: _set_path(current, path[1:], text, key)})


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any], cls: type = Config, where: str = "config") -> Any:
    """Rebuild a config from :func:`config_to_dict` output; unknown keys are an error, missing ones get defaults."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping")
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in data.items():
        if name not in types_:
            raise UserError(f"{where}: unknown config key {name!r}")
        type_ = types_[name]
        if is_dataclass(type_):
            kwargs[name] = config_from_dict(value, type_, f"{where}.{name}")
        elif typing.get_origin(type_) is tuple:
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = _check_type(value, type_, f"{where}.{name}")
    return cls(**kwargs)


def _check_type(value: Any, type_: Any, where: str) -> Any:
    if type_ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(type_, type) and not isinstance(value, type_) or (type_ is int and isinstance(value, bool)):
        raise UserError(f"{where}: expected {type_.__name__}, got {value!r}")
    return value


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as JSON (atomically)."""
    from slotlab.train.checkpoint import atomic_write_text

    atomic_write_text(Path(path), json.dumps(config_to_dict(config), indent=2) + "\n")


def load_config(path: Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing config file {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt config file {path}: {exc}") from None
    return config_from_dict(data, Config, str(path))


__all__ = [
    "Config", "DataConfig", "ModelConfig", "TrainConfig", "VQConfig", "VAEConfig", "DiffusionConfig", "SetPredConfig",
    "PRESETS", "preset", "list_presets", "get_preset", "apply_overrides", "config_to_dict", "config_from_dict",
    "save_config", "load_config",
]
