"""Object discovery on the field's standard benchmarks, on this machine, with the presets users run.

For each preset (``tetrominoes-cpu``, ``multi-dsprites-cpu``, ``clevr6-cpu``, ``sprites-cpu``) and seed, it runs
exactly what a user types::

    slotlab train --preset P --set train.seed=S --out RUNS/P-sS      # resumed when the folder holds an unfinished run
    slotlab eval RUNS/P-sS                                            # the full val split, best checkpoint
    slotlab eval RUNS/P-sS --iters T                                  # with --test-iters T only
    slotlab eval RUNS/P-sS --draws N                                  # with --draws N: N draws of the initial slots
    slotlab eval RUNS/P-sS --restarts R                               # a run made before the preset's R restarts
    slotlab eval RUNS/P-sS --restarts 1                               # with R > 1: the one-draw FG-ARI beside it

and writes one table (dataset, budget, steps, images/s, FG-ARI, ARI, mIoU, mBO, MSE per seed, and the mean; FG-ARI of
Slot Attention's own masks beside that of the decoder's; with ``--test-iters T`` both FG-ARIs again with T grouping
iterations at test time) as Markdown and JSON, and one figure, val FG-ARI against training minutes for every
benchmark next to the Slot Attention paper's FG-ARI (after 500k steps on a GPU). A run that already finished is only
evaluated again, so the script can be stopped and started again (resume is exact).

Usage::

    .venv/bin/python benchmarks/discovery.py                                  # every preset, seeds 0 1 2
    .venv/bin/python benchmarks/discovery.py --presets tetrominoes-cpu --seeds 0
    .venv/bin/python benchmarks/discovery.py --presets tetrominoes-cpu sprites-cpu:0 clevr6-cpu:0   # seeds per preset
    .venv/bin/python benchmarks/discovery.py --budget-scale 0.1 --out /tmp/d  # a quick rehearsal (10% budgets)
    .venv/bin/python benchmarks/discovery.py --presets tetrominoes-cpu --test-iters 15
    .venv/bin/python benchmarks/discovery.py --presets tetrominoes-cpu --keep-others  # other presets' rows stay
    .venv/bin/python benchmarks/discovery.py --presets clevr6-cpu:2 --draws 5         # score 5 slot draws, mean +- sd
    .venv/bin/python benchmarks/discovery.py --presets clevr6-cpu:0 --score-only --keep-others  # evaluate, no training

With ``--keep-others`` the rows of the runs (preset and seed) not made this time are kept from the existing
``discovery.json``, each with the date and machine it was measured on (the table's "measured" column), so one
benchmark, or one more seed of it, can be measured without re-running the others. A kept row may come from another
day, machine or command line than the header's (the column says when and where): the preset's mean is over all of its
rows.

A preset with ``model.test_restarts`` R > 1 (``clevr6-cpu``: 8) scores each image with the best of R draws of its
initial slots, chosen without labels; its rows also give the FG-ARI of one draw ("FG-ARI, 1 restart"). A run made
before the preset had R is evaluated with ``--restarts R`` (R is a test-time key: :data:`TEST_TIME_MODEL_KEYS`).

Slot Attention draws its initial slots anew for every image, so a score is one draw of that noise. With ``--draws N``
every evaluation scores N draws (noise seeds 0 to N-1): the FG-ARI cells give their mean and standard deviation
(``0.847 ± 0.004``), the other cells the mean.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from slotlab.config import apply_overrides, config_from_dict, config_to_dict, get_preset  # noqa: E402
from slotlab.errors import UserError  # noqa: E402
from slotlab.runs import choose_checkpoint, eval_dir, read_metrics  # noqa: E402

PRESETS = ("tetrominoes-cpu", "multi-dsprites-cpu", "clevr6-cpu", "sprites-cpu")
# FG-ARI (%) of Slot Attention in Locatello et al. (2020), Table 1: mean over 5 seeds, 500k steps on a GPU.
PAPER_FG_ARI = {"tetrominoes": 99.5, "multi_dsprites": 91.3, "clevr6": 98.8}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}"


def measured() -> str:
    """When and where a row was measured: the date and the CPU (or GPU) model."""
    return f"{datetime.date.today().isoformat()}, {machine().split(',')[0]}"


def kept_rows(path: Path, runs: set[tuple[str, int]]) -> list[dict]:
    """The rows of ``path`` (an earlier discovery.json) of every (preset, seed) pair other than those in ``runs``."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [{"measured": data.get("machine", "?"), **row} for row in data["rows"]
            if (row["preset"], row["seed"]) not in runs]


