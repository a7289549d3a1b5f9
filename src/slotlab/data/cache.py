"""Decode an on-disk split once into uint8 arrays, optionally kept as a memory-mapped cache.

On-disk datasets (:class:`~slotlab.data.clevrtex.CLEVRTex`, :class:`~slotlab.data.folder.ImageFolder`) list their
files as :class:`Source` records and give a picklable ``decode(source) -> Decoded`` function; :func:`prepare_split`
runs it over the split in worker processes (PNG decoding holds the GIL, threads do not help), applies the
``max_objects`` filter and the bad-file policy, and stacks the results.

With ``data.cache=true`` the stacked arrays are written once under ``CACHE_ROOT/<key>/`` as raw uint8 / float32 /
int64 files plus ``meta.json``, and every later run memory-maps them: a training batch is then one fancy index into
the page cache, thousands of images per second, with no decoding. ``CACHE_ROOT`` is outside the data folder (which
slotlab never writes into): ``$SLOTLAB_CACHE_DIR/datasets/<folder name>-<hash of its path>``, by default under the
user's cache folder (``$XDG_CACHE_HOME/slotlab``, i.e. ``~/.cache/slotlab``). The key holds the loader settings and
a fingerprint of the source files (names, sizes, modification times), so a changed dataset gets a new cache and the
stale one is removed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from slotlab.errors import UserError

CACHE_FORMAT = 1  # bump when the cached arrays change meaning
PARALLEL_MIN_ITEMS = 64  # below this, decoding in this process is faster than starting workers
SKIP_HINT = "pass --skip-bad (or --set data.skip_bad=true) to skip and list bad files"


@dataclass(frozen=True)
class Source:
    """The files of one image of an on-disk dataset."""

    index: int  # the dataset's own number of the image (CLEVRTex index, or position in a folder)
    image: Path
    mask: Path | None = None
    meta: Path | None = None

    def files(self) -> list[Path]:
        return [p for p in (self.image, self.mask, self.meta) if p is not None]


@dataclass
class Decoded:
    """One decoded image, or the reason it could not be decoded."""

    image: np.ndarray | None = None  # uint8 [R, R, 3]
    mask: np.ndarray | None = None  # uint8 [R, R]
    num_objects: int = 0  # objects in the full (uncropped) mask
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None  # "path: reason"
    notes: list[str] = field(default_factory=list)  # "path: what" for values kept as unknown


@dataclass(frozen=True)
class ArraySpec:
    """Per-image shape and dtype of one stacked array."""

    shape: tuple[int, ...]
    dtype: str


@dataclass
class PreparedSplit:
    """The stacked arrays of a split, the bad files skipped, and which sources the rows come from."""

    arrays: dict[str, np.ndarray]  # "images", optionally "masks", extras
    skipped: list[str]
    source_index: np.ndarray  # int64 [N], Source.index of each row
    cache_dir: str | None = None
    notes: list[str] = field(default_factory=list)  # values kept as unknown, "path: what" (kept images only)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _decode_all(sources: Sequence[Source], decode: Callable[[Source], Decoded], workers: int):
    """Yield ``decode(source)`` in order, in worker processes when there is enough work."""
    workers = workers or default_workers()
    if workers <= 1 or len(sources) < PARALLEL_MIN_ITEMS:
        yield from map(decode, sources)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(workers) as pool:
        yield from pool.imap(decode, sources, chunksize=16)


def _allocate(specs: dict[str, ArraySpec], count: int, out_dir: Path | None) -> dict[str, np.ndarray]:
    if out_dir is None or count == 0:
        return {name: np.zeros((count, *spec.shape), dtype=spec.dtype) for name, spec in specs.items()}
    return {name: np.memmap(out_dir / f"{name}.bin", dtype=spec.dtype, mode="w+", shape=(count, *spec.shape))
            for name, spec in specs.items()}


def prepare_split(sources: Sequence[Source], decode: Callable[[Source], Decoded], specs: dict[str, ArraySpec], *,
                  max_objects: int = 0, skip_bad: bool = False, workers: int = 0, desc: str = "decode",
                  out_dir: Path | None = None) -> PreparedSplit:
    """Decode ``sources`` into stacked arrays (in memory, or raw files in ``out_dir``).

    Images whose mask holds more than ``max_objects`` objects (0 = no limit) are left out. A source that fails to
    decode raises :class:`UserError` naming the file, or with ``skip_bad`` is left out and listed.
    """
    arrays = _allocate(specs, len(sources), out_dir)
    skipped: list[str] = []
    notes: list[str] = []
    kept: list[int] = []
    progress = tqdm(total=len(sources), desc=desc, unit="img", disable=len(sources) < 500, mininterval=1.0)
    try:
        for source, item in zip(sources, _decode_all(sources, decode, workers)):
            progress.update(1)
            if item.error is not None:
                if not skip_bad:
                    raise UserError(f"{item.error} ({SKIP_HINT})")
                skipped.append(item.error)
                continue
            if max_objects and item.num_objects > max_objects:
                continue
            row = len(kept)  # results arrive in order, so kept rows are written contiguously
            arrays["images"][row] = item.image
            if "masks" in arrays:
                arrays["masks"][row] = item.mask
            for name, value in item.extras.items():
                arrays[name][row] = value
            kept.append(source.index)
            notes += item.notes
    finally:
        progress.close()
    count = len(kept)
    if out_dir is not None and len(sources):
        for array in arrays.values():
            array.flush()
        arrays.clear()  # unmap before cutting the files
        for name, spec in specs.items():  # drop the rows never written (filtered or skipped)
            os.truncate(out_dir / f"{name}.bin", count * _row_bytes(spec))
        arrays = _open_arrays(out_dir, specs, count)
    else:
        arrays = {name: array[:count] for name, array in arrays.items()}
    return PreparedSplit(arrays, skipped, np.array(kept, dtype=np.int64), notes=notes)


def _row_bytes(spec: ArraySpec) -> int:
    return int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize


def _open_arrays(directory: Path, specs: dict[str, ArraySpec], count: int) -> dict[str, np.ndarray]:
    """Read-only memory maps of the raw arrays (zero rows cannot be mapped: plain empty arrays then)."""
    arrays = {}
    for name, spec in specs.items():
        if count == 0:
            arrays[name] = np.zeros((0, *spec.shape), dtype=spec.dtype)
            continue
        path = directory / f"{name}.bin"
        if path.stat().st_size != count * _row_bytes(spec):
            raise ValueError(f"{path} has {path.stat().st_size} bytes, expected {count * _row_bytes(spec)}")
        arrays[name] = np.memmap(path, dtype=spec.dtype, mode="r", shape=(count, *spec.shape))
    return arrays


# ---------------------------------------------------------------------------------------------------- the cache
def user_cache_dir() -> Path:
    """slotlab's cache folder: ``$SLOTLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/slotlab`` (by default
    ``~/.cache/slotlab``)."""
    root = os.environ.get("SLOTLAB_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slotlab"


def cache_root(data_root: Path) -> Path:
    """Where caches of the dataset in ``data_root`` live: in the user's cache folder, never in the data folder."""
    data_root = Path(data_root).resolve()
    digest = hashlib.sha1(str(data_root).encode()).hexdigest()[:12]
    return user_cache_dir() / "datasets" / f"{data_root.name}-{digest}"


