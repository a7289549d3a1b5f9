"""``slotlab edit RUN_DIR``: object editing with discrete slot codes (VQ-SA runs).

The image is encoded to slots and codes; one latent variable of one slot is set to another code and the image is
decoded again, everything else (the other slots, the other variables, the slot's position) unchanged. The picture
``RUN_DIR/edit/image{I}_slot{S}_var{L}_code{C}.png`` shows

* top row: the input | before (the model's reconstruction) | after (the edited variable) | the slot's mask;
* bottom row: the image decoded with every code of that variable in turn (the slot's current code framed).

Next to it, ``...json`` records the codes and how much the edit changed each slot's part of the picture
(:func:`edit_effect`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from slotlab.data import build_dataset, to_model_batch
from slotlab.errors import UserError
from slotlab.io import atomic_write_text
from slotlab.models import AutoencoderOutput, DecoderOutput
from slotlab.tasks import load_trained_model


def _check_index(name: str, value: int, size: int, what: str) -> None:
    if not 0 <= value < size:
        raise UserError(f"{name} {value} is out of range: {what} has {size} (valid: 0..{size - 1})")


@torch.no_grad()
def decode_with_codes(model: torch.nn.Module, image: torch.Tensor, slot: int, variable: int,
                      codes: list[int]) -> tuple[AutoencoderOutput, DecoderOutput]:
    """The model's output for ``image [1, 3, H, W]``, and its decodings with ``variable`` of ``slot`` set to each code.

    The second result holds ``len(codes)`` images, one per code; every other slot and variable, and the slot's
    position, are those of the image.
    """
    out = model(image)
    n = len(codes)
    new_codes = out.codes.expand(n, -1, -1).clone()  # [n, K, L]
    new_codes[:, slot, variable] = torch.as_tensor(codes, device=new_codes.device)
    positions = None if out.positions is None else out.positions.expand(n, -1, -1)  # [n, K, P]
    return out, model.decode(model.quantiser.slots_from_codes(new_codes, positions))


def edit_effect(before: AutoencoderOutput, edited: DecoderOutput) -> dict[str, torch.Tensor]:
    """How much an edit changes each slot's part of the picture (``[n, K]`` for ``n`` edited images).

    * ``layer``: mean absolute change of each slot's decoded content, ``masks_k * slot_recons_k``;
    * ``region``: mean absolute change of the image, weighted by each slot's mask before editing (where the slot was).

    A local edit changes the edited slot's entries most.
    """
    layer_before = before.masks[:, :, None] * before.slot_recons  # [1, K, 3, H, W]
    layer_after = edited.masks[:, :, None] * edited.slot_recons  # [n, K, 3, H, W]
    layer = (layer_after - layer_before).abs().mean(dim=(2, 3, 4))  # [n, K]
    pixel_change = (edited.recon - before.recon).abs().mean(dim=1)  # [n, H, W]
    masks = before.masks[0]  # [K, H, W]
    region = (pixel_change[:, None] * masks).sum(dim=(2, 3)) / masks.sum(dim=(1, 2)).clamp_min(1e-8)  # [n, K]
    return {"layer": layer, "region": region}


def edit(run_dir: Path, image: int, slot: int, variable: int, code: int, split: str = "val",
         device: str = "auto") -> str:
    """Re-decode image ``image`` of ``split`` with latent ``variable`` of ``slot`` set to ``code``; save a picture.

    Args:
        run_dir: a VQ-SA run (``model.quantiser=vq``).
        image: index of the image in the split.
        slot: which slot to edit (0..K-1).
        variable: which latent variable of the slot (0..L-1).
        code: the new code (0..M-1).
        split: ``val``, ``train`` or ``test``.
        device: ``auto``, ``cpu``, ``cuda``...

    Returns:
        The path of the saved PNG.
    """
    run_dir = Path(run_dir)
    config, model = load_trained_model(run_dir, "best", device)
    if getattr(model, "quantiser", None) is None:
        raise UserError(f"run {run_dir} has no discrete slot codes (model.quantiser={config.model.quantiser!r}); "
                        f"edit needs a VQ-SA run, e.g. --preset vqsa-sprites")
    dataset = build_dataset(config.data, split)
    _check_index("image", image, len(dataset), f"the {split} split")
    _check_index("slot", slot, config.model.num_slots, "the model")
    _check_index("variable", variable, model.quantiser.num_variables, "each slot")
    _check_index("code", code, model.quantiser.codebook_size, "each variable")
    dev = next(model.parameters()).device
    torch.manual_seed(0)  # the same slot initialisation noise every time
    batch = to_model_batch(dataset.batch(np.array([image])), dev)
    num_codes = model.quantiser.codebook_size
    before, edited = decode_with_codes(model, batch["image"], slot, variable, [code, *range(num_codes)])
    current = int(before.codes[0, slot, variable])
    path = run_dir / "edit" / f"image{image}_slot{slot}_var{variable}_code{code}.png"
    _save_figure(path, batch["image"][0], before.recon[0], edited.recon, before.masks[0, slot], slot, variable, code,
                 current)
    effect = edit_effect(before, DecoderOutput(edited.recon[:1], edited.masks[:1], edited.slot_recons[:1]))
    record = {"image": image, "slot": slot, "variable": variable, "code": code, "code_before": current,
              "codes_before": before.codes[0].tolist(),
              "layer_change": [round(float(v), 6) for v in effect["layer"][0]],  # per slot, see edit_effect
              "region_change": [round(float(v), 6) for v in effect["region"][0]]}
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return str(path)


def _save_figure(path: Path, image: torch.Tensor, before: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor,
                 slot: int, variable: int, code: int, current: int) -> None:
    """``edited [1 + M, 3, H, W]``: the requested code, then every code in turn; ``mask [H, W]`` of the slot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slotlab.io import atomic_write_bytes
    from slotlab.report.plots import to_uint8_image

    num_codes = edited.shape[0] - 1
    mask = mask.float().clamp(0, 1).expand(3, -1, -1)  # [3, H, W] grey levels
    top = [("input", to_uint8_image(image)), (f"before (code {current})", to_uint8_image(before)),
           (f"after (code {code})", to_uint8_image(edited[0])), (f"slot {slot} mask", to_uint8_image(mask * 2 - 1))]
    columns = max(len(top), num_codes)
    fig, axes = plt.subplots(2, columns, figsize=(1.3 * columns, 3.0), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (title, picture) in zip(axes[0], top):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title, fontsize=7)
    for m in range(num_codes):
        ax = axes[1, m]
        ax.imshow(to_uint8_image(edited[1 + m]), interpolation="nearest")
        ax.set_title(f"code {m}" + (" (now)" if m == current else ""), fontsize=7)
        if m == current:  # frame the slot's own code
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("red")
                spine.set_linewidth(2)
    fig.suptitle(f"slot {slot}, variable {variable} -> code {code}; bottom row: every code of variable {variable}",
                 fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
