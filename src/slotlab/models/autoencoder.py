"""The Slot Attention autoencoder: CNN encoder -> grouping -> spatial broadcast decoder, trained by MSE.

With ``model.quantiser=vq`` (VQ-SA) a :class:`~slotlab.models.quantiser.SlotQuantiser` sits between grouping and
decoder: the decoder sees slots assembled from discrete codes and the loss adds ``vq.beta * KL(q(z|x) || uniform)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from slotlab.config import Config, model_resolution, restarts_unavailable
from slotlab.errors import UserError
from slotlab.models.broadcast_decoder import BackgroundDecoder, DecoderOutput, SpatialBroadcastDecoder, compose
from slotlab.models.encoders import ImageEncoder
from slotlab.models.invariant_slot_attention import frame_of, grid_positions
from slotlab.models.mlp_decoder import PixelMLPDecoder
from slotlab.models.quantiser import QuantiserOutput, attention_centroids, build_quantiser
from slotlab.models.slot_attention import GroupingOutput, attention_masks, build_grouping


@dataclass
class AutoencoderOutput:
    """Forward pass of a slot autoencoder."""

    recon: torch.Tensor  # [B, 3, H, W]
    masks: torch.Tensor  # [B, K, H, W], sums to 1 over K
    slot_recons: torch.Tensor  # [B, K, 3, H, W]
    slots: torch.Tensor  # [B, K, D]
    attn: torch.Tensor  # [B, K, N], last iteration
    attn_per_iter: list[torch.Tensor] | None = None  # T x [B, K, N]
    feature_size: tuple[int, int] | None = None  # (h, w) of the attention grid, N = h * w
    # VQ-SA runs only (model.quantiser=vq); ``slots`` above are then the quantised slots the decoder saw.
    codes: torch.Tensor | None = None  # [B, K, L] int64, the code of each latent variable
    code_logits: torch.Tensor | None = None  # [B, K, L, M]
    kl: torch.Tensor | None = None  # scalar KL(q(z|x) || uniform)
    positions: torch.Tensor | None = None  # [B, K, 2] slot centres passed through unquantised (vq.keep_position)
    # model.recon_masks=attention: ``masks`` are the attention's, and these the decoder's own [B, K, H, W]. With the
    # pixel posterior (model.mask_posterior, outside training) ``masks`` are each pixel's posterior instead (no longer
    # the weights that compose ``recon``), and the decoder's own masks are here in any case.
    decoder_masks: torch.Tensor | None = None


def attention_frame(attn: torch.Tensor, feature_size: tuple[int, int], kind: str) -> dict[str, torch.Tensor]:
    """Each slot's frame read off its attention ``[B, K, N]`` on an ``h x w`` grid (``model.decoder_frame``):
    ``positions`` (the attention-weighted mean of the grid positions, in [-1, 1]) and ``scales`` ``[B, K, 2]`` (their
    weighted standard deviation for ``centre_spread``; 1 for ``centre``, a translation only)."""
    weights = attn.float() + 1e-8
    weights = weights / weights.sum(dim=-1, keepdim=True)  # [B, K, N], a distribution over the grid
    positions, scales = frame_of(weights, grid_positions(*feature_size, attn.device))  # [B, K, 2] each
    if kind == "centre":
        scales = torch.ones_like(positions)
    return {"positions": positions.to(attn.dtype), "scales": scales.to(attn.dtype)}


def upsample_decoded(decoded: DecoderOutput, side: int) -> DecoderOutput:
    """A decoder's masks and slot images drawn at a smaller side, upsampled (bilinear) to ``side``, and the image
    composed again from them. Bilinear weights are positive and sum to 1, so the masks still sum to 1 over slots."""
    b, k, _, h, w = decoded.slot_recons.shape
    masks = F.interpolate(decoded.masks, size=(side, side), mode="bilinear", align_corners=False)  # [B, K, S, S]
    slot_recons = F.interpolate(decoded.slot_recons.reshape(b, k * 3, h, w), size=(side, side), mode="bilinear",
                                align_corners=False).view(b, k, 3, side, side)  # [B, K, 3, S, S]
    recon = (masks.unsqueeze(2) * slot_recons).sum(dim=1)  # [B, 3, S, S]
    return DecoderOutput(recon=recon, masks=masks, slot_recons=slot_recons)


def mask_disagreement(masks: torch.Tensor, attn: torch.Tensor, feature_size: tuple[int, int]) -> torch.Tensor:
    """Per image, the mean per-pixel cross-entropy ``[B]`` of the decoder's ``masks [B, K, H, W]`` against the
    attention masks that ``attn [B, K, N]`` gives on the ``h x w`` grid ``feature_size`` (which pass no gradient)."""
    target = attention_masks(attn.detach().float(), feature_size, tuple(masks.shape[-2:]))  # [B, K, H, W]
    log_masks = masks.float().clamp_min(1e-6).log()  # [B, K, H, W]
    return -(target * log_masks).sum(dim=1).mean(dim=(1, 2))  # [B]


def mask_agreement(out: AutoencoderOutput) -> torch.Tensor:
    """Per-pixel cross-entropy of the decoder's masks against the attention masks (``model.mask_agreement``).

    The attention masks are the target and pass no gradient: the decoder learns to give each pixel to the slot that
    attended to it, instead of cutting an object between the slot that holds it and a spare one.
    """
    masks = out.masks if out.decoder_masks is None else out.decoder_masks  # [B, K, H, W], the decoder's own
    return mask_disagreement(masks, out.attn, out.feature_size).mean()


def slot_compactness(attn: torch.Tensor, feature_size: tuple[int, int], threshold: float = 0.3) -> torch.Tensor:
    """What slots pay for holding regions apart (``model.compactness``): ``sum_k m_k * relu(R_k - 1)`` over the
    slots, averaged over the images of ``attn [B, K, N]`` on the ``h x w`` grid ``feature_size``.

    ``m_k`` is slot k's share of the image and ``R_k = spread_k^2 / m_k`` its spatial second moment over that share
    (x, y in [-1, 1]), a measure of shape that ignores size: about 0.64 for a disc of any radius, 0.67 for the whole
    image, but ``1/pi + d^2 / (2 pi r^2)`` for two discs of radius r a distance d apart (2.9 at d = 4r). A ring pays
    too (the background around one central object of radius 0.6: 1.2). Only the pixels where the slot holds more than
    ``threshold`` of the attention count, so the attention's faint spill over the whole image is not measured.
    """
    n = attn.shape[-1]
    grid = grid_positions(*feature_size, attn.device)  # [N, 2] as (x, y) in [-1, 1]
    attn = attn.float()
    held = attn * (attn.detach() > threshold)  # [B, K, N]
    mass = held.sum(dim=-1, keepdim=True)  # [B, K, 1]
    weights = held / mass.clamp_min(1e-6)  # [B, K, N], summing to 1 over the pixels
    mean = weights @ grid  # [B, K, 2]
    spread = (weights @ grid.square() - mean.square()).sum(dim=-1)  # [B, K], the variance in x plus in y
    share = mass.squeeze(-1) / n  # [B, K]
    ratio = spread / share.clamp_min(1e-4)  # [B, K]
    return (share * F.relu(ratio - 1.0)).sum(dim=1).mean()


def pixel_posterior(masks: torch.Tensor, slot_recons: torch.Tensor, image: torch.Tensor,
                    recon: torch.Tensor) -> torch.Tensor:
    """Which slot drew each pixel, given the pixel: ``[B, K, H, W]`` (fp32), the masks ``model.mask_posterior``
    hands out.

    Read the slot autoencoder as a spatial mixture: pixel ``x`` comes from slot ``k`` with probability ``m_k(x)``
    (``masks [B, K, H, W]``) and then has the colour ``x_k(x)`` (``slot_recons [B, K, 3, H, W]``) plus Gaussian
    noise. The posterior of the slot given the pixel's colour ``I(x)`` (``image [B, 3, H, W]``) is Bayes' rule,
    ``p(k | x) = m_k(x) N(I(x); x_k(x), s^2) / sum_j ...``, with ``s^2`` the image's own reconstruction error (the
    mean squared error of ``recon``, per channel), so no scale is tuned and no labels are used. Where the masks are
    coarse (the attention's, drawn on a grid and upsampled) it moves each object's edge to where the colours change.
    A slot whose mask is 0 at a pixel never takes it; one whose mask is merely small takes it where its colour fits
    far better than the others', so the posterior helps where each slot's image fits its pixels (flat colours) and
    hurts where it does not (blurred, shaded renders).
    """
    image = image.float()
    variance = (recon.float() - image).square().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)  # [B, 1, 1, 1]
    distance = (slot_recons.float() - image.unsqueeze(1)).square().sum(dim=2)  # [B, K, H, W]
    masks = masks.float()
    log_prior = torch.where(masks > 0, masks.log(), float("-inf"))  # [B, K, H, W]; the masks sum to 1 over K
    return (log_prior - distance / (2 * variance)).softmax(dim=1)  # [B, K, H, W]


def where_per_image(better: torch.Tensor, new, old):
    """One output (a dataclass of ``[B, ...]`` tensors, lists of them or None) from two: image ``i`` takes every
    field from ``new`` where ``better[i]`` (``[B]`` bool), else from ``old``."""

    def choose(new_value, old_value):
        if new_value is None:
            return None
        if isinstance(new_value, list):  # e.g. the attention of every iteration
            return [choose(n, o) for n, o in zip(new_value, old_value, strict=True)]
        return torch.where(better.view(-1, *[1] * (new_value.dim() - 1)), new_value, old_value)  # [B, ...]

    return replace(old, **{f.name: choose(getattr(new, f.name), getattr(old, f.name)) for f in fields(old)})


class SlotAutoencoder(nn.Module):
    """Object discovery by reconstruction (Locatello et al. 2020, section 3).

    ``encode(image) -> GroupingOutput``, ``decode(slots) -> DecoderOutput``, ``forward(image) -> AutoencoderOutput``.
    """

    def __init__(self, config: Config):
        super().__init__()
        cfg = config.model
        self.config = config
        self.progress = 0.0  # fraction of training done (set_progress)
        self.encoder = ImageEncoder(cfg.encoder, cfg.encoder_channels, cfg.input_dim)
        self.grouping = build_grouping(cfg)
        # Slots with frames (invariant slot attention): positions come from the frames, not from the encoder, and
        # the decoder draws each slot in its frame. (Built in this order so that other runs draw the same weights.)
        self.frames = getattr(self.grouping, "frames", False)
        if self.frames:
            self.encoder.pos = nn.Identity()
        # model.decoder_frame: Slot Attention's slots drawn in a frame read off their attention (centre, spread).
        self.attention_frame = cfg.decoder_frame
        if self.attention_frame != "image":
            self.frames = True
        # model.resolution: the encoder and decoder work at this side; images come and go at the data's side.
        self.resolution, self.image_resolution = model_resolution(config), config.data.resolution
        self.decoder: SpatialBroadcastDecoder | PixelMLPDecoder
        if cfg.decoder_kind == "mlp":
            if self.frames:
                raise UserError(f"model.decoder_kind=mlp is not available with model.grouping={cfg.grouping!r} yet")
            self.decoder = PixelMLPDecoder(cfg.slot_dim, self.resolution, cfg.decoder_channels,
                                           cfg.decoder_layers, octaves=cfg.decoder_octaves,
                                           octave_fade_steps=cfg.decoder_octave_fade)
        else:
            self.decoder = SpatialBroadcastDecoder(cfg.slot_dim, self.resolution, cfg.decoder_channels,
                                                   cfg.decoder_grid, cfg.decoder_kernel, cfg.decoder_layers,
                                                   frames=self.frames, octaves=cfg.decoder_octaves,
                                                   octave_fade_steps=cfg.decoder_octave_fade,
                                                   slot_edges=cfg.decoder_slot_edges)
        self.num_slots = cfg.num_slots
        self.test_restarts = cfg.test_restarts  # draws of the initial slots outside training (see restarts())
        self.mask_posterior = cfg.mask_posterior  # masks handed out outside training: each pixel's posterior
        # What encode() hands out per slot: the slot vector, then (with frames) its position and scale, so that
        # decode(), slot libraries, composition and mixing see one tensor.
        self.slot_size = cfg.slot_dim + (4 if self.frames else 0)
        if cfg.quantiser not in ("none", "vq"):
            raise UserError(f"unknown model.quantiser {cfg.quantiser!r} (none, vq)")
        if cfg.quantiser == "vq" and self.frames:
            raise UserError(f"model.quantiser=vq is not available with model.grouping={cfg.grouping!r} yet")
        self.quantiser = build_quantiser(config) if cfg.quantiser == "vq" else None
        if self.quantiser is not None and config.vq.init_run and config.vq.freeze_grouping:  # slots stay as trained
            self.encoder.requires_grad_(False)
            self.grouping.requires_grad_(False)
        # model.background_grid: slot 0 (the first learned query) is drawn smooth, as the background (built last:
        # other runs draw the same weights).
        self.background = (BackgroundDecoder(cfg.slot_dim, self.resolution, cfg.background_grid, cfg.slot_hidden_dim)
                           if cfg.background_grid else None)
        # model.slot_rgb_grid: each slot's colours drawn smooth (one colour per slot at 1), its mask by the decoder.
        self.slot_rgb = (BackgroundDecoder(cfg.slot_dim, self.resolution, cfg.slot_rgb_grid, cfg.slot_hidden_dim)
                         if cfg.slot_rgb_grid else None)
        if self.background is not None and self.frames:
            raise UserError(f"model.background_grid is not available with slot frames (model.grouping="
                            f"{cfg.grouping!r}, model.decoder_frame={cfg.decoder_frame!r}) yet")

    def init_fresh_run(self) -> None:
        """Trainer hook for a new run: two-stage VQ-SA starts from the trained run ``vq.init_run``.

        Every weight but the quantiser's is copied; the run must have this model's encoder, grouping and decoder.
        """
        if self.quantiser is None or not self.config.vq.init_run:
            return
        from slotlab.runs import load_run

        run = Path(self.config.vq.init_run)
        checkpoint = "best" if (run / "checkpoints" / "best.pt").exists() else "last"
        try:
            _, state = load_run(run, checkpoint)
            # The decoder's fade stage restarts with this run's own schedule.
            weights = {name: value for name, value in state["model"].items()
                       if not name.startswith("quantiser.") and name != "decoder.pos.progress"}
            missing, unexpected = self.load_state_dict(weights, strict=False)
        except (UserError, RuntimeError) as exc:  # RuntimeError: tensor shapes differ
            raise UserError(f"vq.init_run={str(run)!r}: {str(exc).splitlines()[0][:300]}") from None
        missing = [name for name in missing if not name.startswith("quantiser.") and name != "decoder.pos.progress"]
        if missing or unexpected:
            raise UserError(f"vq.init_run={str(run)!r} is not a slot autoencoder of this shape (missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]})")

    def features(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``image [B, 3, H, W]`` -> the encoder's tokens ``[B, N, D_inputs]`` and their grid size ``(h, w)``."""
        if self.resolution != self.image_resolution:  # model.resolution: average the image down to the working side
            image = F.interpolate(image, size=(self.resolution, self.resolution), mode="area")  # [B, 3, r, r]
        return self.encoder(image)  # [B, N, D_inputs]

    def group_features(self, inputs: torch.Tensor, feature_size: tuple[int, int],
                       num_slots: int | None = None) -> GroupingOutput:
        """The encoder's tokens ``[B, N, D_inputs]`` -> slots ``[B, K, D]`` (with their frames) and attention."""
        grouped = self.grouping(inputs, num_slots=num_slots, feature_size=feature_size)
        if self.attention_frame != "image":
            grouped = replace(grouped, **attention_frame(grouped.attn, feature_size, self.attention_frame))
        if self.frames:  # [B, K, D + 4]: the frame travels with the slot
            grouped = replace(grouped, slots=torch.cat([grouped.slots, grouped.positions, grouped.scales], dim=-1))
        return grouped

    def group(self, image: torch.Tensor, num_slots: int | None = None) -> tuple[GroupingOutput, tuple[int, int]]:
        """``image [B, 3, H, W]`` -> continuous slots ``[B, K, D]`` and attention ``[B, K, N]``, and the grid size
        (the slots of the chosen restart where :meth:`restarts` is more than 1)."""
        if self.restarts() > 1:
            grouped, feature_size, _ = self.group_and_decode(image, num_slots)
            return grouped, feature_size
        inputs, feature_size = self.features(image)
        return self.group_features(inputs, feature_size, num_slots), feature_size

    def restarts(self) -> int:
        """How many draws of the initial slots a forward pass makes: ``model.test_restarts`` outside training when
        the initial slots are drawn at random (Gaussian), else 1 (learned queries draw the same slots every time)."""
        random_init = not restarts_unavailable(self.config)
        return self.test_restarts if random_init and not self.training else 1

    def group_and_decode(self, image: torch.Tensor, num_slots: int | None = None
                         ) -> tuple[GroupingOutput, tuple[int, int], DecoderOutput]:
        """Group and decode ``image [B, 3, H, W]``, with :meth:`restarts` draws of the initial slots.

        Gaussian slots are drawn anew for every image, and some draws bind the objects better than others. With R
        restarts the encoder runs once and Slot Attention and the decoder R times; each image keeps the draw whose
        decoder masks agree best with its Slot Attention masks (lowest :func:`mask_disagreement`): the
        self-consistent grouping, chosen without labels.
        """
        inputs, feature_size = self.features(image)
        grouped = self.group_features(inputs, feature_size, num_slots)
        decoded = self.decode(grouped.slots)
        restarts = self.restarts()
        if restarts == 1:
            return grouped, feature_size, decoded
        lowest = mask_disagreement(decoded.masks, grouped.attn, feature_size)  # [B], of the draw kept so far
        for _ in range(restarts - 1):  # keeps one draw per image at a time: the memory of two forward passes
            other = self.group_features(inputs, feature_size, num_slots)
            other_decoded = self.decode(other.slots)
            disagreement = mask_disagreement(other_decoded.masks, other.attn, feature_size)  # [B]
            better = disagreement < lowest  # [B]; a tie keeps the earlier draw
            grouped = where_per_image(better, other, grouped)
            decoded = where_per_image(better, other_decoded, decoded)
            lowest = torch.minimum(lowest, disagreement)
        return grouped, feature_size, decoded

    def recompose(self, decoded: DecoderOutput, grouped: GroupingOutput, feature_size: tuple[int, int]
                  ) -> DecoderOutput:
        """``model.recon_masks=attention``: the slot images composed with the attention masks instead of the
        decoder's (which :meth:`forward` hands out as ``decoder_masks``)."""
        masks = attention_masks(grouped.attn, feature_size, tuple(decoded.slot_recons.shape[-2:]))  # [B, K, H, W]
        masks = masks.to(decoded.slot_recons.dtype)
        recon = (masks.unsqueeze(2) * decoded.slot_recons).sum(dim=1)  # [B, 3, H, W]
        return DecoderOutput(recon=recon, masks=masks, slot_recons=decoded.slot_recons)

    def quantise(self, grouped: GroupingOutput, feature_size: tuple[int, int], step: int = 0) -> QuantiserOutput:
        """VQ-SA: discrete codes for the grouped slots (with their attention centres when ``vq.keep_position``)."""
        positions = attention_centroids(grouped.attn, feature_size) if self.quantiser.position_dim else None
        return self.quantiser(grouped.slots, step, positions)

    def encode(self, image: torch.Tensor, num_slots: int | None = None) -> tuple[GroupingOutput, tuple[int, int]]:
        """``image [B, 3, H, W]`` -> slots ``[B, K, D]`` and attention ``[B, K, N]``, plus the feature grid size.

        On VQ-SA runs the slots are the quantised ones, so everything built on ``encode``/``decode`` works unchanged.
        """
        grouped, feature_size = self.group(image, num_slots)
        if self.quantiser is not None:
            grouped = replace(grouped, slots=self.quantise(grouped, feature_size).slots)
        return grouped, feature_size

    def decode(self, slots: torch.Tensor) -> DecoderOutput:
        """``slots [B, K, D]`` (``[B, K, D + 4]`` with frames: vector, position, scale) -> image, masks, slot images.

        With ``model.background_grid`` slot 0 is drawn by the background decoder, the others by the broadcast decoder.
        """
        content, frame = slots, ()  # with frames: the slot vector, and its position and scale for the decoder
        if self.frames:
            content, positions, scales = slots.split([slots.shape[-1] - 4, 2, 2], dim=-1)
            frame = (positions, scales)
        if self.background is not None:  # slot 0 is the background, the others are drawn as objects (no frames)
            background_rgb, background_logit = self.background.draw(slots[:, :1])  # [B, 1, 3, h, w], [B, 1, h, w]
            object_rgb, object_logits = self.decoder.draw(slots[:, 1:])  # [B, K-1, 3, h, w], [B, K-1, h, w]
            decoded = compose(torch.cat([background_rgb, object_rgb.to(background_rgb.dtype)], dim=1),
                              torch.cat([background_logit, object_logits.to(background_logit.dtype)], dim=1))
        elif self.slot_rgb is not None:  # each slot's colours smooth (model.slot_rgb_grid), its mask from the decoder
            _, mask_logits = self.decoder.draw(content, *frame)  # [B, K, h, w]
            rgb, _ = self.slot_rgb.draw(content)  # [B, K, 3, h, w]
            decoded = compose(rgb.to(mask_logits.dtype), mask_logits)
        else:
            decoded = self.decoder.decode(content, *frame)
        if self.resolution != self.image_resolution:
            decoded = upsample_decoded(decoded, self.image_resolution)
        return decoded

    def forward(self, image: torch.Tensor, num_slots: int | None = None, step: int = 0) -> AutoencoderOutput:
        """Encode, (quantise,) decode; ``step`` sets the Gumbel-softmax temperature of VQ-SA runs."""
        quantised = None
        if self.quantiser is None:
            grouped, feature_size, decoded = self.group_and_decode(image, num_slots)
        else:
            grouped, feature_size = self.group(image, num_slots)
            quantised = self.quantise(grouped, feature_size, step)
            decoded = self.decode(quantised.slots)
        decoder_masks = None
        if self.config.model.recon_masks == "attention":
            decoder_masks, decoded = decoded.masks, self.recompose(decoded, grouped, feature_size)
        if self.mask_posterior and not self.training:
            decoder_masks = decoded.masks if decoder_masks is None else decoder_masks  # still scored (decoder_*)
            masks = pixel_posterior(decoded.masks, decoded.slot_recons, image, decoded.recon)  # [B, K, H, W]
            decoded = replace(decoded, masks=masks)
        out = AutoencoderOutput(
            recon=decoded.recon, masks=decoded.masks, slot_recons=decoded.slot_recons, slots=grouped.slots,
            attn=grouped.attn, attn_per_iter=grouped.attn_per_iter, feature_size=feature_size,
            decoder_masks=decoder_masks,
        )
        if quantised is None:
            return out
        return replace(out, slots=quantised.slots, codes=quantised.codes, code_logits=quantised.logits,
                       kl=quantised.kl, positions=quantised.positions)

    def set_progress(self, progress: float) -> None:
        """Trainer hook, called before each training step: the fraction of training done (of ``train.steps``, or
        of ``train.time_budget`` when that runs out first); ``model.mask_agreement_from`` starts the mask agreement
        there."""
        self.progress = progress

    def set_step(self, step: int) -> None:
        """Trainer hook, called before each training step (outside ``torch.compile``): advances what depends on the
        step, the decoder's coarse-to-fine fade of its Fourier octaves (``model.decoder_octave_fade``)."""
        self.decoder.set_step(step)

    def compute_loss(self, batch: dict[str, torch.Tensor], step: int = 0) -> tuple[torch.Tensor, dict]:
        """MSE between the image and its reconstruction, averaged over batch, pixels and channels.

        VQ-SA runs add ``vq.beta * KL(q(z|x) || uniform)`` (the slides' ELBO) and log ``kl`` and ``tau``. With
        ``model.decoder_pixels < 1`` a training step decodes and scores only that fraction of the pixels, drawn at
        random (the same pixels for the whole batch): an unbiased estimate of the full MSE. In training, from the
        fraction ``model.mask_agreement_from`` of it on, ``model.mask_agreement`` times :func:`mask_agreement` is
        added (and logged as ``mask_agreement``), and ``model.compactness`` times :func:`slot_compactness` of the
        attention (logged as ``compactness``).
        """
        fraction = self.config.model.decoder_pixels
        if self.training and fraction < 1:
            return self._pixel_sample_loss(batch["image"], fraction)
        out = self(batch["image"], step=step)
        mse = F.mse_loss(out.recon.float(), batch["image"].float())
        loss, logs = mse, {"mse": mse.detach()}
        weight, start = self.config.model.mask_agreement, self.config.model.mask_agreement_from
        if self.training and weight and self.progress >= start:
            agreement = mask_agreement(out)
            loss = loss + weight * agreement
            logs["mask_agreement"] = agreement.detach()
        if self.training and self.config.model.compactness:
            compactness = slot_compactness(out.attn, out.feature_size)
            loss = loss + self.config.model.compactness * compactness
            logs["compactness"] = compactness.detach()
        if out.kl is not None:
            loss = loss + self.config.vq.beta * out.kl
            logs.update(kl=out.kl.detach(), tau=torch.tensor(self.quantiser.temperature(step)))
        return loss, logs

    def _pixel_sample_loss(self, image: torch.Tensor, fraction: float) -> tuple[torch.Tensor, dict]:
        """The MSE at a random ``fraction`` of the pixels (the MLP decoder decodes only those)."""
        grouped, _ = self.group(image)
        num_pixels = image.shape[-2] * image.shape[-1]
        pixels = torch.randperm(num_pixels, device=image.device)[:max(1, round(fraction * num_pixels))]  # [P]
        recon, _, _ = self.decoder.decode_pixels(grouped.slots, pixels)  # [B, P, 3]
        target = image.flatten(2)[:, :, pixels].transpose(1, 2)  # [B, P, 3]
        loss = F.mse_loss(recon.float(), target.float())
        return loss, {"mse": loss.detach()}

    @torch.no_grad()
    def predict_masks(self, image: torch.Tensor) -> torch.Tensor:
        """Soft object masks ``[B, K, H, W]`` for scoring (ARI etc.)."""
        return self(image).masks