def fingerprint(sources: Sequence[Source], settings: dict[str, Any]) -> str:
    """A short hash of the loader settings and of every source file's name, size and modification time."""
    digest = hashlib.sha1(json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True).encode())
    for source in sources:
        for path in source.files():
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cached_split(directory: Path, specs: dict[str, ArraySpec],
                 build: Callable[[Path], PreparedSplit]) -> PreparedSplit:
    """Memory-map the split cached in ``directory``, building it first (via ``build(tmp_dir)``) when missing.

    The cache is written into a temporary sibling folder and renamed, so a crash never leaves half a cache, and
    two processes building the same cache at once both end up with a valid one.
    """
    directory = Path(directory)
    loaded = _load_cached(directory, specs)
    if loaded is not None:
        return loaded
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise UserError(f"cannot write the data cache {tmp}: {exc.strerror} (set SLOTLAB_CACHE_DIR or "
                        f"data.cache=false)") from None
    try:
        prepared = build(tmp)
        meta = {"format": CACHE_FORMAT, "count": len(prepared.source_index), "skipped": prepared.skipped,
                "notes": prepared.notes,
                "arrays": {name: {"shape": list(spec.shape), "dtype": spec.dtype} for name, spec in specs.items()}}
        np.save(tmp / "source_index.npy", prepared.source_index)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # last: marks the cache complete
        prepared.arrays.clear()  # close the memory maps before the folder moves
        if directory.exists():  # a stale or broken cache, or one another process just finished
            shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale_siblings(directory)
    loaded = _load_cached(directory, specs)
    if loaded is None:
        raise UserError(f"the data cache {directory} could not be read back")
    return loaded


