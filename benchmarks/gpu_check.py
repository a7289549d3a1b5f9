"""One prepared GPU check: every open GPU figure of slotlab from one command, in under nine minutes (issue 20).

On the device machine (one NVIDIA GPU, a fresh checkout with its ``.venv``; nothing is installed or downloaded), from
the repository root::

    .venv/bin/python benchmarks/gpu_check.py --out $OUT

It prints the device, driver, torch, CUDA and cuDNN versions, then runs four steps in order. Each step runs in its own
subprocesses under its own time cap, so one slow step cannot eat the others: a step that runs past its cap gets
SIGTERM (a training run saves its ``last`` checkpoint), then SIGKILL, and is marked ``timeout``, keeping whatever it
printed or wrote.

1. ``train_step`` (cap 150 s): ``benchmarks/train_step.py`` at 128x128 K=11 (``paper``, the ``clevrtex`` recipe,
   batch 64) and at the demo preset's shapes (``demo``), one process each: slotlab's step (bf16, compile,
   channels-last) against the plain fp32 step in the same process: images/s, ratio, TFLOP/s, share of the bf16
   peak. Targets at 128x128 K=11: ratio >= 3x and >= 35% of the bf16 peak.
2. ``clevrtex_train`` (cap 200 s): ``slotlab data render`` of CLEVRTex-like ``tex`` scenes on all CPU cores, the
   uint8 cache, a short ``slotlab train --preset clevrtex`` under ``train.time_budget`` (sized to what the cap leaves;
   warm-up shortened to 500 steps so the loss moves), then ``slotlab eval``: images/s, loss curve, FG-ARI, mBO.
3. ``diffusion_sampling`` (cap 90 s): ``benchmarks/sampling.py``: SlotDiffusion DDIM-50 and DDPM-1000 images/s at
   128x128 (``slotdiffusion-clevrtex``, batch 16, every step run on the GPU).
4. ``ddp_train`` (cap 90 s): the same short training launched by torchrun (``torch.distributed.run --standalone
   --nproc_per_node=1 -m slotlab train``, the command ``slotlab train --devices G`` builds). With one process
   ``WORLD_SIZE`` is 1 and slotlab trains without a process group, so on a one-GPU machine this checks torchrun's
   launch and environment on the GPU, not NCCL gradient averaging (that needs two GPUs).

Writes (both files rewritten after every step, so a killed check still leaves its results):

* ``OUT/gpu_check.json``: environment, and per step: status (ok, timeout, failed, skipped), wall and cap seconds,
  reason, notes and every number parsed;
* ``OUT/gpu_check.md``: one Markdown table of the same;
* ``OUT/logs/<step>-<part>.log``: the full output of every command;
* ``OUT/runs/clevrtex`` and ``OUT/runs/ddp``: each run's ``config.json``, ``metrics.jsonl``, ``curves.png`` and
  ``eval/`` (without checkpoints). Rendered scenes, their uint8 caches (``SLOTLAB_CACHE_DIR``, unless set) and the
  run directories with checkpoints stay in ``--work`` (default: ``$TMPDIR/slotlab-gpu-check``; a second check on the
  same machine reuses the scenes), so that ``OUT`` stays small.

Options: ``--budget SECONDS`` (total, default 540: steps that no longer fit are ``skipped`` with reason ``budget``,
and each step's cap is at most the budget left), ``--cap STEP=SECONDS`` (repeatable), ``--steps a,b`` (a subset),
``--dry-run`` (the same steps at toy sizes on the CPU, about half a minute: a rehearsal so the script cannot rot
between GPUs). Exit status: 0 when every selected step is ok, 1 when one failed, timed out or did not fit the budget,
2 without a GPU (unless ``--dry-run``) or for bad arguments.

    .venv/bin/python benchmarks/gpu_check.py --dry-run --out out/gpu-dry          # rehearse anywhere
    .venv/bin/python benchmarks/gpu_check.py --out $OUT --steps train_step --cap train_step=240
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
STEPS = ("train_step", "clevrtex_train", "diffusion_sampling", "ddp_train")
DEFAULT_CAPS = {"train_step": 150.0, "clevrtex_train": 200.0, "diffusion_sampling": 90.0, "ddp_train": 90.0}
DEFAULT_BUDGET = 540.0
TARGET_RATIO = 3.0  # slotlab / plain fp32 images/s at 128x128 K=11
TARGET_PEAK_PERCENT = 35.0  # model TFLOP/s as a share of the GPU's dense bf16 peak
MIN_STEP_SECONDS = 1.0  # a step is started only with at least this much of the budget left

PROBE = r"""
import json, os, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
if info["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count(),
                cudnn=torch.backends.cudnn.version())
