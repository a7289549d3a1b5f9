"""Slot library: the slots of every image of a split, with each slot's mask area (``slotlab library RUN_DIR``).

The split is encoded once, in batches on the model's device, and stored under ``RUN_DIR/library/<split>/`` as
safetensors chunks of :data:`CHUNK_IMAGES` images (``slots [n, K, D]``, ``areas [n, K]``) plus ``meta.json``.
A stopped build resumes at the first missing chunk; a library made from another checkpoint is rebuilt.

The mask area of a slot is ``attn.mean(-1)``: the share of the encoder's feature grid the slot claims in the last
Slot Attention iteration (the attention sums to 1 over slots, so the K areas of an image sum to 1). It needs no
decoding, so it is the same for every model, the diffusion decoder (which has no alpha masks) included.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm import tqdm

from slotlab.errors import UserError
from slotlab.io import atomic_write_bytes, atomic_write_text
from slotlab.runs import weights_file

CHUNK_IMAGES = 4096  # images per safetensors file: a stopped build loses at most one chunk of work
AREA_SOURCE = "attn.mean(-1)"


@dataclass
class SlotLibrary:
    """All slots of a split."""

    slots: torch.Tensor  # [N, K, D]
    areas: torch.Tensor  # [N, K], share of the feature grid each slot claims; sums to 1 over K
    meta: dict[str, Any]


def library_dir(run_dir: Path, split: str) -> Path:
    return Path(run_dir) / "library" / split


def _file_digest(path: Path) -> str:
    if not path.is_file():  # load_trained_model names the missing run or checkpoint
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


def _chunk_path(folder: Path, index: int) -> Path:
    return folder / f"chunk_{index:05d}.safetensors"


def _read_chunk(path: Path, expected_images: int, num_slots: int, slot_dim: int) -> dict[str, torch.Tensor] | None:
    """A chunk's tensors, or None when the file is missing, unreadable or of the wrong shape."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return None
    slots, areas = tensors.get("slots"), tensors.get("areas")
    if slots is None or areas is None or tuple(slots.shape) != (expected_images, num_slots, slot_dim) \
            or tuple(areas.shape) != (expected_images, num_slots):
        return None
    return tensors


