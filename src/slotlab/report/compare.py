"""``slotlab compare RUN_DIR...``: one table of the headline numbers of several runs.

Per run it reads ``config.json`` (what was trained), ``metrics.jsonl`` (steps done and wall time),
``eval/metrics.json`` (``slotlab eval``: ARI, FG-ARI, mIoU, mBO, or AP at the paper's thresholds for set prediction)
and ``compose/metrics.json`` (``slotlab compose``: FID). A number a run does not have is shown as ``-``; a metric no
run has is left out of the Markdown table and named under it, with the command that produces it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slotlab.config import flatten_config
from slotlab.errors import UserError
from slotlab.io import atomic_write_text
from slotlab.runs import find_eval, scoring_conditions


@dataclass(frozen=True)
class Column:
    """One table column: where its value comes from and how it is printed."""

    header: str
    source: str  # eval | compose | run
    keys: tuple[str, ...]  # first key present wins
    fmt: str = "{:.3f}"
    scale: float = 1.0
    hint: str = ""  # command that produces the value


METRIC_COLUMNS = (
    Column("ARI", "eval", ("ari",), hint="slotlab eval"),
    Column("FG-ARI", "eval", ("fg_ari",), hint="slotlab eval"),
    Column("mIoU", "eval", ("miou", "mIoU", "miou_fg"), hint="slotlab eval"),
    Column("mBO", "eval", ("mbo", "mBO"), hint="slotlab eval"),
    Column("MSE", "eval", ("mse",), "{:.4f}", hint="slotlab eval"),
    Column("AP∞ %", "eval", ("ap_inf",), "{:.1f}", 100.0, "slotlab eval (set prediction runs)"),
    Column("AP1 %", "eval", ("ap_1",), "{:.1f}", 100.0, "slotlab eval (set prediction runs)"),
    Column("AP0.5 %", "eval", ("ap_0.5",), "{:.1f}", 100.0, "slotlab eval (set prediction runs)"),
    Column("AP0.25 %", "eval", ("ap_0.25",), "{:.1f}", 100.0, "slotlab eval (set prediction runs)"),
    Column("AP0.125 %", "eval", ("ap_0.125",), "{:.1f}", 100.0, "slotlab eval (set prediction runs)"),
    Column("FID", "compose", ("fid", "fid_compose", "fid_composition", "fid_compositions", "composition_fid"),
           "{:.1f}", hint="slotlab compose"),
    Column("FID recon", "compose", ("fid_recon",), "{:.1f}", hint="slotlab compose"),
)


def _read_json(path: Path) -> dict[str, Any]:
    """A metrics file as a dict; ``{}`` when it does not exist, :class:`UserError` when it is unreadable."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"corrupt metrics file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"corrupt metrics file {path}: expected a JSON object")
    return data


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"corrupt line {number} in {path}") from None
    return records


def training_time(records: list[dict[str, Any]], batch_size: int) -> float | None:
    """Wall-clock seconds of training, from the train records of ``metrics.jsonl``.

    Each train record's ``images_per_s`` covers the steps since the previous record (validation and checkpoints
    included), so the window's duration is ``steps * batch_size / images_per_s``. Explicit ``wall_time_s`` /
    ``elapsed_s`` fields, when a run has them, win.
    """
    train = [r for r in records if r.get("split") == "train"]
    for key in ("wall_time_s", "elapsed_s"):
        if train and key in train[-1]:
            return float(train[-1][key])
    total, previous_step, found = 0.0, 0, False
    for record in sorted(train, key=lambda r: r.get("step", 0)):
        rate, step = record.get("images_per_s"), int(record.get("step", 0))
        if rate and rate > 0 and step > previous_step:
            total += (step - previous_step) * batch_size / rate
            found = True
        previous_step = step
    return total if found else None