def _load_cached(directory: Path, specs: dict[str, ArraySpec]) -> PreparedSplit | None:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("format") != CACHE_FORMAT or meta["arrays"] != {
                name: {"shape": list(spec.shape), "dtype": spec.dtype} for name, spec in specs.items()}:
            return None
        count = int(meta["count"])
        arrays = _open_arrays(directory, specs, count)
        source_index = np.load(directory / "source_index.npy")
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: rebuilt by the caller (it is derived data)
    return PreparedSplit(arrays, list(meta["skipped"]), source_index, str(directory), list(meta.get("notes", [])))


def _remove_stale_siblings(directory: Path) -> None:
    """Caches of the same dataset and settings but older files (another fingerprint) are never read again."""
    prefix = directory.name.rsplit("-", 1)[0] + "-"
    for sibling in directory.parent.glob(prefix + "*"):
        if sibling != directory and sibling.is_dir() and ".tmp-" not in sibling.name:
            shutil.rmtree(sibling, ignore_errors=True)


def load_split(sources: Sequence[Source], decode: Callable[[Source], Decoded], specs: dict[str, ArraySpec], *,
               key: str, data_root: Path, settings: dict[str, Any], cache: bool, max_objects: int, skip_bad: bool,
               workers: int, desc: str) -> PreparedSplit:
    """:func:`prepare_split`, through the memory-mapped cache when ``cache`` (the entry point of the loaders)."""
    def build(out_dir: Path | None) -> PreparedSplit:
        return prepare_split(sources, decode, specs, max_objects=max_objects, skip_bad=skip_bad, workers=workers,
                             desc=desc, out_dir=out_dir)

    if not cache:
        return build(None)
    # skip_bad is not part of the key: without bad files both settings give the same arrays, and with bad files
    # only skip_bad=true builds a cache; reading that cache with skip_bad=false must still fail, as below.
    directory = cache_root(data_root) / f"{key}-{fingerprint(sources, {**settings, 'max_objects': max_objects})}"
    prepared = cached_split(directory, specs, build)
    if prepared.skipped and not skip_bad:
        raise UserError(f"{prepared.skipped[0]} ({SKIP_HINT})")
    return prepared


# ---------------------------------------------------------------------------------------------------- command
def cache_dataset(data_cfg, splits: Sequence[str]) -> str:
    """``slotlab data cache``: build (or check) the memory-mapped cache of each split; returns one line per split."""
    from slotlab.data import build_dataset

    lines = []
    for split in splits:
        dataset = build_dataset(replace(data_cfg, cache=True), split)
        skipped = dataset.info.get("skipped_files", [])
        height, width = dataset.resolution
        where = dataset.info.get("cache_dir") or procedural_cache_dir()
        lines.append(f"{split}: {len(dataset)} images {height}x{width} in {where}"
                     + (f" ({len(skipped)} bad files skipped)" if skipped else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- procedural data
def procedural_cache_dir() -> Path:
    """Where splits drawn by slotlab's generators are kept: ``procedural/`` in :func:`user_cache_dir`."""
    return user_cache_dir() / "procedural"


def cached_generation(kind: str, settings: dict[str, Any], make: Callable[[], tuple], cache: bool = True) -> tuple:
    """``make()`` (a generator's ``(images, masks, extras)``), drawn once and then read from a ``.npz`` file.

    The file name holds a hash of ``kind`` and ``settings`` (which must include the generator's version), so other
    settings get their own file. The file is written to a temporary name and renamed: a reader sees a whole file or
    none, and a damaged one is simply drawn again (it is derived data).
    """
    if not cache:
        return make()
    digest = hashlib.sha1(json.dumps({"kind": kind, **settings}, sort_keys=True).encode()).hexdigest()[:16]
    path = procedural_cache_dir() / f"{kind}-{settings.get('split', 'all')}-{digest}.npz"
    try:
        with np.load(path) as stored:
            extras = {name[len("extra_"):]: stored[name] for name in stored.files if name.startswith("extra_")}
            return stored["images"], stored["masks"], extras
    except (OSError, ValueError, KeyError, EOFError):
        pass
    images, masks, extras = make()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, images=images, masks=masks, **{f"extra_{name}": value for name, value in extras.items()})
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache folder: the data were drawn anyway; next time they are drawn again
        tmp.unlink(missing_ok=True)
    return images, masks, extras
