"""The Python API: load a trained model in one line, segment images, decode slots, share a model.

Example:
    >>> import slotlab
    >>> model = slotlab.load("runs/demo")                        # a run directory or an exported folder
    >>> result = model.segment("my_scene.png")                   # a path, PIL image, uint8 array or tensor
    >>> result.masks.shape, result.slots.shape                   # [1, K, H, W] (sum to 1 over K), [1, K, D]
    >>> images = model.decode(result.slots).recon                # [1, 3, H, W] in [-1, 1]

``slotlab export RUN --out DIR`` (:func:`export_run`) writes a Hugging Face-style folder: ``config.json`` (the
resolved config), ``model.safetensors`` (the weights: data only, no pickle) and a model card ``README.md`` with the
run's metrics. :func:`load` and every command that takes a run directory accept that folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from slotlab.config import Config, config_to_dict
from slotlab.errors import UserError
from slotlab.io import atomic_write_bytes, atomic_write_text
from slotlab.runs import EXPORTED_WEIGHTS, choose_checkpoint, find_eval, is_exported
from slotlab.tasks import load_trained_model

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor


@dataclass
class Segmentation:
    """What :meth:`SlotModel.segment` returns for a batch of B images."""

    masks: torch.Tensor  # [B, K, H, W] soft masks, summing to 1 over the K slots
    ids: torch.Tensor  # [B, H, W] int64, the slot of each pixel (argmax of the masks)
    slots: torch.Tensor  # [B, K, D]
    images: torch.Tensor  # [B, 3, H, W] the images as the model saw them, in [-1, 1]


class SlotModel:
    """A trained slot model, ready for inference (built by :func:`load`).

    Attributes:
        config: the run's resolved :class:`~slotlab.config.Config`.
        module: the underlying ``torch.nn.Module`` (in eval mode).
        resolution: the side of the square images the model takes.
    """

    def __init__(self, config: Config, module: torch.nn.Module):
        self.config = config
        self.module = module
        self.resolution = config.data.resolution
        self.device = next(module.parameters()).device

    def prepare(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Images in any usual form -> ``[B, 3, R, R]`` in [-1, 1] on the model's device.

        Accepts a path, a PIL image, a uint8 array ``[H, W, 3]`` or ``[B, H, W, 3]``, a float tensor
        ``[B, 3, H, W]`` in [-1, 1], or a list of those. Images are resized (bilinear) to the model's resolution;
        non-square images are centre-cropped to a square first.
        """
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
            return self._resize(images.to(self.device))
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if not isinstance(images, (list, tuple)):
            images = [images]
        arrays = [self._square_uint8(image) for image in images]
        batch = torch.from_numpy(np.stack(arrays)).to(self.device)  # [B, R, R, 3] uint8
        return batch.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # [B, 3, R, R]

    def _square_uint8(self, image: ImageLike) -> np.ndarray:
        if isinstance(image, (str, Path)):
            try:
                image = Image.open(image)
                image.load()
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot read image {image}: {exc}") from None
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
                raise UserError(f"expected a uint8 image [H, W, 3], got {image.dtype} {tuple(image.shape)}")
            image = Image.fromarray(image[..., :3])
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((self.resolution, self.resolution),
                                                                         Image.BILINEAR)
        return np.asarray(image)

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] == (self.resolution, self.resolution):
            return images
        return torch.nn.functional.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear",
                                               align_corners=False)

    @torch.no_grad()
    def segment(self, images: ImageLike | Sequence[ImageLike], seed: int = 0) -> Segmentation:
        """Which slot took which pixel: masks, per-pixel slot ids and the slots of each image."""
        batch = self.prepare(images)
        torch.manual_seed(seed)  # the slot initialisation noise (Gaussian init)
        out = self.module(batch)
        masks = out.masks.float()
        return Segmentation(masks=masks, ids=masks.argmax(dim=1), slots=out.slots, images=batch)

    @torch.no_grad()
    def decode(self, slots: torch.Tensor, seed: int = 0):
        """Decode slots ``[B, K, D]`` into images (``.recon [B, 3, H, W]``, and ``.masks`` where the decoder has
        them): new scenes from slots taken from different images, edited or sampled."""
        torch.manual_seed(seed)  # decoders that sample (diffusion) draw their noise here
        return self.module.decode(slots.to(self.device))

    def __repr__(self) -> str:
        model = self.config.model
        return (f"SlotModel(task={self.config.task!r}, grouping={model.grouping!r}, num_slots={model.num_slots}, "
                f"resolution={self.resolution}, device={str(self.device)!r})")