def slotlab(*args: str) -> None:
    command = [sys.executable, "-m", "slotlab", *args]
    print("$ slotlab", " ".join(args), flush=True)
    subprocess.run(command, check=True)


# Where a run's data may differ from the preset's without making it another experiment.
DATA_LOCATION_KEYS = ("root", "cache", "skip_bad")
# The training keys that make another experiment: the budget, the schedule, the batch, the seed, the precision (not
# logging, validation, checkpointing, device, threads or compilation).
TRAIN_KEYS = ("steps", "time_budget", "batch_size", "lr", "schedule", "warmup_steps", "decay_rate", "decay_steps",
              "min_lr", "decoder_lr_scale", "grad_clip", "seed", "precision")


# Model keys that change only what the model does outside training: a run made with another value is evaluated with the
# preset's (slotlab eval --restarts, --posterior). Its in-training validation ran with its own.
TEST_TIME_MODEL_KEYS = ("test_restarts", "mask_posterior")


def stale_keys(run_dir: Path, preset: str, sets: list[str]) -> list[str]:
    """The model, data and training keys (:data:`TRAIN_KEYS`) where the run in ``run_dir`` differs from what
    ``preset`` with ``sets`` gives now (a run made before the preset changed, or a rehearsal's at a tenth of the
    budget, would otherwise be resumed, or reused, as if it were the preset's). Keys the run's config predates count
    at their defaults, as slotlab reads them."""
    wanted = config_to_dict(apply_overrides(get_preset(preset), sets))
    try:
        found = config_to_dict(config_from_dict(json.loads((run_dir / "config.json").read_text())))
    except UserError as exc:  # a config that this slotlab refuses is not the preset's either
        return [str(exc)]
    compared = {"model": {k: v for k, v in wanted["model"].items() if k not in TEST_TIME_MODEL_KEYS},
                "data": {k: v for k, v in wanted["data"].items() if k not in DATA_LOCATION_KEYS},
                "train": {k: wanted["train"][k] for k in TRAIN_KEYS}}
    return [f"{section}.{key}={found[section][key]!r} (now {value!r})"
            for section, keys in compared.items() for key, value in keys.items() if found[section][key] != value]


