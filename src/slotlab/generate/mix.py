"""Slot mixing (``slotlab mix RUN_DIR --a I --b J``): put objects of image B into image A by swapping slots.

Both images are encoded; slot ``k`` of A is replaced by slot ``k`` of B for every chosen ``k`` and the mixed set
is decoded. Slots are chosen by index (``take_from_b=[1, 3]``) or by pointing at objects of B (``pixels=[(10, 12)]``:
the slot whose mask covers that pixel of B most). The same index is replaced so the number of slots stays K; with
learned slot initialisations slot ``k`` plays a similar role in every image.

Writes ``RUN_DIR/mix/mix_<a>_<b>.png``: first row A | B | recon A | recon B | mix, then the per-slot images
(each slot's content times its mask, on white) of A, B and the mix; and ``mix_<a>_<b>.json`` with the slots taken.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from slotlab.errors import UserError
from slotlab.io import atomic_write_bytes, atomic_write_text


def slot_masks(decoded_masks: torch.Tensor | None, attn: torch.Tensor, feature_size: tuple[int, int],
               image_size: tuple[int, int]) -> torch.Tensor:
    """Masks ``[B, K, H, W]``: the decoder's alpha masks, or the attention upsampled for decoders without them."""
    if decoded_masks is not None:
        return decoded_masks.float()
    grid = attn.float().reshape(*attn.shape[:2], *feature_size)  # [B, K, h, w]
    masks = F.interpolate(grid, size=image_size, mode="bilinear", align_corners=False)  # [B, K, H, W]
    return masks / masks.sum(1, keepdim=True).clamp_min(1e-8)


def _per_slot_images(image: torch.Tensor, masks: torch.Tensor, slot_recons: torch.Tensor | None) -> list[np.ndarray]:
    """Each slot's content times its mask, on white: ``image [3, H, W]``, ``masks [K, H, W]``."""
    from slotlab.report.plots import to_uint8_image

    pictures = []
    for k in range(masks.shape[0]):
        content = slot_recons[k] if slot_recons is not None else image  # [3, H, W]
        mask = masks[k].unsqueeze(0)  # [1, H, W]
        pictures.append(to_uint8_image(content * mask + (1 - mask)))
    return pictures


@torch.no_grad()
def mix(run_dir: Path, a: int, b: int, take_from_b: list[int] | None = None,
        pixels: list[tuple[int, int]] | None = None, split: str = "val", device: str = "auto", seed: int = 0) -> str:
    """Swap the chosen slots of image ``b`` into image ``a`` and decode.

    Args:
        run_dir: a trained run directory.
        a: index of image A in ``split``.
        b: index of image B in ``split``.
        take_from_b: slot indices of B, e.g. ``[1, 3]``.
        pixels: or ``(y, x)`` pixels of B, e.g. ``[(10, 12)]``; the slots whose masks cover them are taken.
        split: which split the indices refer to.
        device: ``auto``, ``cpu``, ``cuda``...
        seed: seed of the slot initialisation (and of a sampling decoder).

    Returns:
        The path of the picture written.
    """
    from slotlab.data import build_dataset, to_model_batch
    from slotlab.report.plots import tile, to_uint8_image, upscale_for_view
    from slotlab.tasks import load_trained_model

    if bool(take_from_b) == bool(pixels):
        raise UserError("mix: choose the slots of B either by index or by pixel (one of them)")
    run_dir = Path(run_dir)
    config, model = load_trained_model(run_dir, "best", device)
    dev = next(model.parameters()).device
    dataset = build_dataset(config.data, split)
    for name, index in (("A", a), ("B", b)):
        if not 0 <= index < len(dataset):
            raise UserError(f"mix: image {name} = {index} is out of range ({split} has {len(dataset)} images)")

    torch.manual_seed(seed)
    image = to_model_batch(dataset.batch(np.array([a, b])), dev)["image"]  # [2, 3, H, W]
    grouped, feature_size = model.encode(image)
    slots = grouped.slots  # [2, K, D]
    decoded = model.decode(slots)
    masks = slot_masks(decoded.masks, grouped.attn, feature_size, tuple(image.shape[-2:]))  # [2, K, H, W]
    num_slots = slots.shape[1]
    height, width = image.shape[-2:]
    if take_from_b:
        outside = [k for k in take_from_b if not 0 <= k < num_slots]
        if outside:
            raise UserError(f"mix: slot {outside[0]} is out of range (the model has {num_slots} slots)")
        taken = sorted(set(take_from_b))
    else:
        outside = [(y, x) for y, x in pixels if not (0 <= y < height and 0 <= x < width)]
        if outside:
            raise UserError(f"mix: pixel {outside[0][0]},{outside[0][1]} is outside the {height}x{width} image")
        taken = sorted({int(masks[1, :, y, x].argmax()) for y, x in pixels})

    mixed_slots = slots[0].clone()  # [K, D]
    mixed_slots[taken] = slots[1, taken]
    mixed = model.decode(mixed_slots.unsqueeze(0))  # one image [1, 3, H, W]
    mixed_masks = slot_masks(mixed.masks, grouped.attn[:1], feature_size, tuple(image.shape[-2:]))

    def slot_row(picture: torch.Tensor, out, row_masks: torch.Tensor, i: int) -> list[np.ndarray]:
        recons = None if out.slot_recons is None else out.slot_recons[i].float()  # [K, 3, H, W]
        return _per_slot_images(picture, row_masks[i], recons)

    rows = [
        [to_uint8_image(x) for x in (image[0], image[1], decoded.recon[0], decoded.recon[1], mixed.recon[0])],
        slot_row(image[0], decoded, masks, 0),
        slot_row(image[1], decoded, masks, 1),
        slot_row(mixed.recon[0], mixed, mixed_masks, 0),
    ]
    out_dir = run_dir / "mix"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"mix_{a}_{b}.png"
    buffer = io.BytesIO()
    Image.fromarray(tile(rows, scale=upscale_for_view(image.shape[-1]))).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    record = {"split": split, "a": a, "b": b, "slots_taken_from_b": taken, "pixels": [list(p) for p in pixels or []],
              "rows": ["A | B | recon A | recon B | mix", "slots of A", "slots of B", "slots of the mix"]}
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return str(path)