@torch.no_grad()
def build_library(run_dir: Path, split: str = "train", batch_size: int = 0, device: str = "auto",
                  checkpoint: str = "best", limit: int = 0) -> str:
    """Encode ``split`` of the run's dataset into a slot library (resumable).

    Args:
        run_dir: a trained run directory.
        split: which split to encode (``train`` for composition).
        batch_size: images per forward pass (0 = four times the training batch size).
        device: ``auto``, ``cpu``, ``cuda``...
        checkpoint: ``best`` (falls back to ``last``) or ``last``.
        limit: encode only the first ``limit`` images of the split (0 = all of them).

    Returns:
        The library folder, ``RUN_DIR/library/<split>``.
    """
    from slotlab.data import build_dataset, to_model_batch
    from slotlab.tasks import load_trained_model

    run_dir = Path(run_dir)
    config, model = load_trained_model(run_dir, checkpoint, device)
    dev = next(model.parameters()).device
    dataset = build_dataset(config.data, split)
    num_images, num_slots, slot_dim = len(dataset), config.model.num_slots, model.slot_size
    if limit < 0:
        raise UserError(f"library: the image limit must be 0 (all) or positive, got {limit}")
    num_images = min(num_images, limit) if limit else num_images
    if num_images == 0:
        raise UserError(f"library: split {split!r} of {run_dir} has no images")
    batch_size = batch_size or 4 * config.train.batch_size
    if batch_size < 0:
        raise UserError(f"library: batch size must be positive, got {batch_size}")
    folder = library_dir(run_dir, split)
    meta = {
        "split": split, "checkpoint": weights_file(run_dir, checkpoint).name,
        "checkpoint_sha256": _file_digest(weights_file(run_dir, checkpoint)),
        "num_images": num_images, "num_slots": num_slots, "slot_dim": slot_dim, "chunk_images": CHUNK_IMAGES,
        "num_chunks": -(-num_images // CHUNK_IMAGES), "area": AREA_SOURCE,
    }
    _start_or_resume(folder, meta)

    chunks = [(i, i * CHUNK_IMAGES, min((i + 1) * CHUNK_IMAGES, num_images)) for i in range(meta["num_chunks"])]
    todo = [c for c in chunks if _read_chunk(_chunk_path(folder, c[0]), c[2] - c[1], num_slots, slot_dim) is None]
    done_images = num_images - sum(end - start for _, start, end in todo)
    if todo:
        print(f"library: encoding {num_images - done_images} of {num_images} {split} images into {folder} (once; "
              "later commands reuse it)", file=sys.stderr)
    with tqdm(total=num_images, initial=done_images, desc=f"library {split}", unit="img", dynamic_ncols=True,
              disable=not todo) as progress:  # silent when the library is complete already
        for index, start, end in todo:
            torch.manual_seed(index)  # random slot initialisations: same chunk, same slots, however often resumed
            slots, areas = [], []
            for first in range(start, end, batch_size):
                indices = np.arange(first, min(first + batch_size, end))
                image = to_model_batch(dataset.batch(indices), dev)["image"]  # [B, 3, H, W]
                grouped, _ = model.encode(image)
                slots.append(grouped.slots.float().cpu())  # [B, K, D]
                areas.append(grouped.attn.float().mean(-1).cpu())  # [B, K]
                progress.update(len(indices))
            tensors = {"slots": torch.cat(slots).contiguous(), "areas": torch.cat(areas).contiguous()}
            atomic_write_bytes(_chunk_path(folder, index), save(tensors, metadata={"split": split}))
    atomic_write_text(folder / "meta.json", json.dumps({**meta, "complete": True}, indent=2) + "\n")
    return str(folder)


def _start_or_resume(folder: Path, meta: dict[str, Any]) -> None:
    """Keep the chunks of a library made with the same settings; otherwise start the folder afresh."""
    meta_path = folder / "meta.json"
    old: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
    same = bool(old) and all(old.get(key) == value for key, value in meta.items())
    if not same:
        if old:
            print(f"library: {folder} was built from other settings (checkpoint or data); rebuilding it")
        for stale in folder.glob("chunk_*.safetensors"):
            stale.unlink()
    atomic_write_text(meta_path, json.dumps({**meta, "complete": False}, indent=2) + "\n")


def load_library(run_dir: Path, split: str = "train") -> SlotLibrary:
    """Read a complete library built by :func:`build_library`.

    Raises:
        UserError: the library is missing, incomplete or damaged (rebuild it with ``slotlab library``).
    """
    folder = library_dir(run_dir, split)
    meta_path = folder / "meta.json"
    hint = f"run `slotlab library {run_dir} --split {split}`"
    if not meta_path.is_file():
        raise UserError(f"no slot library in {folder}: {hint}")
    try:
        meta = json.loads(meta_path.read_text())
        num_images, num_chunks, chunk_images = meta["num_images"], meta["num_chunks"], meta["chunk_images"]
        num_slots, slot_dim = meta["num_slots"], meta["slot_dim"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"corrupt slot library metadata {meta_path} ({exc}): {hint}") from None
    if not meta.get("complete"):
        raise UserError(f"slot library {folder} is incomplete: {hint} to finish it")
    slots, areas = [], []
    for index in range(num_chunks):
        expected = min(chunk_images, num_images - index * chunk_images)
        tensors = _read_chunk(_chunk_path(folder, index), expected, num_slots, slot_dim)
        if tensors is None:
            raise UserError(f"slot library chunk {_chunk_path(folder, index)} is missing or damaged: {hint}")
        slots.append(tensors["slots"])
        areas.append(tensors["areas"])
    return SlotLibrary(slots=torch.cat(slots), areas=torch.cat(areas), meta=meta)