print(json.dumps(info))
"""


class StepTimeout(Exception):
    """A command of the step ran past the step's cap (or its part's share of it)."""


class StepFailed(Exception):
    """A command of the step exited with an error; the message is the reason."""


class Interrupted(Exception):
    """gpu_check itself got SIGTERM."""


@dataclass
class Step:
    """One step's record, as written to gpu_check.json."""

    name: str
    status: str = "pending"  # pending, running, ok, timeout, failed, skipped
    seconds: float = 0.0
    cap_s: float | None = None
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------------
# Running commands under a deadline


def signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # nothing left in the group
        pass


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the command's process group (it was started in a session of its own), SIGKILL after ``grace``."""
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    signal_group(proc.pid, signal.SIGKILL)  # the leader if it is still there, and what it left behind (pool workers)
    proc.wait()


def run_command(cmd: list[str], log_path: Path, timeout: float, env: dict[str, str],
                grace: float) -> tuple[int | None, str]:
    """Run ``cmd`` with its output in ``log_path``; ``(exit code or None on timeout, output)``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            stop_group(proc, grace)
            code = None
        except BaseException:
            stop_group(proc, grace)
            raise
    return code, log_path.read_text(errors="replace")


def failure_reason(output: str, code: int) -> str:
    """One line saying why a command failed: its last ``error:`` line, else the last line of its output."""
    lines = [line.split("\r")[-1].strip() for line in output.splitlines()]
    lines = [line for line in lines if line and not line.startswith("$ ")]
    errors = [line for line in lines if line.startswith("error:") or re.match(r"^\w*(Error|Exception)\b", line)]
    last = (errors or lines or [""])[-1]
    return f"exit code {code}: {last[:240]}" if last else f"exit code {code}"


# ------------------------------------------------------------------------------------------------------------------
# The check: options, budget, files


class Check:
    """Options, clock and results of one gpu_check run."""

    def __init__(self, args: argparse.Namespace, environment: dict, started: float):
        self.args = args
        self.dry = args.dry_run
        self.out = Path(args.out)
        self.work = Path(args.work)
        self.device = "cpu" if self.dry else "cuda"
        self.environment = environment
        self.started = started
        self.started_at = datetime.datetime.now(datetime.timezone.utc)
        self.deadline = started + args.budget
        self.grace = 3.0 if self.dry else 10.0  # SIGTERM -> SIGKILL; part of every cap
        self.caps = {**DEFAULT_CAPS, **args.caps}
        self.steps = {name: Step(name) for name in STEPS}
        self.scenes: Path | None = None
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env.setdefault("SLOTLAB_CACHE_DIR", str(self.work / "cache"))  # dataset caches stay in --work too
        if self.dry:
            self.env.setdefault("OMP_NUM_THREADS", "1")  # toy sizes on a shared CPU: one thread per process

    # -------------------------------------------------------------------------------------------------- commands
    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def slotlab(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "slotlab", *args]

    def run(self, step: Step, part: str, cmd: list[str], deadline: float) -> str:
        """Run one command of ``step`` until ``deadline``; its output. Raises StepTimeout or StepFailed."""
        log = self.out / "logs" / f"{step.name}-{part}.log"
        step.logs.append(str(log.relative_to(self.out)))
        start = time.monotonic()
        code, output = run_command(cmd, log, deadline - start, self.env, self.grace)
        step.numbers.setdefault("part_seconds", {})[part] = round(time.monotonic() - start, 1)
        if code is None:
            raise StepTimeout(f"{part} ran past its cap ({deadline - start:.0f} s); see {log.relative_to(self.out)}")
        if code != 0:
            raise StepFailed(f"{part}: {failure_reason(output, code)}")
        return output

    # -------------------------------------------------------------------------------------------------- files
    def record(self) -> dict:
        env = self.environment
        return {
            "check": "slotlab GPU check (benchmarks/gpu_check.py, issue 20)",
            "started": self.started_at.isoformat(timespec="seconds"),
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dry_run": self.dry,
            "budget_s": self.args.budget,
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "argv": sys.argv[1:],
            "environment": env,
            "targets": {"ratio_vs_plain_fp32": TARGET_RATIO, "bf16_peak_percent": TARGET_PEAK_PERCENT,
                        "at": "128x128, K=11 (train_step paper)"},
            "steps": [asdict(step) for step in self.steps.values()],
        }

    def write(self) -> None:
        """(Re)write gpu_check.json and gpu_check.md, each by an atomic rename."""
        self.out.mkdir(parents=True, exist_ok=True)
        record = self.record()
        write_atomic(self.out / "gpu_check.json", json.dumps(record, indent=2) + "\n")
        write_atomic(self.out / "gpu_check.md", render_markdown(record))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------------------------
# Parsing the benchmarks' tables


def number(text: str) -> float | None:
    """``"12.3"``, ``"4.1x"``, ``"22.7%"`` -> float; ``"-"`` -> None."""
    match = re.match(r"^\s*(-?\d+(?:\.\d+)?(?:e-?\d+)?)", text)
    return float(match.group(1)) if match else None


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``text`` (separator rows left out)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and not re.match(r"^\|[\s\-:|]+$", line):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


TRAIN_STEP_SHAPE = re.compile(r"^(\w+) \(([\w-]+)\): (\d+)x\d+, K=(\d+), batch (\d+), (\d+) steps x (\d+) rounds, "
                              r"compile=(\w+) \(warm-up (\d+) s\)", re.M)


def parse_train_step(output: str) -> dict:
    """The numbers of one ``benchmarks/train_step.py --configs X`` run."""
    numbers: dict = {}
    peak = re.search(r"bf16 peak: ([\d.]+) TFLOP/s", output)
    numbers["bf16_peak_tflops"] = float(peak.group(1)) if peak else None
    shape = TRAIN_STEP_SHAPE.search(output)
    if shape:
        numbers.update(preset=shape.group(2), resolution=int(shape.group(3)), slots=int(shape.group(4)),
                       batch=int(shape.group(5)), steps=int(shape.group(6)), rounds=int(shape.group(7)),
                       compile=shape.group(8) == "True", warmup_s=int(shape.group(9)))
    for cells in table_rows(output):
        if len(cells) == 11 and cells[1] in ("slotlab", "plain"):
            numbers[cells[1]] = {"images_per_s": number(cells[3]), "best_images_per_s": number(cells[4]),
                                 "peak_mib": number(cells[6]), "gflop_per_image": number(cells[7]),
                                 "tflops": number(cells[8]), "bf16_peak_percent": number(cells[9]),
                                 "syncs_per_step": number(cells[10])}
    ours, plain = numbers.get("slotlab"), numbers.get("plain")
    if ours and plain and ours["images_per_s"] and plain["images_per_s"]:
        numbers["ratio"] = round(ours["images_per_s"] / plain["images_per_s"], 3)
    return numbers


def paper_targets(numbers: dict) -> dict:
    """Whether the 128x128 K=11 figures meet the issue's targets (None where not measured)."""
    ratio = numbers.get("ratio")
    share = (numbers.get("slotlab") or {}).get("bf16_peak_percent")
    return {"ratio_ge_3x": None if ratio is None else ratio >= TARGET_RATIO,
            "bf16_peak_ge_35_percent": None if share is None else share >= TARGET_PEAK_PERCENT}


