"""Set property prediction (Locatello et al. 2020, section 4.2): image -> one object description per slot.

image -> CNN encoder -> grouping module (any of ``GROUPINGS``) -> per-slot MLP head -> for every slot:
3D coordinates, logits of each categorical property (shape, colour, size, material, ...) and an "is object" logit.
Slots and objects are unordered, so the loss first pairs them with the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``) and then scores each pair: Huber on coordinates, cross-entropy on the
properties, and binary cross-entropy on "is object" for every slot (1 for matched slots, 0 for the rest).

Targets come from the dataset extras ``obj_coords`` ``[B, M, 3]`` and ``obj_props`` ``[B, M, P]`` (-1 rows =
padding, a single -1 = a property unknown for that object, e.g. colour in most CLEVRTex variants, left out of the
loss); ``setpred.property_sizes`` says how many values each of the P properties has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from slotlab.config import Config
from slotlab.errors import UserError
from slotlab.models.encoders import ImageEncoder
from slotlab.models.slot_attention import build_grouping


@dataclass
class SetPredictionOutput:
    """Per-slot predictions of a :class:`SetPredictionModel`."""

    coords: torch.Tensor  # [B, K, 3]
    property_logits: list[torch.Tensor]  # P x [B, K, V_p]
    object_logits: torch.Tensor  # [B, K], "is object" before the sigmoid
    slots: torch.Tensor  # [B, K, D]
    attn: torch.Tensor  # [B, K, N]
    kl: torch.Tensor | None = None  # scalar KL of the slot quantiser (VQ-SA), when there is one


class SetPredictionModel(nn.Module):
    """Encoder + grouping module + per-slot MLP head, trained with a Hungarian-matched loss.

    ``forward(image, step) -> SetPredictionOutput``; ``compute_loss(batch, step) -> (loss, logs)``;
    ``predict(image) -> [B, K, 3 + P + 1]`` in the format of :func:`slotlab.metrics.average_precision`.
    """

    def __init__(self, config: Config):
        super().__init__()
        cfg = config.model
        self.config = config
        self.property_sizes = tuple(config.setpred.property_sizes)
        if not self.property_sizes or min(self.property_sizes) < 1:
            raise UserError(f"setpred.property_sizes={self.property_sizes}: give the number of values (>= 1) of "
                            f"each categorical property, e.g. 5,8,2")
        self.encoder = ImageEncoder(cfg.encoder, cfg.encoder_channels, cfg.input_dim)
        self.grouping = build_grouping(cfg)
        if getattr(self.grouping, "frames", False):
            raise UserError(f"model.grouping={cfg.grouping!r} (slots with frames) is not available for set prediction "
                            "yet")
        self.quantiser = None
        if cfg.quantiser == "vq":
            from slotlab.models.quantiser import build_quantiser  # VQ-SA, optional: imported only when asked for

            self.quantiser = build_quantiser(config)
        elif cfg.quantiser != "none":
            raise UserError(f"unknown model.quantiser {cfg.quantiser!r} (none, vq)")
        hidden = config.setpred.head_hidden_dim
        self.head = nn.Sequential(nn.Linear(cfg.slot_dim, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, 3 + sum(self.property_sizes) + 1))
        self._targets_checked = False

    def forward(self, image: torch.Tensor, step: int | None = None) -> SetPredictionOutput:
        """``image [B, 3, H, W]`` -> per-slot predictions; ``step`` drives the quantiser's temperature."""
        inputs, _ = self.encoder(image)  # [B, N, D_inputs]
        grouped = self.grouping(inputs)
        slots, kl = grouped.slots, None  # [B, K, D]
        if self.quantiser is not None:
            # Outside training the quantiser behaves as at the end of the schedule.
            quantised = self.quantiser(slots, self.config.train.steps if step is None else step)
            slots, kl = quantised.slots, quantised.kl
        out = self.head(slots)  # [B, K, 3 + sum(V) + 1]
        coords, logits, object_logits = out.split([3, sum(self.property_sizes), 1], dim=-1)
        return SetPredictionOutput(
            coords=coords, property_logits=list(logits.split(self.property_sizes, dim=-1)),
            object_logits=object_logits.squeeze(-1), slots=slots, attn=grouped.attn, kl=kl,
        )

    # -------------------------------------------------------------------------------------------------- loss
    def _check_targets(self, batch: dict[str, torch.Tensor]) -> None:
        """Once per model: the batch carries the extras and they fit ``setpred.property_sizes``."""
        missing = [name for name in ("obj_coords", "obj_props") if name not in batch]
        if missing:
            raise UserError(f"dataset {self.config.data.name!r} has no {' / '.join(missing)} extras; set prediction "
                            f"needs per-object coordinates and properties (e.g. data.name=sprites)")
        props = batch["obj_props"]
        if props.shape[-1] != len(self.property_sizes):
            raise UserError(f"dataset {self.config.data.name!r} has {props.shape[-1]} object properties but "
                            f"setpred.property_sizes={self.property_sizes} lists {len(self.property_sizes)}")
        too_large = props.amax(dim=(0, 1)).cpu() >= torch.tensor(self.property_sizes)
        if bool(too_large.any()):
            raise UserError(f"dataset {self.config.data.name!r} has property values beyond "
                            f"setpred.property_sizes={self.property_sizes} (largest: "
                            f"{tuple(props.amax(dim=(0, 1)).tolist())})")
        self._targets_checked = True

    def pair_costs(self, out: SetPredictionOutput, coords: torch.Tensor, props: torch.Tensor) -> torch.Tensor:
        """Cost of giving each object to each slot, ``[B, K, M]``: the loss terms of that pair.

        Args:
            out: the model's predictions.
            coords: true coordinates ``[B, M, 3]``.
            props: true property indices ``[B, M, P]`` (padding rows -1; their costs are meaningless).
        """
        delta, weight = self.config.setpred.huber_delta, self.config.setpred.coord_weight
        pred_coords = out.coords.float().unsqueeze(2)  # [B, K, 1, 3]
        true_coords = coords.float().unsqueeze(1)  # [B, 1, M, 3]
        cost = weight * F.huber_loss(pred_coords.expand(-1, -1, coords.shape[1], -1),
                                     true_coords.expand(-1, out.coords.shape[1], -1, -1), reduction="none",
                                     delta=delta).sum(-1)  # [B, K, M]
        for p, logits in enumerate(out.property_logits):
            log_probs = logits.float().log_softmax(dim=-1)  # [B, K, V_p]
            target = props[..., p].unsqueeze(1).expand(-1, logits.shape[1], -1)  # [B, K, M]
            known = (target >= 0).float()  # an unknown property (-1) costs nothing
            cost = cost - log_probs.gather(-1, target.clamp_min(0)) * known  # cross-entropy of each (slot, object)
        return cost  # [B, K, M]

    @torch.no_grad()
    def match(self, costs: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hungarian matching per image; returns ``(image, slot, object)`` index tensors of the matched pairs."""
        costs_np, real_np = costs.detach().cpu().numpy(), real.cpu().numpy()  # one device sync per step
        images, slot_ids, object_ids = [], [], []
        for b in range(costs_np.shape[0]):
            objects = np.flatnonzero(real_np[b])
            rows, cols = linear_sum_assignment(costs_np[b][:, objects])
            images.append(np.full(len(rows), b))
            slot_ids.append(rows)
            object_ids.append(objects[cols])
        device = costs.device
        return tuple(torch.from_numpy(np.concatenate(x).astype(np.int64)).to(device)
                     for x in (images, slot_ids, object_ids))

    def compute_loss(self, batch: dict[str, torch.Tensor], step: int = 0) -> tuple[torch.Tensor, dict]:
        """Hungarian-matched loss: coord_weight * Huber + cross-entropy + "is object" BCE (+ beta * KL for VQ-SA)."""
        if not self._targets_checked:
            self._check_targets(batch)
        out = self(batch["image"], step)
        coords, props = batch["obj_coords"], batch["obj_props"]
        real = (props >= 0).any(dim=-1)  # [B, M]; all -1 = padding row
        b_idx, s_idx, o_idx = self.match(self.pair_costs(out, coords, props), real)
        num_pairs = max(len(b_idx), 1)
        cfg = self.config.setpred
        coord_loss = F.huber_loss(out.coords[b_idx, s_idx].float(), coords[b_idx, o_idx].float(), reduction="sum",
                                  delta=cfg.huber_delta) / num_pairs
        property_loss = sum(F.cross_entropy(logits[b_idx, s_idx].float(), props[b_idx, o_idx, p], reduction="sum",
                                            ignore_index=-1)  # -1: property unknown for this object
                            for p, logits in enumerate(out.property_logits)) / num_pairs
        is_object = torch.zeros_like(out.object_logits, dtype=torch.float32)  # [B, K]
        is_object[b_idx, s_idx] = 1.0
        object_loss = F.binary_cross_entropy_with_logits(out.object_logits.float(), is_object)
        loss = cfg.coord_weight * coord_loss + property_loss + object_loss
        logs = {"coord_loss": coord_loss.detach(), "property_loss": property_loss.detach(),
                "object_loss": object_loss.detach()}
        if out.kl is not None:
            loss = loss + self.config.vq.beta * out.kl
            logs["kl"] = out.kl.detach()
        return loss, logs

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, K, 3 + P + 1]``: coordinates, argmax property indices and P(is object), for the AP metric."""
        out = self(image)
        indices = [logits.argmax(dim=-1, keepdim=True).float() for logits in out.property_logits]  # P x [B, K, 1]
        score = out.object_logits.float().sigmoid().unsqueeze(-1)  # [B, K, 1]
        return torch.cat([out.coords.float(), *indices, score], dim=-1)


__all__ = ["SetPredictionModel", "SetPredictionOutput"]
