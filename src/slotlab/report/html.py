"""``slotlab report RUN_DIR``: one self-contained HTML page per run, and its Markdown twin.

``RUN_DIR/report.html`` embeds every picture (base64 PNG), so the file alone can be mailed or archived;
``RUN_DIR/report.md`` has the same tables with relative links to the pictures, for pasting into a paper or an
assignment. Each section appears only when its files exist:

=====================  ==================================================================================
section                files
=====================  ==================================================================================
run                    ``config.json``, ``metrics.jsonl`` (steps, epochs, losses, speed)
metrics                ``eval/metrics.json`` (``slotlab eval``), ``curves.png`` (training)
masks, slots           ``eval/best.png``, ``eval/worst.png``, ``eval/masks.png``, ``eval/slots.png``,
                       ``eval/attention.png``, ``eval/recon.png`` (VAE runs)
composition            ``compose/metrics.json`` (FID of compositions and reconstructions), ``compose/gallery.png``
mixing, editing        ``mix/*.png``, ``edit/*.png``
disentanglement        ``eval/disentanglement*.png`` (VQ runs)
config                 ``config.json``, every field
=====================  ==================================================================================

:func:`find_chromium` and :func:`dump_dom` drive headless Chromium (Debian's ``chromium``) to check the page and
take the README picture: ``python -m slotlab.report.html RUN_DIR --screenshot docs/images/report.png``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slotlab.errors import UserError
from slotlab.io import atomic_write_text
from slotlab.runs import find_eval, scoring_conditions

# What each number means, shown next to it.
METRIC_NOTES = {
    "ari": "Adjusted Rand Index of all pixels (sklearn-exact), mean over images",
    "fg_ari": "ARI of the foreground pixels, mean over images with objects",
    "miou": "foreground mIoU of Hungarian-matched masks (CLEVRTex mIoU_fg)",
    "mbo": "mean best overlap (IoU) per ground-truth object",
    "mse": "mean squared error per value, images in [-1, 1] (the training loss)",
    "clevrtex_mse": "CLEVRTex MSE: squared error summed per image over [0, 1] pixels",
    "images_with_objects": "images with at least one foreground object",
    "objects_in_own_slot": "share of the object pixels in the slot matched to their object",
    "objects_in_background_slot": "share of the object pixels in the slot matched to the background",
    "objects_in_other_object_slot": "share of the object pixels in the slot matched to another object",
    "objects_in_spare_slot": "share of the object pixels in a slot matched to nothing (a cut-off part)",
    "num_images": "images scored",
    "eval_seconds": "wall time of the evaluation",
    "psnr": "peak signal-to-noise ratio of reconstructions (dB)",
    "ap_inf": "set prediction AP, properties only",
    "fid_compose": "FID of K-means slot compositions vs val images",
    "fid_recon": "FID of reconstructions vs val images",
    "kid_compose": "KID of compositions vs val images",
    "kid_recon": "KID of reconstructions vs val images",
}

GALLERIES = (
    ("best.png", "Best images by ARI: true mask | predicted mask | image | reconstruction"),
    ("worst.png", "Worst images by ARI"),
    ("masks.png", "First images of the split"),
    ("slots.png", "Per-slot reconstructions (each slot framed in its mask colour)"),
    ("attention.png", "Slot Attention maps at every iteration (white = 0, slot colour = 1)"),
    ("recon.png", "Images and their reconstructions"),
)

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1em; } td, th { border: 1px solid #ccc; padding: 3px 10px; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.note { color: #666; font-size: 0.9em; }
.headline { display: flex; gap: 1em; flex-wrap: wrap; margin: 1em 0; }
.headline div { background: #f5f7fa; border: 1px solid #dde; border-radius: 6px; padding: 0.5em 1em; min-width: 7em; }
.headline b { display: block; font-size: 1.5em; } .headline span { color: #555; font-size: 0.85em; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; } img { max-width: 100%; }
details summary { cursor: pointer; color: #225; }
"""