def parse_sampling(output: str) -> dict:
    """The numbers of one ``benchmarks/sampling.py`` run."""
    numbers: dict = {}
    preset = re.search(r"^preset ([\w-]+): image (\d+)x\d+x\d+, .*batch (\d+)", output, re.M)
    if preset:
        numbers.update(preset=preset.group(1), resolution=int(preset.group(2)), batch=int(preset.group(3)))
    precision = re.search(r"precision (\w+)", output)
    numbers["precision"] = precision.group(1) if precision else None
    memory = re.search(r"peak GPU memory: ([\d.]+) GiB", output)
    numbers["peak_gib"] = float(memory.group(1)) if memory else None
    for cells in table_rows(output):
        if len(cells) >= 6 and cells[0] in ("ddpm", "ddim"):
            numbers[f"{cells[0]}-{cells[1]}"] = {"steps": int(cells[1]), "seconds_per_batch": number(cells[2]),
                                                 "images_per_s": number(cells[3]), "vs_ddpm_1000": number(cells[4]),
                                                 "how": cells[5]}
    return numbers


def training_numbers(run_dir: Path) -> dict:
    """images/s, loss curve and last validation of a run, from its metrics.jsonl."""
    from slotlab.runs import read_metrics

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    speeds = [r["images_per_s"] for r in train if isinstance(r.get("images_per_s"), (int, float))]
    numbers: dict = {"steps": train[-1]["step"] if train else 0,
                     "train_minutes": round(train[-1].get("train_minutes", 0.0), 2) if train else 0.0,
                     "loss_curve": [[r["step"], round(r["loss"], 6)] for r in train if "loss" in r]}
    if speeds:  # the first logging window holds torch.compile and the warm-up
        numbers["images_per_s"] = round(statistics.median(speeds[1:] or speeds), 1)
        numbers["images_per_s_first_window"] = round(speeds[0], 1)
    if val:
        numbers["val"] = {k: v for k, v in val[-1].items() if k in ("step", "loss", "fg_ari", "ari", "mbo")}
    return numbers


