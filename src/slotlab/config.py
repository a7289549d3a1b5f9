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
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

from slotlab.errors import UserError


def _field(default: Any, *, lo: float | None = None, hi: float | None = None, gt: float | None = None,
           choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its allowed values: ``lo <= value <= hi``, ``value > gt``, or one of ``choices``.

    :func:`check_config` enforces them (and that every float is finite) whenever a config is built from a preset,
    overrides or a file, so a bad value fails with one line naming the key and the allowed range.
    """
    return field(default=default, metadata={"lo": lo, "hi": hi, "gt": gt, "choices": choices})


DATASET_NAMES = ("sprites", "tetrominoes", "multi_dsprites", "clevr6", "clevrtex", "folder")
PROCEDURAL_DATASETS = ("sprites", "tetrominoes", "multi_dsprites", "clevr6")  # drawn by slotlab from a seed
CLEVRTEX_VARIANT_NAMES = ("full", "pbg", "vbg", "grassbg", "camo", "outd", "clevr", "tex")
LOGGERS = ("tensorboard", "wandb", "mlflow")  # train.loggers
MAX_IMAGES = 10_000_000  # procedural split sizes
MAX_OBJECTS_IN_MASK = 255  # masks are uint8 object ids


@dataclass(frozen=True)
class DataConfig:
    """Which images to train on and how they are prepared."""

    name: str = _field("sprites", choices=DATASET_NAMES)  # registry name (see slotlab.data)
    root: str = ""  # folder of on-disk datasets (clevrtex, folder); unused by procedural ones
    # CLEVRTex variant: full, pbg, vbg, grassbg, camo, outd (or a rendered one: clevr, tex)
    variant: str = _field("full", choices=CLEVRTEX_VARIANT_NAMES)
    resolution: int = _field(64, lo=8, hi=1024)  # side of the square images fed to the model
    num_train: int = _field(10_000, lo=1, hi=MAX_IMAGES)  # size of procedural train split
    num_val: int = _field(500, lo=1, hi=MAX_IMAGES)  # size of procedural val split
    min_objects: int = _field(2, lo=1, hi=MAX_OBJECTS_IN_MASK)  # procedural scenes: fewest objects
    # procedural scenes: most objects; on-disk data: keep images with at most this many (0 = all)
    max_objects: int = _field(6, lo=0, hi=MAX_OBJECTS_IN_MASK)
    background: str = _field("noise", choices=("plain", "noise"))  # sprites background
    seed: int = _field(0, lo=0, hi=2**63 - 1)  # procedural data seed (train and val use disjoint streams)
    cache: bool = True  # keep prepared uint8 arrays (in memory or memory-mapped on disk)
    skip_bad: bool = False  # on-disk data: skip (and list) bad files instead of stopping
    crop: float = _field(0.8, gt=0.0, hi=1.0)  # on-disk data: centre crop side as a fraction of min(H, W)
    mask_background: str = ""  # folder colour masks: background "R,G,B" (empty = most frequent border colour)


@dataclass(frozen=True)
class ModelConfig:
    """The slot model: encoder -> grouping (Slot Attention or a variant) -> decoder."""

    encoder: str = _field("paper_cnn", choices=("paper_cnn", "resnet", "strided_cnn"))  # see slotlab.models
    encoder_channels: int = _field(64, lo=1, hi=4096)  # width of the CNN encoder
    input_dim: int = _field(64, lo=1, hi=4096)  # D_inputs: width of the tokens fed to the grouping module
    num_slots: int = _field(7, lo=1, hi=256)  # K
    slot_dim: int = _field(64, lo=1, hi=4096)  # D_slots
    slot_hidden_dim: int = _field(128, lo=1, hi=16384)  # hidden width of the slot MLP
    iters: int = _field(3, lo=1, hi=100)  # T, Slot Attention iterations
    # T outside training (validation, eval, generation); 0 = iters. More than in training often sharpens the slots
    test_iters: int = _field(0, lo=0, hi=100)
    # R draws of the Gaussian initial slots outside training (restarts); each image keeps the draw whose decoder masks
    # agree best with its attention masks (no labels). 1 = one draw; no effect with learned initial slots
    test_restarts: int = _field(1, lo=1, hi=1000)
    eps: float = _field(1e-8, gt=0.0, hi=1.0)  # added to attention before the weighted mean
    # slot_attention | invariant_slot_attention (slots with frames, Biza et al. 2023) | slot_mixture | soft_kmeans
    grouping: str = _field("slot_attention", choices=("slot_attention", "invariant_slot_attention", "slot_mixture",
                                                      "soft_kmeans"))
    # slot_mixture's E-step: gaussian (log-density, the slides) | mahalanobis (key-space distance, the authors' code)
    mixture_likelihood: str = _field("gaussian", choices=("gaussian", "mahalanobis"))
    # gaussian (learnable mu, sigma) | learned (K fixed queries) | bo_qsa (learned + implicit_grad)
    slot_init: str = _field("gaussian", choices=("gaussian", "learned", "bo_qsa"))
    # First-order implicit differentiation (Chang et al. 2022): backpropagate through the last iteration only, the
    # initial slots getting that gradient straight through. Implied by slot_init=bo_qsa (learned + this).
    implicit_grad: bool = False
    # Side the slot autoencoder works at (0 = data.resolution). Smaller: the encoder sees the image averaged down to
    # it, the decoder draws at it, and its masks and slot images are upsampled (bilinear) to data.resolution, where
    # the MSE and every score are taken: each step costs about (data.resolution / model.resolution)^2 times less
    resolution: int = _field(0, lo=0, hi=1024)
    # cnn: the spatial broadcast decoder (transposed convolutions); mlp: the same per pixel (1x1 layers), which
    # can decode a random subset of the pixels in training (decoder_pixels)
    decoder_kind: str = _field("cnn", choices=("cnn", "mlp"))
    decoder_channels: int = _field(64, lo=1, hi=4096)  # width of the spatial broadcast decoder
    decoder_grid: int = _field(8, lo=1, hi=1024)  # side of the grid each slot is broadcast to
    decoder_kernel: int = _field(5, lo=1, hi=15)  # kernel of the decoder's stride-1 layers (odd)
    decoder_layers: int = _field(1, lo=0, hi=32)  # stride-1 layers at full resolution (after the upsampling ones)
    #   (mlp: hidden layers)
    # mlp decoder: fraction of the pixels decoded (and scored by the MSE) per training step, drawn at random
    decoder_pixels: float = _field(1.0, gt=0.0, hi=1.0)
    # A background slot: slot 0 (the first learned query) is drawn by its own decoder on a background_grid x
    # background_grid map upsampled bilinearly: smooth, so it cannot take a small object. 0 = no background slot.
    background_grid: int = _field(0, lo=0, hi=1024)
    # Each slot's RGB drawn smooth, on a slot_rgb_grid x slot_rgb_grid map upsampled bilinearly (1 = one colour per
    # slot), its mask logit still by the broadcast decoder; 0 = the broadcast decoder draws both. A slot can then not
    # paint two objects of different colours, or an object and the background, at once.
    slot_rgb_grid: int = _field(0, lo=0, hi=1024)
    # Weight of a loss teaching the decoder's masks the attention masks (per-pixel cross-entropy, the attention
    # passing no gradient), from the fraction mask_agreement_from of training on: late in training, where the
    # attention has bound and the decoder cuts objects between slots. 0 = off.
    mask_agreement: float = _field(0.0, lo=0.0)
    mask_agreement_from: float = _field(0.0, lo=0.0, hi=1.0)
    # Masks the reconstruction is composed with: decoder (the paper: the decoder's alpha masks) | attention (Slot
    # Attention's masks of the last iteration, upsampled, with each slot's RGB from the decoder: the reconstruction
    # loss then shapes the attention itself; the decoder's own masks, for drawing from slots alone, learn from the
    # attention's through model.mask_agreement)
    recon_masks: str = _field("decoder", choices=("decoder", "attention"))
    # Masks handed out outside training (scores, pictures): the mixing masks above (false) or each pixel's posterior
    # over the slots given its colour (true): the masks times the Gaussian likelihood of the pixel under each slot's
    # image, with the image's own reconstruction error as the variance (no labels, no tuned scale). Sharpens coarse
    # attention masks to the colour edges (Multi-dSprites, flat colours); hurts where slot images are blurred renders
    # (CLEVR6). Training, the reconstruction and drawing from slots are unchanged
    mask_posterior: bool = False
    # Weight of a loss that slots pay for holding regions apart (slot_compactness: each slot's spatial spread over
    # its share of the image): with the attention composing the image and one colour per slot, the reconstruction
    # lets one slot paint two objects of one colour in two places; this does not. 0 = off
    compactness: float = _field(0.0, lo=0.0)
    # gamma: from the second iteration on, each slot's attention logits get -gamma * log(the share of the pixels it
    # took in the previous iteration), a step of Sinkhorn's balancing at gamma = 1, so no learned query stays empty
    # while others take two objects each (slot_attention and invariant_slot_attention). 0 = the paper's attention
    slot_balance: float = _field(0.0, lo=0.0)
    # Decoder position embedding: 0 = the paper's linear map of (x, y, 1-x, 1-y); L > 0 = Fourier features of
    # (x, y) with L octaves (in each slot's frame under invariant slot attention), for sharp edges sooner
    decoder_octaves: int = _field(0, lo=0, hi=16)
    # With decoder_octaves: fade the octaves in from coarse to fine over this many steps (BARF); 0 = all at once
    decoder_octave_fade: int = _field(0, lo=0, hi=10**9)
    # Coordinates the broadcast decoder draws each slot in: image (the paper: absolute x, y); centre (relative to the
    # centre of the slot's attention, so a shape is learned once for every place); centre_spread (also divided by
    # the attention's spread, so once for every size too). Invariant slot attention brings its own frames.
    decoder_frame: str = _field("image", choices=("image", "centre", "centre_spread"))
    # The decoder's first layer gets a term u_c x + v_c y per channel with (u_c, v_c) from the slot, so each slot
    # turns its edges' directions too (in the paper's decoder it only moves them: the directions are shared)
    decoder_slot_edges: bool = False
    quantiser: str = _field("none", choices=("none", "vq"))  # vq: discrete slot codes (VQ-SA)


@dataclass(frozen=True)
class VQConfig:
    """Discrete slot codes (VQ-SA, slides 003)."""

    num_variables: int = _field(4, lo=1, hi=256)  # L latent variables per slot
    codebook_size: int = _field(8, lo=1, hi=65536)  # M embeddings per variable
    beta: float = _field(0.01, lo=0.0)  # weight of KL(q(z|x) || uniform)
    tau_start: float = _field(1.0, gt=0.0)  # Gumbel-softmax temperature at step 0
    tau_end: float = _field(0.1, gt=0.0)  # temperature at the end of annealing
    anneal_steps: int = _field(10_000, lo=1)  # steps over which tau decays (exponentially)
    hard_after: int = _field(10_000, lo=0)  # straight-through (hard one-hot) from this step on
    code_dim: int = _field(16, lo=1, hi=4096)  # E, size of one codebook embedding
    keep_position: bool = False  # pass each slot's attention centre (x, y) through unquantised (autoencoder)
    init_run: str = ""  # two-stage VQ-SA: a trained Slot Attention run whose encoder, grouping and decoder
    #   weights start a new run (read once when training starts; empty = train from scratch)
    freeze_grouping: bool = False  # with init_run: keep its encoder and grouping fixed (train quantiser, decoder)


@dataclass(frozen=True)
class VAEConfig:
    """Stage 1 image autoencoder of the latent diffusion decoder (diffusers AutoencoderKL)."""

    latent_channels: int = _field(3, lo=1, hi=1024)
    block_out_channels: tuple[int, ...] = _field((64, 128, 128), lo=1, hi=4096)  # two downsamplings: 128 -> 32
    layers_per_block: int = _field(1, lo=1, hi=16)
    kl_weight: float = _field(1e-6, lo=0.0)


@dataclass(frozen=True)
class DiffusionConfig:
    """Stage 2: slot-conditioned latent diffusion (SlotDiffusion)."""

    vae_run: str = ""  # run directory of a trained VAE (task=vae); empty = identity latents (tests only)
    unet_channels: tuple[int, ...] = _field((64, 128, 256), lo=1, hi=4096)
    layers_per_block: int = _field(1, lo=1, hi=16)
    attention_head_dim: int = _field(32, lo=1, hi=4096)
    num_train_timesteps: int = _field(1000, lo=2, hi=100_000)
    beta_start: float = _field(0.0001, gt=0.0, hi=1.0)
    beta_end: float = _field(0.02, gt=0.0, hi=1.0)
    sampler: str = _field("ddim", choices=("ddpm", "ddim"))
    sample_steps: int = _field(50, lo=1, hi=100_000)
    eta: float = _field(0.0, lo=0.0, hi=1.0)  # DDIM noise: 0 = deterministic, 1 = the DDPM posterior variance
    guidance_scale: float = _field(1.0, lo=0.0, hi=100.0)  # classifier-free guidance; 1 = off
    cond_dropout: float = _field(0.0, lo=0.0, hi=0.99)  # drop slots with this probability (enables guidance)
    ema_decay: float = _field(0.999, lo=0.0, hi=0.999999)


@dataclass(frozen=True)
class SlateConfig:
    """SLATE (Singh et al. 2022): a dVAE over 4x4 patches (task ``dvae``), then slots decoded by an autoregressive
    transformer over its tokens (task ``slate``). The ``dvae_*`` / ``vocab_size`` / ``tau_*`` keys describe the dVAE;
    a ``slate`` run copies them from ``dvae_run`` when it starts."""

    vocab_size: int = _field(1024, lo=2, hi=65536)  # V, tokens of the dVAE
    dvae_channels: int = _field(64, lo=1, hi=4096)  # width of the dVAE's CNNs
    tau_start: float = _field(1.0, gt=0.0)  # Gumbel-softmax temperature at step 0
    tau_end: float = _field(0.1, gt=0.0)  # temperature after tau_steps (cosine annealing)
    tau_steps: int = _field(30_000, lo=1)
    dvae_run: str = ""  # run directory of a trained dVAE (task=dvae); empty = an untrained one (tests only)
    d_model: int = _field(192, lo=1, hi=8192)  # width of the token embedding and of the transformer
    num_layers: int = _field(4, lo=1, hi=64)  # transformer decoder blocks
    num_heads: int = _field(4, lo=1, hi=256)
    dropout: float = _field(0.1, lo=0.0, hi=0.99)
    temperature: float = _field(0.0, lo=0.0, hi=100.0)  # sampling: 0 = greedy, else softmax(logits / temperature)


@dataclass(frozen=True)
class SetPredConfig:
    """Set property prediction head (Slot Attention paper, section 4.2)."""

    head_hidden_dim: int = _field(64, lo=1, hi=16384)
    coord_weight: float = _field(1.0, lo=0.0)
    huber_delta: float = _field(1.0, gt=0.0)
    # values per categorical property, in obj_props order (sprites)
    property_sizes: tuple[int, ...] = _field((5, 8, 2), lo=1, hi=100_000)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, logging and checkpointing."""

    steps: int = _field(1000, lo=1, hi=10**9)
    time_budget: float = _field(0.0, lo=0.0)  # minutes of training (0 = none): stop there, schedule ends there
    batch_size: int = _field(32, lo=1, hi=65536)
    lr: float = _field(4e-4, gt=0.0)
    # warmup_exp (paper: x decay_rate every decay_steps) | warmup_cosine (report 001) | constant
    schedule: str = _field("warmup_exp", choices=("warmup_exp", "warmup_cosine", "constant"))
    warmup_steps: int = _field(100, lo=0, hi=10**9)
    decay_rate: float = _field(0.5, gt=0.0, hi=1.0)
    decay_steps: int = _field(100_000, lo=1)
    min_lr: float = _field(0.0, lo=0.0)  # floor of the cosine schedule
    # learning rate of the decoder's parameters as a multiple of lr (the schedule scales both alike)
    decoder_lr_scale: float = _field(1.0, gt=0.0, hi=1000.0)
    grad_clip: float = _field(1.0, lo=0.0)  # max global grad norm; 0 = off
    val_every: int = _field(200, lo=1)  # steps between validations
    val_batches: int = _field(4, lo=1, hi=100_000)  # val batches used for the val loss / ARI during training
    log_every: int = _field(20, lo=1)  # steps between metrics.jsonl lines
    ckpt_every: int = _field(200, lo=1)  # steps between 'last' checkpoints
    # steps between kept snapshots, checkpoints/step-<N>.pt, that a branch (--from RUN --checkpoint step-<N>) or
    # `slotlab eval --checkpoint step-<N>` can start from later (0 = none: only last.pt and best.pt)
    keep_every: int = _field(0, lo=0)
    seed: int = _field(0, lo=0, hi=2**62)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp32
    precision: str = _field("auto", choices=("auto", "bf16", "fp32"))
    compile: bool = False  # torch.compile the model (CUDA recipe)
    threads: int = _field(0, lo=0, hi=1024)  # torch CPU threads; 0 = torch default
    # where scalars and mask pictures go besides metrics.jsonl: a comma list of tensorboard, wandb, mlflow ("" = none)
    loggers: str = "tensorboard"


@dataclass(frozen=True)
class Config:
    """Everything that defines a run."""

    preset: str = "custom"
    task: str = _field("autoencoder", choices=("autoencoder", "vae", "slot_diffusion", "setpred", "dvae",
                                                          "slate"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    setpred: SetPredConfig = field(default_factory=SetPredConfig)
    slate: SlateConfig = field(default_factory=SlateConfig)


# Overrides that --resume accepts: they change how long and how observably a run goes on, never what it computes.
RESUME_SAFE_KEYS = (
    "train.steps", "train.time_budget", "train.log_every", "train.val_every", "train.val_batches",
    "train.ckpt_every", "train.keep_every", "train.device", "train.threads", "train.loggers", "data.root",
    "data.cache", "data.skip_bad",
)


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
        raise UserError(f"unknown preset {name!r}{_closest(name, list_presets())} (known: {', '.join(list_presets())})")
    return check_config(replace(PRESETS[name](), preset=name))


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
    """The CPU demo: 2-6 occluding sprites at 32x32, K=7, a 9-minute training budget on 2 cores."""
    return Config(
        data=DataConfig(name="sprites", resolution=32, num_train=20_000, num_val=500, min_objects=2, max_objects=6),
        model=ModelConfig(
            encoder_channels=32, input_dim=32, num_slots=7, slot_dim=64, slot_hidden_dim=128, decoder_channels=32,
            # Broadcast at full resolution with 3x3 kernels (the paper's multi-dSprites decoder, narrower): the
            # small receptive field ties each slot to a place, and objects emerge in hundreds of steps, not thousands.
            decoder_grid=32, decoder_layers=3, decoder_kernel=3,
            # BO-QSA (learned queries, gradient through the last iteration only) with T=7: the same cost per step as
            # T=3 (the first six iterations build no graph), and neither seed tried collapsed into identical slots.
            # T=100 outside training (4.9 s against 3.4 s at T=7 to score 500 images): with the slot balance the
            # iteration goes on giving the second sprite of a colour a slot of its own after T=7 (one run: val FG-ARI
            # 0.821 / 0.867 / 0.870 at T = 7 / 30 / 100, test 0.825 / 0.856 / 0.864; levers.md, eighteenth session).
            slot_init="bo_qsa", iters=7, test_iters=100,
            # The image composed with Slot Attention's own masks, one colour per slot (as multi-dsprites-cpu): the
            # sprites keep their shapes and colours, where the decoder's masks drew round blobs of two hues.
            # Not model.mask_posterior (as multi-dsprites-cpu): one colour per slot does not fit the noisy background,
            # whose pixels the posterior then scatters over the sprites' slots (ARI 0.74 -> 0.34, FG-ARI 0.74 -> 0.77).
            recon_masks="attention", slot_rgb_grid=1, mask_agreement=0.02,
            # Slots pay for holding regions apart (model.compactness), and a slot that took few pixels gets a share
            # (model.slot_balance): without them the learned queries became five colour bins, every sprite of a
            # bin's hues in one slot wherever it lay (val FG-ARI 0.742 -> 0.817, ARI 0.744 -> 0.993; levers.md,
            # seventeenth session).
            compactness=0.05, slot_balance=1.0,
        ),
        # A 9-minute training budget (the cosine ends with it), so that `make demo` (install, data, training,
        # evaluation, report) ends within 15 minutes on two cores however fast this machine is today. bf16 autocast
        # (as tetrominoes-cpu): 1.7x the steps of fp32 in the same minutes (levers.md, eighteenth session).
        train=TrainConfig(steps=1_000_000, time_budget=9.0, batch_size=32, lr=1e-3, schedule="warmup_cosine",
                          warmup_steps=200, val_every=250, val_batches=8, log_every=50, ckpt_every=250,
                          precision="bf16"),
    )


def _sprites_cpu_measured_train(base: Config) -> TrainConfig:
    """``sprites-cpu``'s training settings before the eighteenth session (fp32 on a CPU), with which the presets built
    on it (VQ-SA's second stage, SLATE) were measured."""
    return replace(base.train, precision="auto")


@preset("tetrominoes-cpu")
def _tetrominoes_cpu() -> Config:
    """Tetrominoes (35x35, three pieces, K=4) on two CPU cores in a 15-minute training budget.

    bf16 autocast: on a CPU with native bf16, 1.7x the steps of fp32 in the same minutes, FG-ARI per step about the
    same. The decoder learns at 5x the learning rate of the encoder and Slot Attention (``train.decoder_lr_scale``):
    it draws the pieces' square corners thousands of steps sooner, and slots bind sooner with it. (At 10x one seed in
    three spread the black background over every slot; Fourier decoder positions, ``model.decoder_octaves=4``, bound
    sooner but one seed in three fell into horizontal stripes: docs/discovery/levers.md.)
    """
    return Config(
        data=DataConfig(name="tetrominoes", resolution=35, num_train=60_000, num_val=320, min_objects=3,
                        max_objects=3),
        model=ModelConfig(encoder_channels=32, input_dim=32, num_slots=4, slot_dim=64, slot_hidden_dim=128,
                          decoder_channels=32, decoder_grid=35, decoder_layers=3, decoder_kernel=3,
                          slot_init="bo_qsa", iters=7),
        train=TrainConfig(steps=1_000_000, time_budget=15.0, batch_size=32, lr=4e-4, schedule="warmup_cosine",
                          warmup_steps=200, val_every=500, val_batches=10, log_every=50, ckpt_every=250,
                          precision="bf16", decoder_lr_scale=5.0),
    )


@preset("multi-dsprites-cpu")
def _multi_dsprites_cpu() -> Config:
    """Multi-dSprites (64x64, 2-5 coloured sprites on grey, K=6) on two CPU cores in a 60-minute training budget.

    bf16 autocast as in ``tetrominoes-cpu``; the slot autoencoder works at 32x32 (``model.resolution``). The image is
    composed with Slot Attention's own masks (``model.recon_masks=attention``) and one colour per slot
    (``model.slot_rgb_grid=1``): the reconstruction loss shapes the attention directly, which follows each sprite's
    outline from the first steps, where the broadcast decoder's masks were round blobs after an hour; a slot of one
    colour cannot paint two sprites. The decoder's own masks learn the attention's (``model.mask_agreement``) for
    drawing from slots alone. The masks handed out are each pixel's posterior over the slots given its colour
    (``model.mask_posterior``): the attention, drawn on the 32x32 grid, blurs every edge, and the posterior moves
    each edge to where the colours change (last session's seed 0, the same checkpoint: val FG-ARI 0.779 -> 0.929,
    ARI 0.869 -> 0.927). Seeds 0, 1 and 2 of the preset: val FG-ARI 0.909, 0.920 and 0.880 (the attention masks
    0.768, 0.784 and 0.767).
    docs/discovery/levers.md, fifteenth and sixteenth sessions.
    """
    return Config(
        data=DataConfig(name="multi_dsprites", resolution=64, num_train=60_000, num_val=320, min_objects=2,
                        max_objects=5),
        model=ModelConfig(encoder_channels=32, input_dim=32, num_slots=6, slot_dim=64, slot_hidden_dim=128,
                          decoder_channels=32, decoder_grid=32, decoder_layers=3, decoder_kernel=3, resolution=32,
                          slot_init="bo_qsa", iters=7, recon_masks="attention", slot_rgb_grid=1,
                          mask_agreement=0.02, mask_posterior=True),
        train=TrainConfig(steps=1_000_000, time_budget=60.0, batch_size=32, lr=4e-4, schedule="warmup_cosine",
                          warmup_steps=200, val_every=500, val_batches=10, log_every=50, ckpt_every=250,
                          precision="bf16"),
    )


@preset("clevr6-cpu")
def _clevr6_cpu() -> Config:
    """CLEVR6 (3-6 ray-cast CLEVR objects at 64x64, K=7) on two CPU cores in a 120-minute training budget.

    The paper's Gaussian slots with T=3 in training and T=7 outside it (``model.test_iters``: Slot Attention goes on
    refining its slots past the trained T). The slot autoencoder works at 32x32 (``model.resolution``; the MSE and
    every score stay at 64x64): 3.5x the steps of 64x64 in the same minutes, with bf16 autocast. From a quarter of the
    budget on, the decoder's masks are also taught the attention masks (``model.mask_agreement``): by then the
    attention has bound better than the decoder draws (FG-ARI 0.84 against 0.73), and the decoder cuts objects
    between two slots. Outside training each image's slots are the best of 8 draws of the initial slots
    (``model.test_restarts``): the draw whose decoder masks agree best with its attention masks, chosen without
    labels. Four seeds, val FG-ARI (decoder masks, T=7): 0.897 / 0.855 / 0.869 / 0.899 with the 8 restarts (mean
    0.880; test 0.897 / 0.853 / 0.866 / 0.894), 0.850 / 0.818 / 0.795 / 0.848 with one draw (mean 0.828).
    docs/discovery/levers.md has the runs behind each choice.
    """
    return Config(
        data=DataConfig(name="clevr6", resolution=64, num_train=40_000, num_val=320, min_objects=3, max_objects=6),
        model=ModelConfig(encoder_channels=32, input_dim=32, num_slots=7, slot_dim=64, slot_hidden_dim=128,
                          decoder_channels=32, decoder_grid=32, decoder_layers=3, decoder_kernel=3, resolution=32,
                          slot_init="gaussian", iters=3, test_iters=7, test_restarts=8, mask_agreement=0.02,
                          mask_agreement_from=0.25),
        train=TrainConfig(steps=1_000_000, time_budget=120.0, batch_size=32, lr=4e-4, schedule="warmup_cosine",
                          warmup_steps=200, val_every=500, val_batches=10, log_every=50, ckpt_every=250,
                          precision="bf16"),
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


@preset("vqsa-smoke")
def _vqsa_smoke() -> Config:
    """VQ-SA (discrete slot codes) at smoke size: one CPU step in well under a second (tests)."""
    base = _smoke()
    return replace(base, model=replace(base.model, quantiser="vq"),
                   vq=VQConfig(num_variables=2, codebook_size=4, code_dim=4, anneal_steps=2, hard_after=1,
                               keep_position=True))


@preset("vqsa-sprites")
def _vqsa_sprites() -> Config:
    """VQ-SA on CPU, stage 2 on a sprites-cpu run: --set vq.init_run=RUN (frozen slots, 4 x 8 codes, 800 steps)."""
    base = _sprites_cpu()  # the same encoder, grouping and decoder, so a sprites-cpu run can start this one
    return replace(
        base,
        model=replace(base.model, quantiser="vq", test_iters=0),  # as measured: T=7 in and outside training
        train=replace(_sprites_cpu_measured_train(base), steps=800, time_budget=0.0, warmup_steps=50, val_every=200,
                      val_batches=4, log_every=25, ckpt_every=100),
        # Without vq.init_run the same config trains VQ-SA end to end from scratch (nothing frozen).
        vq=VQConfig(num_variables=4, codebook_size=8, code_dim=16, beta=0.01, tau_start=1.0, tau_end=0.1,
                    anneal_steps=600, hard_after=600, keep_position=True, freeze_grouping=True),
    )


@preset("vqsa-clevr")
def _vqsa_clevr() -> Config:
    """VQ-SA GPU recipe on rendered CLEVR scenes (`slotlab data render --variant clevr`): 128x128, K=11, 4 x 8 codes."""
    base = _clevrtex()
    return replace(
        base,
        data=replace(base.data, variant="clevr"),
        model=replace(base.model, quantiser="vq"),
        train=replace(base.train, steps=200_000),
        vq=VQConfig(num_variables=4, codebook_size=8, code_dim=16, beta=1e-3, tau_start=1.0, tau_end=0.1,
                    anneal_steps=100_000, hard_after=150_000, keep_position=True),
    )


@preset("vae-smoke")
def _vae_smoke() -> Config:
    """Stage-1 image autoencoder (AutoencoderKL) at smoke size: 16x16 -> 8x8x3 latents (tests)."""
    return replace(_smoke(), task="vae", vae=VAEConfig(block_out_channels=(8, 16), layers_per_block=1))


@preset("vae-clevrtex")
def _vae_clevrtex() -> Config:
    """Stage-1 KL-VAE for SlotDiffusion on rendered tex scenes: 128x128x3 -> 32x32x3 latents (GPU)."""
    base = _clevrtex()
    return replace(
        base, task="vae",
        vae=VAEConfig(latent_channels=3, block_out_channels=(64, 128, 256), layers_per_block=2, kl_weight=1e-6),
        train=TrainConfig(steps=50_000, batch_size=32, lr=1e-4, schedule="warmup_cosine", warmup_steps=1000,
                          val_every=2000, val_batches=16, log_every=100, ckpt_every=2000),
    )


@preset("slotdiffusion-smoke")
def _slotdiffusion_smoke() -> Config:
    """SlotDiffusion at smoke size: diffusion on 16x16 pixels (no VAE), a 2-level UNet (tests)."""
    return replace(_smoke(), task="slot_diffusion",
                   diffusion=DiffusionConfig(vae_run="", unet_channels=(16, 32), attention_head_dim=8,
                                             sample_steps=2, cond_dropout=0.1))


@preset("slotdiffusion-clevrtex")
def _slotdiffusion_clevrtex() -> Config:
    """SlotDiffusion GPU recipe: `clevrtex`'s encoder and K=11 slots, UNet on the latents of runs/vae-clevrtex."""
    base = _clevrtex()
    return replace(
        base, task="slot_diffusion",
        vae=_vae_clevrtex().vae,  # documents the stage-1 model; the weights and shape come from diffusion.vae_run
        diffusion=DiffusionConfig(vae_run="runs/vae-clevrtex", unet_channels=(64, 128, 256), layers_per_block=2,
                                  attention_head_dim=32, sampler="ddim", sample_steps=50, ema_decay=0.999),
        train=TrainConfig(steps=200_000, batch_size=64, lr=2e-4, schedule="warmup_cosine", warmup_steps=5000,
                          val_every=5000, val_batches=16, log_every=100, ckpt_every=2000),
    )

@preset("dvae-smoke")
def _dvae_smoke() -> Config:
    """SLATE's stage 1 at smoke size: 16x16 images -> 4x4 tokens of a 16-word vocabulary (tests)."""
    return replace(_smoke(), task="dvae", slate=SlateConfig(vocab_size=16, dvae_channels=8, tau_steps=2))


@preset("slate-smoke")
def _slate_smoke() -> Config:
    """SLATE at smoke size: a one-block transformer over the 16 tokens of an untrained dVAE (tests)."""
    return replace(_smoke(), task="slate",
                   slate=replace(_dvae_smoke().slate, d_model=16, num_layers=1, num_heads=2, dropout=0.0))


def _sprites_slot_attention() -> Config:
    """``sprites-cpu`` without what belongs to its pixel decoder (attention masks composing the image, one colour
    per slot, the mask agreement, the compactness loss): the base of the SLATE presets, whose transformer decodes
    instead. Nor the slot balance, T=100 at test time or bf16 on a CPU: SLATE's numbers were measured without them."""
    base = _sprites_cpu()
    return replace(base, model=replace(base.model, recon_masks="decoder", slot_rgb_grid=0, mask_agreement=0.0,
                                       compactness=0.0, slot_balance=0.0, test_iters=0),
                   train=_sprites_cpu_measured_train(base))


@preset("dvae-sprites")
def _dvae_sprites() -> Config:
    """SLATE's dVAE on the CPU demo's sprites: 32x32 -> 8x8 tokens of 512 words, a 3-minute budget on 2 cores."""
    base = _sprites_slot_attention()
    return replace(base, task="dvae", slate=SlateConfig(vocab_size=512, dvae_channels=64, tau_steps=2000),
                   train=replace(base.train, time_budget=3.0, lr=1e-3, warmup_steps=100))


@preset("slate-sprites")
def _slate_sprites() -> Config:
    """SLATE on CPU, stage 2 on a dvae-sprites run (--set slate.dvae_run=RUN): sprites-cpu's Slot Attention, a
    4-block transformer, a 6-minute budget, so that dVAE + SLATE take sprites-cpu's 9 minutes."""
    base = _sprites_slot_attention()
    return replace(base, task="slate",
                   slate=replace(_dvae_sprites().slate, dvae_run="runs/dvae-sprites", d_model=128, num_layers=4,
                                 num_heads=4, dropout=0.1),
                   train=replace(base.train, time_budget=6.0, lr=3e-4, warmup_steps=200))


@preset("dvae-clevrtex")
def _dvae_clevrtex() -> Config:
    """SLATE's dVAE, GPU recipe: 128x128 tex scenes -> 32x32 tokens of 1024 words, tau 1 -> 0.1 over 30k steps."""
    base = _clevrtex()
    return replace(
        base, task="dvae", slate=SlateConfig(vocab_size=1024, dvae_channels=64, tau_start=1.0, tau_end=0.1,
                                             tau_steps=30_000),
        train=TrainConfig(steps=100_000, batch_size=64, lr=3e-4, schedule="warmup_cosine", warmup_steps=1000,
                          val_every=2000, val_batches=16, log_every=100, ckpt_every=2000),
    )


@preset("slate-clevrtex")
def _slate_clevrtex() -> Config:
    """SLATE, GPU recipe (Singh et al. 2022's settings): K=11 slots of 192, d_model 192, 4 blocks, 4 heads, dropout
    0.1, lr 3e-4 with a 30k-step warm-up, batch 64, 250k steps, on the tokens of runs/dvae-clevrtex."""
    base = _clevrtex()
    return replace(
        base, task="slate",
        model=replace(base.model, input_dim=192, slot_dim=192, slot_hidden_dim=192, iters=3),
        slate=replace(_dvae_clevrtex().slate, dvae_run="runs/dvae-clevrtex", d_model=192, num_layers=4, num_heads=4,
                      dropout=0.1),
        train=TrainConfig(steps=250_000, batch_size=64, lr=3e-4, schedule="warmup_cosine", warmup_steps=30_000,
                          val_every=5000, val_batches=16, log_every=100, ckpt_every=2000, grad_clip=1.0),
    )


@preset("setpred-smoke")
def _setpred_smoke() -> Config:
    """Set property prediction at smoke size on sprites (shape, colour, size + x, y): one CPU step (tests)."""
    base = _smoke()
    return replace(base, task="setpred", data=replace(base.data, max_objects=3),
                   model=replace(base.model, num_slots=4), setpred=SetPredConfig(head_hidden_dim=16))


@preset("setpred-sprites")
def _setpred_sprites() -> Config:
    """Set property prediction on CPU: 32x32 sprites with 2-4 objects, K=5; ~10-40 minutes on 2 cores."""
    return Config(
        task="setpred",
        data=DataConfig(name="sprites", resolution=32, num_train=20_000, num_val=500, min_objects=2, max_objects=4),
        model=ModelConfig(encoder="strided_cnn", encoder_channels=32, input_dim=32, num_slots=5, slot_dim=64,
                          slot_hidden_dim=128, slot_init="learned"),
        train=TrainConfig(steps=10_000, batch_size=32, lr=1e-3, schedule="warmup_cosine", warmup_steps=200,
                          val_every=1000, val_batches=8, log_every=50, ckpt_every=250),
        setpred=SetPredConfig(head_hidden_dim=64, property_sizes=(5, 8, 2)),
    )


@preset("setpred-clevr")
def _setpred_clevr() -> Config:
    """The paper's set prediction recipe (GPU) on rendered CLEVR scenes: 128x128, K=10, batch 512, 150k steps."""
    return Config(
        task="setpred",
        data=DataConfig(name="clevrtex", root="data/clevrtex", variant="clevr", resolution=128, max_objects=0),
        model=ModelConfig(encoder="strided_cnn", encoder_channels=64, input_dim=64, num_slots=10, slot_dim=64,
                          slot_hidden_dim=128, iters=3),
        train=TrainConfig(steps=150_000, batch_size=512, lr=4e-4, warmup_steps=10_000, decay_steps=100_000,
                          val_every=5000, val_batches=4, log_every=100, ckpt_every=2000, compile=True),
        # shape, size, material, colour: the vocabulary of slotlab.data.properties for rendered scenes
        setpred=SetPredConfig(head_hidden_dim=64, property_sizes=(5, 3, 2, 8)),
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


# A user's own image folder keeps every image and all of each image (the sprites' object limit and CLEVRTex's
# centre crop are properties of those datasets): what switching data.name to folder sets, unless the same overrides
# set these keys too.
FOLDER_DEFAULTS = {"max_objects": 0, "crop": 1.0}


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings, checking each key exists and each value parses as the field's type.

    Switching ``data.name`` to ``folder`` also sets :data:`FOLDER_DEFAULTS` (all objects, no crop) for the keys
    that ``overrides`` leave alone.
    """
    keys = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        keys.append(".".join(path))
        config = _set_path(config, path, text, key)
    if "data.name" in keys and config.data.name == "folder":
        defaults = {name: value for name, value in FOLDER_DEFAULTS.items() if f"data.{name}" not in keys}
        config = replace(config, data=replace(config.data, **defaults))
    return check_config(config)


def resume_overrides(overrides: list[str]) -> list[str]:
    """Check that every override is one --resume accepts (:data:`RESUME_SAFE_KEYS`); returns them."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key not in RESUME_SAFE_KEYS:
            raise UserError(f"--resume cannot change {key!r}: a run keeps the settings it was started with; only "
                            f"{', '.join(RESUME_SAFE_KEYS)} may change (to go on with other settings, branch it into "
                            f"a new run: slotlab train --from RUN_DIR --out NEW_DIR --set {key}=...)")
    return overrides


def _closest(name: str, known: list[str]) -> str:
    import difflib

    match = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _set_path(obj: Any, path: list[str], text: str, key: str) -> Any:
    types_ = _field_types(type(obj))
    name = path[0]
    if name not in types_:
        raise UserError(f"unknown config key {key!r}{_closest(name, list(types_))}")
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


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"num_slots": 7}}`` -> ``{"model.num_slots": 7}`` (the keys ``--set`` takes)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Keys older slotlab versions wrote and no code reads any more: skipped when an old config is read.
REMOVED_KEYS = {"model": ("decoder",), "data": ("num_workers",)}


def config_from_dict(data: dict[str, Any], cls: type = Config, where: str = "config") -> Any:
    """Rebuild a config from :func:`config_to_dict` output; unknown keys are an error, missing ones get defaults."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping")
    types_ = _field_types(cls)
    removed = REMOVED_KEYS.get(where.rsplit(".", 1)[-1], ())
    kwargs = {}
    for name, value in data.items():
        if name in removed:
            continue
        if name not in types_:
            raise UserError(f"{where}: unknown config key {name!r}")
        type_ = types_[name]
        if is_dataclass(type_):
            kwargs[name] = config_from_dict(value, type_, f"{where}.{name}")
        elif typing.get_origin(type_) is tuple:
            if not isinstance(value, (list, tuple)):
                raise UserError(f"{where}.{name}: expected a list, got {value!r}")
            kwargs[name] = tuple(_check_type(item, typing.get_args(type_)[0], f"{where}.{name}") for item in value)
        else:
            kwargs[name] = _check_type(value, type_, f"{where}.{name}")
    config = cls(**kwargs)
    return check_config(config, where) if cls is Config else config


def _check_type(value: Any, type_: Any, where: str) -> Any:
    if type_ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(type_, type) and not isinstance(value, type_) or (type_ is int and isinstance(value, bool)):
        raise UserError(f"{where}: expected {type_.__name__}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Allowed values


def _describe_range(meta: dict[str, Any]) -> str:
    parts = []
    if meta["gt"] is not None:
        parts.append(f"> {meta['gt']:g}")
    if meta["lo"] is not None:
        parts.append(f">= {meta['lo']:g}")
    if meta["hi"] is not None:
        parts.append(f"<= {meta['hi']:g}")
    return " and ".join(parts)


def _check_value(key: str, value: Any, meta: dict[str, Any]) -> None:
    if meta.get("choices") is not None:
        if value not in meta["choices"]:
            raise UserError(f"{key}={value!r} is not one of the known values: {', '.join(meta['choices'])}"
                            f"{_closest(str(value), list(meta['choices']))}")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key}={value}: must be a finite number")
    low_ok = (meta.get("lo") is None or value >= meta["lo"]) and (meta.get("gt") is None or value > meta["gt"])
    if not low_ok or (meta.get("hi") is not None and value > meta["hi"]):
        raise UserError(f"{key}={value} is out of range: must be {_describe_range(meta)}")


def _check_fields(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            _check_fields(value, key + ".")
        elif isinstance(value, tuple):
            if not value:
                raise UserError(f"{key}: give at least one value")
            for item in value:
                _check_value(key, item, f.metadata or {})
        elif f.metadata or isinstance(value, float):
            _check_value(key, value, f.metadata or {})


def check_config(config: Config, where: str = "") -> Config:
    """Check every field's range or choices and the relations between fields; returns ``config`` unchanged.

    Raises:
        UserError: one line naming the key (prefixed with ``where``, e.g. a file) and what is allowed.
    """
    try:
        _check_fields(config, "")
        _check_relations(config)
    except UserError as exc:
        if where:
            raise UserError(f"{where}: {exc}") from None
        raise
    return config


def _check_mlp_decoder(config: Config) -> None:
    model = config.model
    if config.task != "autoencoder" and model.decoder_kind != "cnn":
        raise UserError(f"model.decoder_kind={model.decoder_kind} chooses the slot autoencoder's decoder; "
                        f"task={config.task} does not use it")
    if model.decoder_pixels < 1 and model.decoder_kind != "mlp":
        raise UserError(f"model.decoder_pixels={model.decoder_pixels:g} needs model.decoder_kind=mlp (the "
                        "convolutional decoder draws every pixel)")
    if model.decoder_kind == "mlp":
        if model.decoder_layers < 1:
            raise UserError("model.decoder_layers=0: model.decoder_kind=mlp needs at least one hidden layer")
        if model.grouping == "invariant_slot_attention" or model.decoder_frame != "image":
            raise UserError("model.decoder_kind=mlp does not draw slots in their frames yet "
                            "(model.grouping=invariant_slot_attention and model.decoder_frame need "
                            "model.decoder_kind=cnn)")
        if model.decoder_pixels < 1 and model.quantiser != "none":
            raise UserError(f"model.decoder_pixels={model.decoder_pixels:g} is not available with "
                            f"model.quantiser={model.quantiser} yet")


def _check_decoder_coordinates(config: Config) -> None:
    model = config.model
    if model.decoder_slot_edges:
        if config.task != "autoencoder" or model.decoder_kind != "cnn":
            raise UserError("model.decoder_slot_edges=true belongs to the slot autoencoder's convolutional decoder "
                            f"(task={config.task}, model.decoder_kind={model.decoder_kind})")
        if model.decoder_frame != "image" or model.grouping == "invariant_slot_attention":
            raise UserError("model.decoder_slot_edges=true draws in image coordinates: not with slots drawn in "
                            "their frames (model.decoder_frame, model.grouping=invariant_slot_attention)")
    if model.decoder_frame == "image":
        return
    if config.task != "autoencoder":
        raise UserError(f"model.decoder_frame={model.decoder_frame} chooses the slot autoencoder's decoder "
                        f"coordinates; task={config.task} does not use it")
    if model.grouping == "invariant_slot_attention":
        raise UserError(f"model.decoder_frame={model.decoder_frame}: model.grouping=invariant_slot_attention "
                        "draws slots in its own frames already (leave model.decoder_frame=image)")
    if model.quantiser != "none":
        raise UserError(f"model.decoder_frame={model.decoder_frame} is not available with "
                        f"model.quantiser={model.quantiser} yet")


def _check_model_resolution(config: Config) -> None:
    model = config.model
    if not model.resolution:
        return
    if config.task != "autoencoder" or model.decoder_kind != "cnn":
        raise UserError(f"model.resolution={model.resolution} sets the slot autoencoder's working side (with "
                        f"model.decoder_kind=cnn); task={config.task}, model.decoder_kind={model.decoder_kind}")
    if model.resolution > config.data.resolution:
        raise UserError(f"model.resolution={model.resolution} is above data.resolution={config.data.resolution} "
                        "(the model works at the data's side or below it)")


def model_resolution(config: Config) -> int:
    """The side the slot autoencoder's encoder and decoder work at: ``model.resolution``, else ``data.resolution``."""
    return config.model.resolution or config.data.resolution


# Tasks whose model has parameters under ``decoder.``, the group that ``train.decoder_lr_scale`` scales.
TASKS_WITH_DECODER = ("autoencoder", "dvae")


def restarts_unavailable(config: Config) -> str:
    """Why the model of ``config`` cannot restart from other draws of its initial slots (``model.test_restarts``),
    or "" where it can: only a slot autoencoder with Gaussian initial slots and no quantiser draws them at random."""
    model = config.model
    if config.task != "autoencoder" or model.quantiser != "none":
        quantised = f" with model.quantiser={model.quantiser}" if model.quantiser != "none" else ""
        return f"is a {config.task} run{quantised}; restarts need a slot autoencoder without a quantiser"
    if model.slot_init != "gaussian":
        return (f"learns its initial slots (model.slot_init={model.slot_init}), so every draw is the same; restarts "
                "need Gaussian initial slots")
    return ""


def _check_relations(config: Config) -> None:
    data, model, train = config.data, config.model, config.train
    no_restarts = restarts_unavailable(config)
    if model.test_restarts > 1 and no_restarts:
        raise UserError(f"model.test_restarts={model.test_restarts}: this model {no_restarts}")
    if model.background_grid and (config.task != "autoencoder" or model.decoder_kind != "cnn"
                                  or model.slot_init == "gaussian" or model.background_grid > model_resolution(config)):
        raise UserError(f"model.background_grid={model.background_grid} needs task=autoencoder, "
                        f"model.decoder_kind=cnn, slots with identities (model.slot_init=bo_qsa or learned) and a "
                        f"grid no larger than the model's side {model_resolution(config)} (task={config.task}, "
                        f"model.decoder_kind={model.decoder_kind}, model.slot_init={model.slot_init})")
    # What compares or composes the decoder's masks over the whole image: the slot autoencoder's, every pixel decoded.
    whole_image = ([f"model.mask_agreement={model.mask_agreement}"] * bool(model.mask_agreement)
                   + ["model.recon_masks=attention"] * (model.recon_masks == "attention")
                   + ["model.mask_posterior=true"] * model.mask_posterior)
    if whole_image and (config.task != "autoencoder" or model.decoder_pixels < 1):
        raise UserError(f"{' and '.join(whole_image)} {'need' if len(whole_image) > 1 else 'needs'} task=autoencoder "
                        f"with the whole image decoded (task={config.task}, model.decoder_pixels="
                        f"{model.decoder_pixels})")
    if model.compactness and (config.task != "autoencoder" or model.decoder_pixels < 1):
        raise UserError(f"model.compactness={model.compactness} needs task=autoencoder with the whole image decoded "
                        f"(task={config.task}, model.decoder_pixels={model.decoder_pixels}; set model.compactness=0)")
    if model.slot_balance and model.grouping not in ("slot_attention", "invariant_slot_attention"):
        raise UserError(f"model.slot_balance={model.slot_balance} needs model.grouping=slot_attention or "
                        f"invariant_slot_attention (model.grouping={model.grouping}; set model.slot_balance=0)")
    if model.slot_rgb_grid and (config.task != "autoencoder" or model.decoder_kind != "cnn" or model.background_grid
                                or model.slot_rgb_grid > model_resolution(config)):
        raise UserError(f"model.slot_rgb_grid={model.slot_rgb_grid} needs task=autoencoder, model.decoder_kind=cnn, "
                        f"no background slot and a grid no larger than the model's side {model_resolution(config)}")
    if data.name in PROCEDURAL_DATASETS and data.min_objects > data.max_objects:
        raise UserError(f"data.min_objects={data.min_objects} is more than data.max_objects={data.max_objects}")
    if model.decoder_kind == "cnn" and model.decoder_kernel % 2 == 0:
        raise UserError(f"model.decoder_kernel={model.decoder_kernel}: must be odd (the output keeps its size)")
    _check_mlp_decoder(config)
    _check_decoder_coordinates(config)
    _check_model_resolution(config)
    side, side_name = model_resolution(config), "model.resolution" if model.resolution else "data.resolution"
    upsamplings = math.log2(side / model.decoder_grid)
    if model.decoder_kind == "cnn" and (upsamplings < 0 or not upsamplings.is_integer()):
        raise UserError(f"{side_name}={side} must be model.decoder_grid={model.decoder_grid} times a "
                        "power of two (the broadcast decoder doubles the grid until it reaches the image)")
    if model.decoder_octave_fade and not model.decoder_octaves:
        raise UserError(f"model.decoder_octave_fade={model.decoder_octave_fade} fades Fourier octaves in, but "
                        "model.decoder_octaves=0 (set model.decoder_octaves=L too)")
    if train.decoder_lr_scale != 1 and config.task not in TASKS_WITH_DECODER:
        raise UserError(f"train.decoder_lr_scale={train.decoder_lr_scale:g}: task={config.task} has no decoder "
                        f"(tasks with one: {', '.join(TASKS_WITH_DECODER)})")
    if train.min_lr > train.lr:
        raise UserError(f"train.min_lr={train.min_lr:g} is above train.lr={train.lr:g}")
    if config.diffusion.beta_end <= config.diffusion.beta_start:
        raise UserError(f"diffusion.beta_end={config.diffusion.beta_end:g} must be above diffusion.beta_start="
                        f"{config.diffusion.beta_start:g}")
    if config.diffusion.sample_steps > config.diffusion.num_train_timesteps:
        raise UserError(f"diffusion.sample_steps={config.diffusion.sample_steps} is more than "
                        f"diffusion.num_train_timesteps={config.diffusion.num_train_timesteps}")
    unknown = [name for name in train.loggers.split(",") if name.strip() and name.strip() not in LOGGERS]
    if unknown:
        raise UserError(f"train.loggers={train.loggers!r}: unknown logger {unknown[0]!r}; known: {', '.join(LOGGERS)}")
    if config.task in ("dvae", "slate") and data.resolution % 4:
        raise UserError(f"data.resolution={data.resolution} must be a multiple of 4 for {config.task} (one token per "
                        "4x4 patch)")
    if config.slate.d_model % config.slate.num_heads:
        raise UserError(f"slate.d_model={config.slate.d_model} must be a multiple of slate.num_heads="
                        f"{config.slate.num_heads}")
    device = train.device
    if not (device in ("auto", "cpu", "mps", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UserError(f"train.device={device!r}: expected auto, cpu, cuda, cuda:N or mps")


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as JSON (atomically)."""
    from slotlab.io import atomic_write_text

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
    "save_config", "load_config", "check_config", "resume_overrides", "RESUME_SAFE_KEYS", "DATASET_NAMES",
    "PROCEDURAL_DATASETS", "model_resolution",
]
