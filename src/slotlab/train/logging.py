"""Run logs: ``metrics.jsonl`` (one JSON object per line), TensorBoard scalars, and the loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slotlab.runs import read_metrics


class MetricsLog:
    """Appends ``{"step", "split", ...}`` records to ``RUN_DIR/metrics.jsonl`` and mirrors them to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self.writer = None

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run rewrites them exactly), and any torn or damaged line."""
        if not self.path.exists():
            return
        from slotlab.io import atomic_write_text

        keep = [record for record in read_metrics(self.path.parent) if record.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in keep))

    def log(self, step: int, split: str, values: dict[str, Any]) -> None:
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in values.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in record.items():
                if name not in ("step", "split") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value