def run_one(preset: str, seed: int, runs: Path, overrides: list[str], test_iters: int = 0, draws: int = 1,
            score_only: bool = False) -> dict:
    """Train (or resume, or reuse) and evaluate one run; returns its row. With ``score_only`` the run is only
    evaluated, as it is, and the row names the keys where it differs from the preset (``made_with``)."""
    run_dir = runs / f"{preset}-s{seed}"
    sets = [f"train.seed={seed}", *overrides]
    made_with = []
    if score_only:
        if not (run_dir / "checkpoints" / "last.pt").exists():
            print(f"error: --score-only: {run_dir} holds no run", file=sys.stderr)
            raise SystemExit(2)
        made_with = stale_keys(run_dir, preset, sets)
    elif (run_dir / "checkpoints" / "last.pt").exists():
        stale = stale_keys(run_dir, preset, sets)
        if stale:
            print(f"error: {run_dir} was made with another {preset}: {', '.join(stale)}; move it away to train the "
                  "preset as it is now", file=sys.stderr)
            raise SystemExit(2)
        slotlab("train", "--resume", str(run_dir))  # finishes an interrupted run; a finished one stops at once
    else:
        args = ["train", "--preset", preset, "--out", str(run_dir)]
        for item in sets:
            args += ["--set", item]
        slotlab(*args)
    # the run's own config, read as JSON: a run written by a newer slotlab than this process still reads
    config = json.loads((run_dir / "config.json").read_text())
    checkpoint = choose_checkpoint(run_dir, "best")
    wanted = apply_overrides(get_preset(preset), sets).model
    restarts, own_restarts = wanted.test_restarts, config["model"].get("test_restarts", 1)
    # the preset's masks where the run hands out others (a run made before model.mask_posterior)
    posterior = None if wanted.mask_posterior == config["model"].get("mask_posterior", False) else wanted.mask_posterior

    def evaluation(iters: int = 0, with_restarts: int = restarts) -> dict:
        """``slotlab eval`` of the run's val split with ``iters`` and ``with_restarts``; its metrics."""
        asked = 0 if with_restarts == own_restarts else with_restarts  # the run's own: the plain evaluation
        slotlab("eval", str(run_dir), *(["--iters", str(iters)] if iters else []),
                *(["--restarts", str(asked)] if asked else []), *(["--draws", str(draws)] if draws > 1 else []),
                *(["--posterior", "on" if posterior else "off"] if posterior is not None else []))
        folder = eval_dir(run_dir, "val", checkpoint, iters=iters, restarts=asked, draws=draws, posterior=posterior)
        return json.loads((folder / "metrics.json").read_text())

    metrics = evaluation()
    more = {}
    if test_iters == metrics.get("iters"):  # the run's own test-time T: the plain evaluation is that one
        more = metrics
    elif test_iters:
        more = evaluation(iters=test_iters)
    one_draw = evaluation(with_restarts=1) if restarts > 1 else {}
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val" and "fg_ari" in r]
    speeds = [r["images_per_s"] for r in train[1:] or train if "images_per_s" in r]  # the first: start-up
    return {
        "preset": preset, "seed": seed, "run_dir": str(run_dir), "measured": measured(),
        "dataset": get_preset(preset).data.name,
        "budget_minutes": config["train"]["time_budget"],
        "trained_iters": config["model"].get("iters"),
        "steps": train[-1]["step"] if train else 0,
        "train_minutes": train[-1].get("train_minutes", float("nan")) if train else 0.0,
        "images_per_s": sum(speeds) / len(speeds) if speeds else float("nan"),
        **{name: metrics.get(name) for name in ("fg_ari", "ari", "miou", "mbo", "mse", "attn_fg_ari", "iters")},
        "test_iters": test_iters or None, "test_iters_fg_ari": more.get("fg_ari"),
        "test_iters_attn_fg_ari": more.get("attn_fg_ari"),
        "draws": draws, "fg_ari_std": metrics.get("std", {}).get("fg_ari"),
        "test_iters_fg_ari_std": more.get("std", {}).get("fg_ari"),
        "restarts": metrics.get("restarts"), "one_restart_fg_ari": one_draw.get("fg_ari"),
        "one_restart_fg_ari_std": one_draw.get("std", {}).get("fg_ari"),
        "num_val_images": metrics.get("num_images"), "made_with": made_with,
        "recon_masks": config["model"].get("recon_masks", "decoder"), "decoder_fg_ari": metrics.get("decoder_fg_ari"),
        "mask_posterior": metrics.get("mask_posterior", False),
        "curve": [(r.get("train_minutes", float("nan")), r["fg_ari"]) for r in val],
    }


def presets_in_order(rows: list[dict]) -> list[str]:
    """The presets of ``rows``, the standard ones in :data:`PRESETS` order, then any other in order of appearance."""
    found = list(dict.fromkeys(r["preset"] for r in rows))
    return sorted(found, key=lambda p: (PRESETS.index(p) if p in PRESETS else len(PRESETS), found.index(p)))