def format_duration(seconds: float | None) -> str:
    """``95.2`` -> ``1m 35s``; ``None`` -> ``-``."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _describe(config: dict[str, Any]) -> str:
    """Short label of what a run trained: task, grouping, slot initialisation, quantiser and decoder if not
    default."""
    model = config.get("model", {})
    parts = [config.get("task", "autoencoder"), model.get("grouping", "slot_attention"),
             model.get("slot_init", "gaussian")]
    if model.get("quantiser", "none") != "none":
        parts.append(model["quantiser"])
    if model.get("decoder_kind", "cnn") != "cnn":
        pixels = model.get("decoder_pixels", 1.0)
        parts.append(f"{model['decoder_kind']} decoder" + (f" {pixels:.0%} px" if pixels < 1 else ""))
    return " / ".join(parts)


def collect_run(run_dir: Path) -> dict[str, Any]:
    """The raw row of one run: ``name``, ``model``, ``steps``, ``wall_time_s`` and every metric column's value."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"missing run directory {run_dir}")
    config = _read_json(run_dir / "config.json")
    if not config:
        raise UserError(f"{run_dir} is not a run directory (no config.json)")
    records = _read_records(run_dir / "metrics.jsonl")
    evaluated = find_eval(run_dir)
    sources = {"eval": _read_json(evaluated / "metrics.json") if evaluated else {},
               "compose": _read_json(run_dir / "compose" / "metrics.json")}
    steps = max((int(r.get("step", 0)) for r in records), default=None)
    batch_size = int(config.get("train", {}).get("batch_size", 0))
    evaluation = sources["eval"]
    scored = (f"{evaluation.get('split', '?')} {evaluation.get('num_images', '?')} img, "
              f"{evaluation.get('checkpoint', '?')}") if evaluation else "-"
    scored += "".join(f", {condition}" for condition in scoring_conditions(evaluation, config))
    row: dict[str, Any] = {"name": run_dir.name, "model": _describe(config), "steps": steps,
                           "wall_time_s": training_time(records, batch_size), "evaluated": scored, "config": config}
    for column in METRIC_COLUMNS:
        values = sources[column.source]
        value = next((values[k] for k in column.keys if isinstance(values.get(k), (int, float))), None)
        row[column.header] = None if value is None else float(value)
    return row


def _cell(column: Column, value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else column.fmt.format(value * column.scale)


def compare_runs(run_dirs: list[Path], out: Path | None = None) -> str:
    """A Markdown table comparing runs; also written to ``out`` (``.md`` as printed, ``.csv`` with every column).

    Args:
        run_dirs: run directories made by ``slotlab train`` (and optionally ``eval`` / ``compose``).
        out: optional file to write; its suffix picks the format.

    Returns:
        The Markdown table (plus a line naming metrics that no run has yet).
    """
    if not run_dirs:
        raise UserError("compare needs at least one run directory")
    if out is not None and Path(out).suffix.lower() not in (".md", ".csv"):
        raise UserError(f"--out {out}: use a .md or .csv file name")
    rows = [collect_run(Path(d)) for d in run_dirs]
    present = [c for c in METRIC_COLUMNS if any(row[c.header] is not None for row in rows)]
    missing = [c for c in METRIC_COLUMNS if c not in present]

    headers = ["run", "model", "evaluated on", *[c.header for c in present], "steps", "wall time"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(headers) - 3)) + "|"]
    for row in rows:
        cells = [row["name"], row["model"], row["evaluated"], *[_cell(c, row[c.header]) for c in present],
                 "-" if row["steps"] is None else str(row["steps"]), format_duration(row["wall_time_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    differences = config_differences([row["config"] for row in rows])
    if len(rows) > 1:
        lines.append("")
        lines.append("Config differences: " + ("; ".join(
            f"{key} ({', '.join(values)})" for key, values in differences.items()) if differences else "none"))
    if missing:
        hints = sorted({c.hint for c in missing})
        lines.append("")
        lines.append(f"Not measured in these runs: {', '.join(c.header for c in missing)} (from: {'; '.join(hints)}).")
    table = "\n".join(lines)

    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".csv":
            atomic_write_text(out, _to_csv(rows))
        else:
            atomic_write_text(out, table + "\n")
    return table


def config_differences(configs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The config keys whose values differ between runs, with each run's value (in run order)."""
    flats = [flatten_config(config) for config in configs]
    keys = sorted(set().union(*flats)) if flats else []
    return {key: [json.dumps(flat.get(key)) for flat in flats] for key in keys
            if len({json.dumps(flat.get(key)) for flat in flats}) > 1}


def _to_csv(rows: list[dict[str, Any]]) -> str:
    """Every column, raw values (AP as a fraction, wall time in seconds), empty where a run has no value."""
    buffer = io.StringIO()
    fields = ["run", "model", "evaluated", *[c.keys[0] for c in METRIC_COLUMNS], "steps", "wall_time_s"]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    for row in rows:
        values = [row["name"], row["model"], row["evaluated"], *[row[c.header] for c in METRIC_COLUMNS], row["steps"],
                  row["wall_time_s"]]
        writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


__all__ = ["compare_runs", "collect_run", "config_differences", "format_duration", "training_time"]