# Counts the pictures the browser decoded; a headless check reads it from the DOM (data-images-loaded on <body>).
_IMAGE_CHECK = """
window.addEventListener("load", function () {
  var ok = Array.prototype.filter.call(document.images, function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.setAttribute("data-images-loaded", String(ok.length));
});
"""

HEADLINE = ("ari", "fg_ari", "miou", "mbo", "mse", "psnr", "ap_inf", "fid_compose")
DISPLAY_NAMES = {"ari": "ARI", "fg_ari": "FG-ARI", "miou": "mIoU", "mbo": "mBO", "mse": "MSE", "psnr": "PSNR",
                 "ap_inf": "AP∞", "fid_compose": "FID (compositions)"}


def write_report(run_dir: Path) -> str:
    """Write ``RUN_DIR/report.html`` (self-contained) and ``RUN_DIR/report.md``; return the HTML path.

    Raises:
        UserError: ``run_dir`` is not a run directory (no ``config.json``) or one of its files is unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"missing run directory {run_dir}")
    if not (run_dir / "config.json").exists():
        raise UserError(f"{run_dir} is not a run directory (no config.json)")
    report = _collect(run_dir)
    atomic_write_text(run_dir / "report.html", _render_html(report, run_dir))
    atomic_write_text(run_dir / "report.md", _render_markdown(report, run_dir))
    return str(run_dir / "report.html")


# ------------------------------------------------------------------------------------------------ collect
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"corrupt file {path}: {exc}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"corrupt file {path} (line {number}): {exc}") from None
    return records


def _optional_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"corrupt file {path}: expected a JSON object")
    return data


def _training_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    val = [r for r in records if r.get("split") == "val" and "loss" in r]
    summary: dict[str, Any] = {}
    if train:
        summary["steps"] = train[-1].get("step")
        summary["epochs"] = train[-1].get("epoch")
        summary["last train loss"] = train[-1]["loss"]
        speeds = [r["images_per_s"] for r in train if "images_per_s" in r]
        if speeds:
            summary["images/s (median)"] = sorted(speeds)[len(speeds) // 2]
    if val:
        summary["best val loss"] = min(r["loss"] for r in val)
        for name in ("ari", "fg_ari"):
            if name in val[-1]:
                summary[f"last val {name}"] = val[-1][name]
                summary[f"best val {name}"] = max(r[name] for r in val if name in r)
    return summary


def _collect(run_dir: Path) -> dict[str, Any]:
    config = _read_json(run_dir / "config.json")
    if not isinstance(config, dict):
        raise UserError(f"corrupt file {run_dir / 'config.json'}: expected a JSON object")
    eval_dir = find_eval(run_dir) or run_dir / "eval"
    return {
        "eval_name": eval_dir.relative_to(run_dir).as_posix(),
        "name": run_dir.resolve().name,
        "config": config,
        "training": _training_summary(_read_jsonl(run_dir / "metrics.jsonl")),
        "metrics": _optional_json(eval_dir / "metrics.json"),
        "compose": _optional_json(run_dir / "compose" / "metrics.json"),
        "curves": [p for p in [run_dir / "curves.png"] if p.exists()],
        "galleries": [(eval_dir / name, caption) for name, caption in GALLERIES if (eval_dir / name).exists()],
        "compose_images": [p for p in [run_dir / "compose" / "gallery.png"] if p.exists()],
        "mix": sorted((run_dir / "mix").glob("*.png")),
        "edit": sorted((run_dir / "edit").glob("*.png")),
        "disentanglement": sorted(eval_dir.glob("disentanglement*.png")),
    }


def _eval_source(report: dict[str, Any]) -> str:
    """Which evaluation the metrics come from, e.g. ``eval/val-best: val split, 500 images, checkpoint best``, and how
    it was scored where that differs from one pass of the trained model (e.g. ``, T=7, best of 8 restarts``)."""
    metrics = report["metrics"]
    if not metrics:
        return ""
    return (f"{report['eval_name']}: {metrics.get('split', '?')} split, {metrics.get('num_images', '?')} images, "
            f"checkpoint {metrics.get('checkpoint', '?')}"
            + "".join(f", {condition}" for condition in scoring_conditions(metrics, report["config"])))


# ------------------------------------------------------------------------------------------------ formatting
def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}" if abs(value) < 1 else f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        text = ", ".join(_format(v) for v in value[:12])
        return f"[{text}{', ...' if len(value) > 12 else ''}]"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(name, _format(value), METRIC_NOTES.get(name, "")) for name, value in metrics.items()]


def _config_rows(config: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in config.items():
        if isinstance(value, dict):
            rows += _config_rows(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", json.dumps(value)))
    return rows


def _subtitle(report: dict[str, Any]) -> str:
    config = report["config"]
    data, model = config.get("data", {}), config.get("model", {})
    parts = [f"preset {config.get('preset', '?')}", f"task {config.get('task', '?')}",
             f"data {data.get('name', '?')} {data.get('resolution', '?')}px",
             f"K={model.get('num_slots', '?')} slots, {model.get('grouping', '?')}"]
    return " · ".join(parts)


# ------------------------------------------------------------------------------------------------ HTML
def _img(path: Path, caption: str = "") -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(caption or path.name)
    figcaption = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{figcaption}</figure>'


def _html_table(rows: list[tuple[str, ...]], header: tuple[str, ...], table_id: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = [f"<td>{html.escape(row[0])}</td>"]
        cells += [f'<td class="num">{html.escape(row[1])}</td>'] if len(row) > 1 else []
        cells += [f'<td class="note">{html.escape(c)}</td>' for c in row[2:]]
        body.append("<tr>" + "".join(cells) + "</tr>")
    attr = f' id="{table_id}"' if table_id else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _render_html(report: dict[str, Any], run_dir: Path) -> str:
    parts = [f"<h1>slotlab report: {html.escape(report['name'])}</h1>",
             f'<p class="sub">{html.escape(_subtitle(report))} · generated '
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>"]
    metrics = report["metrics"]
    headline = [(name, metrics.get(name, report["compose"].get(name))) for name in HEADLINE]
    headline = [(name, value) for name, value in headline if isinstance(value, (int, float))]
    if headline:
        parts.append('<div class="headline">' + "".join(
            f"<div><b>{html.escape(_format(value))}</b><span>{html.escape(DISPLAY_NAMES.get(name, name))}</span></div>"
            for name, value in headline) + "</div>")
    parts.append(f"<h2>Metrics <small>{html.escape(_eval_source(report))}</small></h2>")
    if metrics:
        parts.append(_html_table(_metric_rows(metrics), ("metric", "value", "meaning"), "metrics"))
    else:
        parts.append(f"<p>No evaluation yet: run <code>slotlab eval {html.escape(str(run_dir))}</code>.</p>")
    if report["training"] or report["curves"]:
        parts.append("<h2>Training</h2>")
        if report["training"]:
            rows = [(k, _format(v)) for k, v in report["training"].items()]
            parts.append(_html_table(rows, ("", "value"), "training"))
        parts += [_img(p, "Loss, learning rate and validation ARI / FG-ARI") for p in report["curves"]]
    if report["galleries"]:
        parts.append("<h2>Masks and slots</h2>")
        parts += [_img(path, caption) for path, caption in report["galleries"]]
    if report["compose"] or report["compose_images"]:
        parts.append("<h2>Composition</h2>")
        if report["compose"]:
            parts.append(_html_table(_metric_rows(report["compose"]), ("metric", "value", "meaning"), "compose"))
        parts += [_img(p, "Scenes composed from K-means clusters of slots") for p in report["compose_images"]]
    if report["mix"]:
        parts.append("<h2>Slot mixing</h2>")
        parts += [_img(p, p.stem) for p in report["mix"]]
    if report["edit"]:
        parts.append("<h2>Editing discrete codes</h2>")
        parts += [_img(p, p.stem) for p in report["edit"]]
    if report["disentanglement"]:
        parts.append("<h2>Disentanglement</h2>")
        parts += [_img(p, p.stem) for p in report["disentanglement"]]
    parts.append("<h2>Config</h2><details><summary>every field of config.json</summary>")
    parts.append(_html_table(_config_rows(report["config"]), ("field", "value"), "config") + "</details>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>slotlab report: {html.escape(report['name'])}</title><style>{_STYLE}</style></head>\n"
            f"<body>\n{chr(10).join(parts)}\n<script>{_IMAGE_CHECK}</script>\n</body></html>\n")


# ------------------------------------------------------------------------------------------------ Markdown
def _md_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _render_markdown(report: dict[str, Any], run_dir: Path) -> str:
    def link(path: Path, caption: str) -> str:
        return f"![{caption}]({path.relative_to(run_dir).as_posix()})\n\n*{caption}*"

    parts = [f"# slotlab report: {report['name']}", _subtitle(report)]
    if report["metrics"]:
        parts += [f"## Metrics ({_eval_source(report)})",
                  _md_table(_metric_rows(report["metrics"]), ("metric", "value", "meaning"))]
    if report["training"]:
        parts += ["## Training", _md_table([(k, _format(v)) for k, v in report["training"].items()], ("", "value"))]
    parts += [link(p, "Loss, learning rate and validation ARI / FG-ARI") for p in report["curves"]]
    if report["galleries"]:
        parts += ["## Masks and slots"] + [link(path, caption) for path, caption in report["galleries"]]
    if report["compose"] or report["compose_images"]:
        parts.append("## Composition")
        if report["compose"]:
            parts.append(_md_table(_metric_rows(report["compose"]), ("metric", "value", "meaning")))
        parts += [link(p, "Scenes composed from K-means clusters of slots") for p in report["compose_images"]]
    for title, key in (("Slot mixing", "mix"), ("Editing discrete codes", "edit"), ("Disentanglement",
                                                                                     "disentanglement")):
        if report[key]:
            parts += [f"## {title}"] + [link(p, p.stem) for p in report[key]]
    parts += ["## Config", _md_table(_config_rows(report["config"]), ("field", "value"))]
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ Chromium
def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run_chromium(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    browser = find_chromium()
    if browser is None:
        raise UserError("headless Chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="slotlab-chromium-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--hide-scrollbars", f"--user-data-dir={profile}", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def dump_dom(html_path: Path, screenshot_path: Path | None = None, width: int = 1100, height: int = 1400) -> str:
    """The page's DOM after load (scripts run) as headless Chromium serialises it; optionally also a screenshot.

    Args:
        html_path: the page.
        screenshot_path: if given, a PNG of the top ``width`` x ``height`` pixels of the page is written here.
        width: window width in pixels.
        height: window height in pixels.
    """
    args = ["--virtual-time-budget=5000", f"--window-size={width},{height}", "--dump-dom"]
    if screenshot_path is not None:
        screenshot_path = Path(screenshot_path).resolve()
        screenshot_path.parent.mkdir(parents=True, exist_ok=True)
        args.append(f"--screenshot={screenshot_path}")
    result = _run_chromium([*args, Path(html_path).resolve().as_uri()])
    if result.returncode != 0 or "<html" not in result.stdout:
        raise UserError(f"chromium could not render {html_path}: {result.stderr.strip()[-300:]}")
    if screenshot_path is not None and not screenshot_path.exists():
        raise UserError(f"chromium took no screenshot of {html_path}: {result.stderr.strip()[-300:]}")
    return result.stdout


def main(argv: list[str] | None = None) -> None:
    """``python -m slotlab.report.html RUN_DIR [--screenshot PNG]``: write the report, optionally photograph it."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--screenshot", default="", help="also save a PNG of the top of the page here")
    parser.add_argument("--height", type=int, default=1400)
    args = parser.parse_args(argv)
    path = write_report(Path(args.run_dir))
    print(path)
    if args.screenshot:
        dump_dom(Path(path), Path(args.screenshot), height=args.height)
        print(args.screenshot)


if __name__ == "__main__":
    main()
