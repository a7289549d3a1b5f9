"""Files: atomic writes, and checkpoints that are data, never code (the bottom layer; imports only ``errors``).

Every file slotlab writes goes through a temporary file and a rename, so a crash or a full disk leaves the old file
or the new one, never half of one. A checkpoint is ``{"model", "optimizer", "step", "config", "best_val", ...}``
(nanoGPT's layout plus the resolved config), written atomically and read with ``torch.load(weights_only=True)``, so
a run directory alone rebuilds the model.
"""

from __future__ import annotations

import io as _io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from slotlab.errors import UserError


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    _atomic_write(Path(path), lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """A checkpoint dict as the bytes of its file (``torch.save``'s archive)."""
    buffer = _io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Save a checkpoint dict atomically (temp file + rename)."""
    atomic_write_bytes(Path(path), checkpoint_bytes(state))


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name when the message is empty)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; corrupt or unsafe files raise :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing checkpoint {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged (or empty)
        size = path.stat().st_size
        raise UserError(f"corrupt checkpoint {path}: not a PyTorch checkpoint archive ({size} bytes)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"checkpoint {path} holds something other than data (refused to unpickle code): "
                        f"{first_line(exc)}") from None
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to read the file means a damaged checkpoint
        raise UserError(f"corrupt checkpoint {path}: {first_line(exc)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or not isinstance(
            state.get("config"), dict) or not isinstance(state.get("step", 0), int):
        raise UserError(f"checkpoint {path} is not a slotlab checkpoint")
    return state


def non_finite_weights(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``weights`` that hold a NaN or an infinity."""
    return [name for name, value in weights.items()
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path, strict: bool = True):
    """``module.load_state_dict(weights)``, with a damaged or mismatched checkpoint as a :class:`UserError`.

    Non-finite weights (a diverged run saved by an older slotlab) are refused as well: nothing scored or decoded from
    them would mean anything.
    """
    bad = non_finite_weights(weights)
    if bad:
        raise UserError(f"checkpoint {path} holds non-finite weights ({bad[0]}, {len(bad)} tensors in all): the run "
                        f"diverged before it was saved")
    try:
        return module.load_state_dict(weights, strict=strict)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise UserError(f"checkpoint {path} does not fit the model of its config: {first_line(exc, 300)}") from None