def eval_numbers(run_dir: Path) -> dict:
    """The metrics ``slotlab eval`` wrote (``eval/val-best/metrics.json``)."""
    from slotlab.runs import find_eval

    folder = find_eval(run_dir)
    if folder is None:
        return {}
    metrics = json.loads((folder / "metrics.json").read_text())
    keep = ("split", "checkpoint", "num_images", "fg_ari", "ari", "mbo", "miou", "mse", "eval_seconds")
    return {"folder": str(folder.relative_to(run_dir)), **{k: metrics[k] for k in keep if k in metrics}}


def keep_run_files(run_dir: Path, target: Path) -> None:
    """Copy a run's small files (not its checkpoints or TensorBoard logs) into OUT."""
    if not run_dir.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "metrics.jsonl", "curves.png"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, target / name)
    if (run_dir / "eval").is_dir():
        shutil.copytree(run_dir / "eval", target / "eval", dirs_exist_ok=True)


# ------------------------------------------------------------------------------------------------------------------
# The steps


def step_train_step(check: Check, step: Step, deadline: float) -> None:
    """benchmarks/train_step.py, one process per configuration: paper (128x128 K=11) first, then demo."""
    script = str(BENCHMARKS / "train_step.py")
    if check.dry:  # 128x128 is not a toy size on a CPU: a dry run times the demo shapes, one step each
        parts = [("demo", ["--device", "cpu", "--batch", "2", "--steps", "1", "--rounds", "1", "--warmup", "0",
                           "--threads", "1"])]
        step.numbers["paper"] = {"skipped": "dry run: 128x128 K=11 is not a toy size on a CPU"}
        step.notes.append("dry run: demo only, on the CPU (no compile, no bf16 peak)")
    else:
        parts = [("paper", ["--device", "cuda"]), ("demo", ["--device", "cuda"])]
    timeouts = []
    for index, (label, extra) in enumerate(parts):
        # paper leaves demo a third of the time (at most 45 s); demo gets whatever is left
        later = len(parts) - index - 1
        reserve = min(45.0, (deadline - time.monotonic()) / 3) if later else 0.0
        try:
            output = check.run(step, label, check.python(script, "--configs", label, *extra), deadline - reserve)
        except StepTimeout as error:
            timeouts.append(str(error))
            output = (check.out / step.logs[-1]).read_text(errors="replace")
        step.numbers[label] = parse_train_step(output)
        if label == "paper":
            step.numbers["paper"]["targets"] = paper_targets(step.numbers["paper"])
    if timeouts:
        raise StepTimeout("; ".join(timeouts))