def load(path: str | Path, checkpoint: str = "best", device: str = "auto") -> SlotModel:
    """Load a trained model from a run directory or an exported folder (``slotlab export``).

    Args:
        path: the folder.
        checkpoint: ``best`` (lowest validation loss; falls back to ``last``) or ``last``; ignored for exported
            folders, which hold one set of weights.
        device: ``auto`` (cuda, mps, then cpu), ``cpu``, ``cuda``, ...
    """
    config, module = load_trained_model(Path(path), checkpoint, device)
    return SlotModel(config, module)


def export_run(run_dir: Path, out: Path, checkpoint: str = "best") -> Path:
    """Write ``run_dir``'s model as a Hugging Face-style folder: ``config.json``, ``model.safetensors``, ``README.md``.

    ``huggingface_hub`` users can upload the folder as it is (``huggingface-cli upload USER/NAME OUT``); slotlab
    uploads nothing. The weights are a plain safetensors file: loading them runs no code.
    """
    from safetensors.torch import save

    run_dir, out = Path(run_dir), Path(out)
    if is_exported(run_dir):
        raise UserError(f"{run_dir} is an exported folder already; copy it instead")
    checkpoint = choose_checkpoint(run_dir, checkpoint)
    config, module = load_trained_model(run_dir, checkpoint, "cpu")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export: {out} is not empty; choose a new folder")
    weights = {name: value.detach().contiguous() for name, value in module.state_dict().items()}
    atomic_write_bytes(out / EXPORTED_WEIGHTS, save(weights, metadata={"format": "pt", "library": "slotlab"}))
    atomic_write_text(out / "config.json", json.dumps(config_to_dict(config), indent=2) + "\n")
    atomic_write_text(out / "README.md", model_card(run_dir, config, checkpoint))
    return out


def model_card(run_dir: Path, config: Config, checkpoint: str) -> str:
    """The exported folder's ``README.md``: what the model is, how it was trained and scored, how to load it."""
    metrics: dict[str, Any] = {}
    found = find_eval(run_dir)
    path = found / "metrics.json" if found else Path(run_dir) / "eval" / "metrics.json"
    if path.is_file():
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            metrics = {}
    scores = [(name, metrics[name]) for name in ("ari", "fg_ari", "miou", "mbo", "mse", "psnr", "ap_inf")
              if isinstance(metrics.get(name), (int, float))]
    model, data, train = config.model, config.data, config.train
    length = f"a {train.time_budget:g}-minute budget" if train.time_budget else f"{train.steps} steps"
    test_iters = f", {model.test_iters} at test time" if model.test_iters else ""
    lines = [
        "---", "library_name: slotlab", "tags:", "- object-centric-learning", "- slot-attention", "---", "",
        f"# slotlab model: {config.preset} ({config.task})", "",
        f"A {model.grouping.replace('_', ' ')} model with {model.num_slots} slots of size {model.slot_dim} "
        f"({model.slot_init} initialisation, {model.iters} iterations{test_iters}), trained by slotlab on "
        f"`{data.name}` at {data.resolution}x{data.resolution} for {length} (checkpoint `{checkpoint}`).", "",
        "## Use", "", "```python", "import slotlab", "", 'model = slotlab.load("PATH/TO/THIS/FOLDER")',
        'result = model.segment("image.png")   # result.masks [1, K, H, W], result.slots [1, K, D]', "```", "",
        "Every `slotlab` command that takes a run directory also takes this folder (`slotlab eval`, `compose`, ...).",
        "",
    ]
    if scores:
        lines += [f"## Scores ({metrics.get('split', 'val')} split, {metrics.get('num_images', '?')} images)", "",
                  "| metric | value |", "| --- | ---: |"]
        lines += [f"| {name} | {value:.4f} |" for name, value in scores]
        lines.append("")
    lines += ["## Files", "", "- `config.json`: the resolved slotlab config (architecture, data, training).",
              "- `model.safetensors`: the weights (safetensors: data only, no code is run when loading).", ""]
    return "\n".join(lines)


__all__ = ["Segmentation", "SlotModel", "export_run", "load", "model_card"]