def _score(value: float | None, digits: int = 3, std: float | None = None) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def markdown(rows: list[dict], header: str) -> str:
    """The table: one line per run and a mean per preset. FG-ARI is of the decoder's masks (the Slot Attention
    paper's measure) with the run's own test-time T (the trained one unless ``model.test_iters`` is set: the preset
    cell then says so); "attn" is of Slot Attention's masks; "T=n" of either with n iterations. Where a preset's runs
    were scored at different Ts, only the "T=n" columns have a mean."""
    test_iters = sorted({r["test_iters"] for r in rows if r.get("test_iters")})
    restarted = any(r.get("one_restart_fg_ari") is not None for r in rows)  # rows scored with R > 1 restarts
    own_masks = any(r.get("decoder_fg_ari") is not None for r in rows)  # images composed with the attention masks
    extra = ([" FG-ARI, 1 restart |"] * restarted + [" FG-ARI, decoder's own masks |"] * own_masks
             + [f" FG-ARI, T={t} | attn, T={t} |" for t in test_iters])
    when = len({r.get("measured") for r in rows}) > 1  # rows kept from earlier runs: say when each was measured
    lines = [header, "", "| preset | seed | budget (min) | steps | images/s | FG-ARI | FG-ARI, attn masks |"
             + "".join(extra) + " ARI | mIoU | mBO | MSE | paper FG-ARI |" + (" measured |" if when else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * (restarted + own_masks)
             + " ---: | ---: |" * len(test_iters) + " ---: | ---: | ---: | ---: | ---: |" + (" --- |" if when else "")]
    names = ("fg_ari", "attn_fg_ari", *["one_restart_fg_ari"] * restarted, *["decoder_fg_ari"] * own_masks,
             *[f"{kind}T{t}" for t in test_iters for kind in ("", "attn ")], "ari", "miou", "mbo", "mse")

    def values(r: dict) -> dict:
        found = {name: r.get(name) for name in names}
        for t in test_iters:
            scored_at_t = r.get("test_iters") == t
            found[f"T{t}"] = r.get("test_iters_fg_ari") if scored_at_t else None
            found[f"attn T{t}"] = r.get("test_iters_attn_fg_ari") if scored_at_t else None
        return found

    for preset in presets_in_order(rows):
        group = sorted((r for r in rows if r["preset"] == preset), key=lambda r: r["seed"])
        paper = PAPER_FG_ARI.get(group[0]["dataset"])
        scores = [values(r) for r in group]
        # else the plain columns mix two test-time conditions
        one_t = len({(r.get("iters"), r.get("restarts") or 1, bool(r.get("mask_posterior"))) for r in group}) == 1
        for r, found in zip(group, scores):
            spread = {"fg_ari": r.get("fg_ari_std"), f"T{r.get('test_iters')}": r.get("test_iters_fg_ari_std"),
                      "one_restart_fg_ari": r.get("one_restart_fg_ari_std")}
            cells = " | ".join(_score(v, 4 if name == "mse" else 3, spread.get(name)) for name, v in found.items())
            scored, trained = r.get("iters"), r.get("trained_iters")  # None in rows of older tables
            at_test = [f"T={scored}"] * (None not in (scored, trained) and scored != trained)
            restarts = r.get("restarts") or 1  # None in rows of older tables: one draw
            at_test += [f"{restarts} restarts"] * (restarts > 1)
            name = f"`{preset}`" + (f" ({', '.join(at_test)} at test)" if at_test else "")
            how = (["attention masks compose the image"] * (r.get("recon_masks") == "attention")
                   + ["masks: each pixel's posterior"] * bool(r.get("mask_posterior")))
            name += f" ({'; '.join(how)})" if how else ""
            lines.append(f"| {name} | {r['seed']} | {r['budget_minutes']:g} | {r['steps']} | "
                         f"{r['images_per_s']:.0f} | {cells} | {'' if paper is None else f'{paper / 100:.3f}'} |"
                         + (f" {r.get('measured', '')} |" if when else ""))
        if len(group) > 1:
            cells = []
            for name in names:
                known = [found[name] for found in scores if found[name] is not None]
                one_draw_at_one_t = name == "one_restart_fg_ari" and len({r.get("iters") for r in group}) == 1
                comparable = one_t or name.startswith(("T", "attn T")) or one_draw_at_one_t  # one condition per row
                mean = sum(known) / len(known) if len(known) == len(group) and comparable else None
                cell = _score(mean, 4 if name == "mse" else 3)
                cells.append(f"**{cell}**" if name == "fg_ari" and cell else cell)
            lines.append(f"| `{preset}` | mean | | | | {' | '.join(cells)} | |" + (" |" if when else ""))
    for r in rows:
        if r.get("made_with"):
            lines += ["", f"`{r['preset']}` seed {r['seed']} was made with another config than the preset's now, and "
                      f"only scored (`--score-only`): {', '.join(r['made_with'])}."]
    draw_counts = sorted({r.get("draws") or 1 for r in rows} - {1})
    if draw_counts:
        lines += ["", "A ± is the standard deviation over the draws of the initial slots a row was scored with "
                  f"({' or '.join(map(str, draw_counts))}; rows without one: one draw, noise seed 0); the score is "
                  "their mean."]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], path: Path) -> None:
    presets = presets_in_order(rows)
    fig, axes = plt.subplots(1, len(presets), figsize=(4.2 * len(presets), 3.4), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        group = [r for r in rows if r["preset"] == preset]
        for r in group:
            if r["curve"]:
                minutes, scores = zip(*r["curve"])
                ax.plot(minutes, scores, "o-", ms=3, label=f"seed {r['seed']}")
        paper = PAPER_FG_ARI.get(group[0]["dataset"])
        if paper is not None:
            ax.axhline(paper / 100, ls="--", color="grey", label="paper (500k GPU steps)")
        ax.set_ylim(0, 1)
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.set_ylabel("val FG-ARI")
        ax.set_title(preset)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help="PRESET or PRESET:SEED,SEED")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/discovery", help="where the run directories go")
    parser.add_argument("--out", default="docs/discovery", help="where the table and the figure go")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every time budget (rehearsals)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for all")
    parser.add_argument("--test-iters", type=int, default=0, metavar="T",
                        help="also score every run with T grouping iterations at test time (0 = no)")
    parser.add_argument("--draws", type=int, default=1, metavar="N",
                        help="score N draws of the initial slots (noise seeds 0..N-1): mean and standard deviation")
    parser.add_argument("--score-only", action="store_true",
                        help="only evaluate the runs as they are (no training); rows of runs made with another config "
                             "than the preset's now name the keys that differ")
    parser.add_argument("--keep-others", action="store_true",
                        help="keep the rows of runs (preset, seed) not made now from the existing discovery.json")
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error(f"--draws must be 1 or more, got {args.draws}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"Measured {datetime.date.today().isoformat()} on {machine()}; command: "
              f"`python benchmarks/discovery.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    plan = []  # (preset, seed) in the order given: PRESET, or PRESET:SEED,SEED to give that preset its own seeds
    for item in args.presets:
        preset, _, seed_list = item.partition(":")
        plan += [(preset, seed) for seed in ([int(s) for s in seed_list.split(",")] if seed_list else args.seeds)]
    rows = kept_rows(out / "discovery.json", set(plan)) if args.keep_others else []
    if rows:
        header += "; the rows of other runs are kept from earlier ones (`--keep-others`: see the measured column)"
    for preset, seed in plan:
        overrides = list(args.set)
        if args.budget_scale != 1.0:
            overrides.append(f"train.time_budget={get_preset(preset).train.time_budget * args.budget_scale:g}")
        rows.append(run_one(preset, seed, Path(args.runs), overrides, args.test_iters, args.draws, args.score_only))
        # written after every run, so that a stopped queue leaves the table of what finished
        (out / "discovery.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
        (out / "discovery.md").write_text(markdown(rows, header))
        figure(rows, out / "discovery.png")
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