def prepare_scenes(check: Check, step: Step, deadline: float) -> Path:
    """Render the tex scenes (all CPU cores) and build their uint8 cache, once per check; the data root."""
    if check.scenes is not None:
        return check.scenes
    root = check.work / "data" / ("clevrtex-dry" if check.dry else "clevrtex")
    scenes, size, workers = (20, "40x54", "1") if check.dry else (check.args.scenes, "240x320", "0")
    check.run(step, "render", check.slotlab("data", "render", "--variant", "tex", "--n", str(scenes),
                                            "--out", str(root), "--size", size, "--workers", workers), deadline)
    step.numbers.update(scenes=scenes, scene_size=size)
    if not check.dry:  # the training's own start would build it too, inside the run's time
        check.run(step, "cache", check.slotlab("data", "cache", "--preset", "clevrtex", "--set", f"data.root={root}",
                                               "--set", "data.variant=tex", "--splits", "train", "val"), deadline)
    check.scenes = root
    return root


def train_args(check: Check, root: Path, minutes: float, run_dir: Path) -> list[str]:
    """``slotlab train`` arguments: the clevrtex recipe on the rendered scenes under a time budget (dry: smoke)."""
    if check.dry:
        preset, extra = "smoke", ["data.name=clevrtex", "data.max_objects=0", "train.steps=3"]
    else:  # warm-up shortened from 10,000 steps so that a few minutes show the loss falling
        preset, extra = "clevrtex", ["train.log_every=50", "train.warmup_steps=500"]
    overrides = [f"data.root={root}", "data.variant=tex", f"train.device={check.device}",
                 f"train.time_budget={minutes:.3f}", *extra]
    args = ["--preset", preset, "--out", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    return args


def budget_minutes(check: Check, deadline: float, reserve: float) -> float:
    """train.time_budget that leaves ``reserve`` seconds (start-up, final validation, plots) before ``deadline``."""
    if check.dry:
        return 0.05
    return max(0.1, (deadline - time.monotonic() - reserve) / 60.0)


def fresh_run_dir(check: Check, name: str) -> Path:
    run_dir = check.work / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # left by an earlier check on this machine
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return run_dir


def step_clevrtex_train(check: Check, step: Step, deadline: float) -> None:
    """Render, cache, a short clevrtex training, eval: images/s, loss curve, FG-ARI, mBO."""
    root = prepare_scenes(check, step, deadline)
    run_dir = fresh_run_dir(check, "clevrtex")
    eval_reserve = 15.0 if check.dry else 45.0
    train_deadline = deadline - eval_reserve
    minutes = budget_minutes(check, train_deadline, reserve=35.0)
    step.numbers["time_budget_minutes"] = round(minutes, 3)
    try:
        check.run(step, "train", check.slotlab("train", *train_args(check, root, minutes, run_dir)), train_deadline)
        check.run(step, "eval", check.slotlab("eval", str(run_dir), "--device", check.device), deadline)
    finally:
        step.numbers.update(training_numbers(run_dir))
        step.numbers["eval"] = eval_numbers(run_dir)
        keep_run_files(run_dir, check.out / "runs" / "clevrtex")


def step_diffusion_sampling(check: Check, step: Step, deadline: float) -> None:
    """benchmarks/sampling.py: DDIM-50 and DDPM-1000 images/s (CPU dry run: the smoke preset, extrapolated)."""
    script = str(BENCHMARKS / "sampling.py")
    if check.dry:
        extra = ["--preset", "slotdiffusion-smoke", "--device", "cpu", "--batch", "1", "--cpu-steps", "1",
                 "--repeats", "1"]
        step.notes.append("dry run: slotdiffusion-smoke at 16x16 on the CPU, sampler times extrapolated")
    else:
        extra = ["--preset", "slotdiffusion-clevrtex", "--device", "cuda"]
    try:
        check.run(step, "sampling", check.python(script, *extra), deadline)
    finally:
        log = check.out / step.logs[-1]
        step.numbers.update(parse_sampling(log.read_text(errors="replace") if log.is_file() else ""))


def step_ddp_train(check: Check, step: Step, deadline: float) -> None:
    """The same short training in one process launched by torchrun (no eval)."""
    from slotlab.train.distributed import torchrun_command

    root = prepare_scenes(check, step, deadline)
    run_dir = fresh_run_dir(check, "ddp")
    minutes = budget_minutes(check, deadline, reserve=40.0)
    step.numbers["time_budget_minutes"] = round(minutes, 3)
    step.notes.append("torchrun with 1 process: WORLD_SIZE=1, so slotlab trains without a process group "
                      "(DDP/NCCL needs >= 2 GPUs)")
    try:
        check.run(step, "train", torchrun_command(1, train_args(check, root, minutes, run_dir)), deadline)
    finally:
        step.numbers.update(training_numbers(run_dir))
        keep_run_files(run_dir, check.out / "runs" / "ddp")


STEP_FUNCTIONS: dict[str, Callable[[Check, Step, float], None]] = {
    "train_step": step_train_step, "clevrtex_train": step_clevrtex_train,
    "diffusion_sampling": step_diffusion_sampling, "ddp_train": step_ddp_train,
}


# ------------------------------------------------------------------------------------------------------------------
# Summaries for the Markdown table


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def summarise_train_step(numbers: dict) -> str:
    parts = []
    for label in ("paper", "demo"):
        n = numbers.get(label) or {}
        ours, plain = n.get("slotlab"), n.get("plain")
        if "skipped" in n or not ours:
            parts.append(f"{label}: {n.get('skipped', 'no numbers')}")
            continue
        text = (f"{label} {n.get('resolution')}px K={n.get('slots')} batch {n.get('batch')}: slotlab "
                f"{fmt(ours['images_per_s'])} img/s vs plain fp32 {fmt((plain or {}).get('images_per_s'))} = "
                f"**{fmt(n.get('ratio'), 2)}x**, {fmt(ours['tflops'], 2)} TFLOP/s")
        share = ours["bf16_peak_percent"]
        text += ", bf16 peak n/a" if share is None else f", **{share:.1f}%** of the bf16 peak"
        targets = n.get("targets")
        if targets:
            met = {True: "met", False: "NOT met", None: "n/a"}
            text += (f" (>= 3x: {met[targets['ratio_ge_3x']]}; >= 35% peak: "
                     f"{met[targets['bf16_peak_ge_35_percent']]})")
        parts.append(text)
    return "; ".join(parts)


def summarise_training(numbers: dict) -> str:
    curve = numbers.get("loss_curve") or []
    if not curve:
        return f"scenes rendered: {numbers['scenes']}" if "scenes" in numbers else ""
    text = f"{numbers.get('steps', 0)} steps, {fmt(numbers.get('images_per_s'))} img/s"
    if curve:
        text += f", loss {curve[0][1]:.4f} (step {curve[0][0]}) -> {curve[-1][1]:.4f} (step {curve[-1][0]})"
    evaluated = numbers.get("eval") or {}
    if "fg_ari" in evaluated:
        text += (f", eval on {evaluated.get('num_images')} val images: FG-ARI {evaluated['fg_ari']:.3f}, "
                 f"mBO {evaluated.get('mbo', float('nan')):.3f}")
    return text


def summarise_sampling(numbers: dict) -> str:
    rows = [(key, n) for key, n in numbers.items() if key.startswith(("ddim-", "ddpm-"))]
    if not rows:
        return ""
    text = ", ".join(f"{key.upper()} {fmt(n['images_per_s'], 3)} img/s ({fmt(n['vs_ddpm_1000'])}x)" for key, n in rows)
    how = "extrapolated" if any(n["how"].startswith("extrapolated") for _, n in rows) else "measured"
    return (f"{text}; {numbers.get('preset')} {numbers.get('resolution')}px, batch {numbers.get('batch')}, "
            f"{numbers.get('precision')}, {how}")


SUMMARIES = {"train_step": summarise_train_step, "clevrtex_train": summarise_training,
             "diffusion_sampling": summarise_sampling, "ddp_train": summarise_training}


def environment_line(env: dict) -> str:
    device = env.get("device") or "no CUDA device"
    details = [f"capability {env['capability']}" if env.get("capability") else "",
               f"{env['memory_gib']} GiB" if env.get("memory_gib") else "",
               f"driver {env['driver']}" if env.get("driver") else ""]
    extra = ", ".join(d for d in details if d)
    return (f"device: {device}{f' ({extra})' if extra else ''}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
            f"cuDNN {env.get('cudnn', '-')}; Python {env.get('python')}, {env.get('cpu_count')} CPU cores")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(record: dict) -> str:
    """gpu_check.md: what ran where, and one table of the steps."""
    mode = "dry run (CPU, toy sizes: not GPU figures)" if record["dry_run"] else "GPU run"
    lines = [
        "# slotlab GPU check",
        "",
        f"{mode}; started {record['started']}, written {record['written']}; "
        f"{record['elapsed_s']:.0f} s of a {record['budget_s']:.0f} s budget",
        "",
        environment_line(record["environment"]),
        "",
        "| step | status | wall s | key numbers | reason / notes |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for step in record["steps"]:
        summary = SUMMARIES[step["name"]](step["numbers"]) if step["numbers"] else ""
        why = "; ".join(part for part in [step["reason"], *step["notes"]] if part)
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']:.1f} | {cell(summary)} | {cell(why)} |")
    lines += ["", "Targets at 128x128 K=11: slotlab step >= 3x the plain fp32 step's images/s and >= 35% of the "
              "bf16 peak. Numbers and logs: gpu_check.json, logs/."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------
# Main


def probe_environment(timeout: float) -> dict:
    """Python, torch, CUDA, cuDNN and the device, from a subprocess (this process never touches the GPU)."""
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)
        info = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {
            "error": failure_reason(done.stdout + done.stderr, done.returncode)}
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as error:
        info = {"error": f"environment probe: {type(error).__name__}: {error}"}
    info.setdefault("cpu_count", os.cpu_count())
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (subprocess.TimeoutExpired, OSError):
            pass
    return info


def run_steps(check: Check, selected: list[str]) -> None:
    """Every step in order, each under min(its cap, the budget left); files rewritten after each."""
    for index, name in enumerate(STEPS):
        step = check.steps[name]
        if name not in selected:
            step.status, step.reason = "skipped", "not selected (--steps)"
            continue
        remaining = check.deadline - time.monotonic()
        left = remaining - check.grace  # the grace of a kill at the cap stays inside the budget
        if left < MIN_STEP_SECONDS:
            step.status = "skipped"
            step.reason = f"budget ({max(remaining, 0.0):.0f} s left of {check.args.budget:g} s)"
            print(f"[{index + 1}/{len(STEPS)}] {name}: skipped, budget used up", flush=True)
            continue
        cap = min(check.caps[name], left)
        step.status, step.cap_s = "running", round(cap, 1)
        check.write()
        print(f"[{index + 1}/{len(STEPS)}] {name} (cap {cap:.0f} s) ...", flush=True)
        start = time.monotonic()
        try:
            STEP_FUNCTIONS[name](check, step, start + cap)
            step.status = "ok"
        except StepTimeout as error:
            step.status, step.reason = "timeout", str(error) + (" (cap cut to the budget)" if cap < check.caps[name]
                                                                  else "")
        except StepFailed as error:
            step.status, step.reason = "failed", str(error)
        except (Interrupted, KeyboardInterrupt):
            step.status, step.reason = "failed", "gpu_check interrupted"
            for later in STEPS[index + 1:]:
                check.steps[later].status, check.steps[later].reason = "skipped", "gpu_check interrupted"
            raise
        except Exception as error:  # a bug in this script must not lose the other steps
            step.status, step.reason = "failed", f"gpu_check: {type(error).__name__}: {error}"
        finally:
            step.seconds = round(time.monotonic() - start, 1)
            check.write()
        report_step(check, step)


def report_step(check: Check, step: Step) -> None:
    """One line per step on stdout; the tail of the log for a step that did not finish."""
    summary = SUMMARIES[step.name](step.numbers) if step.numbers else ""
    print(f"    {step.status} in {step.seconds:.1f} s: {summary}{f' [{step.reason}]' if step.reason else ''}",
          flush=True)
    if step.status in ("failed", "timeout") and step.logs:
        log = check.out / step.logs[-1]
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
        print("\n".join(f"    | {line.split(chr(13))[-1]}" for line in tail), flush=True)


def parse_caps(items: list[str]) -> dict[str, float]:
    caps = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in STEPS or not value:
            raise argparse.ArgumentTypeError(f"--cap {item!r}: expected STEP=SECONDS with STEP in {', '.join(STEPS)}")
        caps[name] = float(value)
    return caps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/gpu", help="folder for gpu_check.json, gpu_check.md, logs/, runs/")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="total seconds for the whole check")
    defaults = ", ".join(f"{name}={cap:g}" for name, cap in DEFAULT_CAPS.items())
    parser.add_argument("--cap", action="append", default=[], metavar="STEP=SECONDS",
                        help=f"a step's time cap in seconds (defaults: {defaults})")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of the steps, run in order")
    parser.add_argument("--dry-run", action="store_true", help="the same steps at toy sizes on the CPU")
    parser.add_argument("--scenes", type=int, default=3000, help="tex scenes rendered for the training steps")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "slotlab-gpu-check"),
                        help="rendered scenes and run directories with checkpoints (kept out of --out)")
    args = parser.parse_args(argv)
    try:
        args.caps = parse_caps(args.cap)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    args.selected = [name.strip() for name in args.steps.split(",") if name.strip()]
    unknown = [name for name in args.selected if name not in STEPS]
    if unknown or not args.selected:
        parser.error(f"--steps {args.steps!r}: known steps are {', '.join(STEPS)}")
    if args.budget <= 0:
        parser.error("--budget must be positive")
    return args


def _on_sigterm(signum, _frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    environment = probe_environment(timeout=min(60.0, args.budget))
    print(environment_line(environment), flush=True)
    if not environment.get("cuda_available") and not args.dry_run:
        problem = environment.get("error") or "torch sees no CUDA device"
        print(f"error: the GPU check needs an NVIDIA GPU ({problem}); rehearse it on the CPU with --dry-run",
              file=sys.stderr)
        return 2
    check = Check(args, environment, started)
    print(f"{'dry run on the CPU' if check.dry else 'GPU check'}: budget {args.budget:g} s, steps "
          f"{', '.join(args.selected)}; writing {check.out}/gpu_check.json and gpu_check.md", flush=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        run_steps(check, args.selected)
    except (Interrupted, KeyboardInterrupt):
        print("gpu_check interrupted; results so far are in the files", file=sys.stderr)
        return 1
    finally:
        check.write()
    print((check.out / "gpu_check.md").read_text(), flush=True)
    done = all(check.steps[name].status == "ok" for name in args.selected)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
