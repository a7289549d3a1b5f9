"""benchmarks/gpu_check.py (issue 20): the dry run on the CPU, the budget, the no-GPU error, the parsers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


gpu_check = _load_module()


def _run(tmp_path: Path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """Run the check in a subprocess with its files under ``tmp_path``; (result, wall seconds)."""
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *args]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ})
    return done, time.monotonic() - start


def _record(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "gpu_check.json").read_text())


def _table_rows(tmp_path: Path) -> dict[str, list[str]]:
    """The Markdown table of gpu_check.md, by step name."""
    rows = {}
    for line in (tmp_path / "out" / "gpu_check.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in gpu_check.STEPS:
            rows[cells[0]] = cells
    return rows


def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    done, seconds = _run(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = _record(tmp_path)
    assert record["dry_run"] is True and record["environment"]["torch"] == torch.__version__
    steps = {step["name"]: step for step in record["steps"]}
    assert [step["name"] for step in record["steps"]] == list(gpu_check.STEPS)
    for step in steps.values():
        assert step["status"] == "ok", step
        assert 0 < step["seconds"] <= step["cap_s"]
        for log in step["logs"]:
            assert (tmp_path / "out" / log).is_file()

    train_step = steps["train_step"]["numbers"]
    assert train_step["paper"]["skipped"]  # 128x128 is not toy-sized on a CPU: said, not silently left out
    demo = train_step["demo"]
    assert demo["resolution"] == 32 and demo["slots"] == 7 and demo["batch"] == 2
    assert demo["slotlab"]["images_per_s"] > 0 and demo["plain"]["images_per_s"] > 0 and demo["ratio"] > 0
    assert demo["slotlab"]["bf16_peak_percent"] is None  # no peak on a CPU

    train = steps["clevrtex_train"]["numbers"]
    assert train["scenes"] == 20 and 1 <= train["steps"] <= 3
    assert train["loss_curve"] and all(loss > 0 for _, loss in train["loss_curve"])
    assert train["images_per_s"] > 0
    assert train["eval"]["folder"] == "eval/val-best" and train["eval"]["num_images"] >= 1
    assert -1 <= train["eval"]["fg_ari"] <= 1 and 0 <= train["eval"]["mbo"] <= 1

    sampling = steps["diffusion_sampling"]["numbers"]
    assert sampling["ddpm-1000"]["steps"] == 1000 and sampling["ddim-50"]["steps"] == 50
    assert sampling["ddim-50"]["images_per_s"] > sampling["ddpm-1000"]["images_per_s"] > 0

    ddp = steps["ddp_train"]["numbers"]
    assert ddp["steps"] >= 1 and ddp["loss_curve"]
    assert "torch.distributed.run" in (tmp_path / "out" / "logs" / "ddp_train-train.log").read_text()

    # The runs' small files come back in OUT; checkpoints and scenes stay in --work.
    assert (tmp_path / "out" / "runs" / "clevrtex" / "metrics.jsonl").is_file()
    assert (tmp_path / "out" / "runs" / "clevrtex" / "eval" / "val-best" / "metrics.json").is_file()
    assert not list((tmp_path / "out").rglob("*.pt"))
    assert list((tmp_path / "work" / "runs" / "clevrtex" / "checkpoints").glob("*.pt"))

    rows = _table_rows(tmp_path)
    assert list(rows) == list(gpu_check.STEPS)
    assert all(cells[1] == "ok" and len(cells) == 5 for cells in rows.values())
    assert "FG-ARI" in rows["clevrtex_train"][3] and "DDIM-50" in rows["diffusion_sampling"][3]
    assert record["elapsed_s"] < 120, f"dry run took {record['elapsed_s']} s ({seconds:.0f} s with start-up)"


def test_a_tiny_budget_stops_and_keeps_the_files(tmp_path):
    budget = 8.0
    done, seconds = _run(tmp_path, "--dry-run", "--budget", str(budget))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    record = _record(tmp_path)
    statuses = [step["status"] for step in record["steps"]]
    # Whatever started ran out of time or finished; everything after the budget ran out is skipped for it.
    first_skipped = statuses.index("skipped")
    assert all(status in ("ok", "timeout") for status in statuses[:first_skipped]), statuses
    for step in record["steps"][first_skipped:]:
        assert step["status"] == "skipped" and step["reason"].startswith("budget"), step
        assert step["seconds"] == 0 and not step["logs"]
    for step in record["steps"][:first_skipped]:
        assert step["cap_s"] <= budget
        if step["status"] == "timeout":  # killed at its cap, with its log kept
            assert "ran past its cap" in step["reason"] and (tmp_path / "out" / step["logs"][-1]).is_file()
    grace = 3.0
    assert record["elapsed_s"] <= budget + grace + 2, record["elapsed_s"]
    rows = _table_rows(tmp_path)
    assert list(rows) == list(gpu_check.STEPS)
    assert rows["ddp_train"][1] == "skipped" and rows["ddp_train"][4].startswith("budget")


def test_a_subset_of_steps(tmp_path):
    done, _ = _run(tmp_path, "--dry-run", "--steps", "diffusion_sampling")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = {step["name"]: step for step in _record(tmp_path)["steps"]}
    assert steps["diffusion_sampling"]["status"] == "ok"
    for name in ("train_step", "clevrtex_train", "ddp_train"):
        assert steps[name]["status"] == "skipped" and "--steps" in steps[name]["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    done, _ = _run(tmp_path, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--dry-run" in lines[0], done.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()


@pytest.mark.parametrize("argv", [["--steps", "train_step,nope"], ["--cap", "sampling=5"], ["--budget", "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_caps_are_overridable():
    args = gpu_check.parse_args(["--cap", "train_step=240", "--cap", "ddp_train=30"])
    assert args.caps == {"train_step": 240.0, "ddp_train": 30.0}


def test_a_command_past_its_time_is_killed_with_its_children(tmp_path):
    log = tmp_path / "sleep.log"
    start = time.monotonic()
    code, output = gpu_check.run_command(["sh", "-c", "sleep 30 & echo child $!; wait"], log, 1.0,
                                         dict(os.environ), grace=1.0)
    assert code is None and time.monotonic() - start < 10
    child = int(output.split("\nchild ")[1].split()[0])
    time.sleep(0.2)
    status = Path(f"/proc/{child}/status")
    assert not status.exists() or "zombie" in status.read_text()  # gone (or dead, waiting to be reaped)


# Output of benchmarks/train_step.py and benchmarks/sampling.py on a GPU, in the format they print.
TRAIN_STEP_OUTPUT = """\
device: NVIDIA H200, load average 0.3; torch 2.14.1+cu130; bf16 peak: 989 TFLOP/s
paper (clevrtex): 128x128, K=11, batch 64, 20 steps x 5 rounds, compile=True (warm-up 48 s)

| config | impl | batch | images/s (median) | images/s (best) | ratio (median / best) | peak MiB | GFLOP/image | \
TFLOP/s | % bf16 peak | syncs/step |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| paper 128px K=11 | slotlab | 64 | 2100.00 | 2150.00 | 4.20x / 4.10x | 9000 | 181.74 | 381.654 | 38.6% | 0 |
| paper 128px K=11 | plain | 64 | 500.00 | 524.39 | 1.00x / 1.00x | 20000 | 182.54 | 91.270 | 9.2% | 1 |
"""

SAMPLING_OUTPUT = """\
device: cuda (NVIDIA H200, 16 threads), precision fp32, torch 2.14.1+cu130
preset slotdiffusion-clevrtex: image 128x128x3, latents 32x32x3, K=11 slots x 64, UNet (64, 128, 256) \
(10.1M params), batch 16
peak GPU memory: 1.25 GiB

| sampler  | steps |  s / batch |  images/s | vs DDPM-1000 | how
|----------|-------|------------|-----------|--------------|-----
| ddpm     |  1000 |      20.00 |     0.800 |         1.0x | measured
| ddim     |    50 |       1.00 |    16.000 |        20.0x | measured
"""


def test_train_step_numbers_and_targets():
    numbers = gpu_check.parse_train_step(TRAIN_STEP_OUTPUT)
    assert numbers["bf16_peak_tflops"] == 989.0 and numbers["compile"] is True and numbers["warmup_s"] == 48
    assert (numbers["resolution"], numbers["slots"], numbers["batch"]) == (128, 11, 64)
    assert numbers["slotlab"]["images_per_s"] == 2100.0 and numbers["plain"]["syncs_per_step"] == 1
    assert numbers["slotlab"]["bf16_peak_percent"] == 38.6 and numbers["ratio"] == 4.2
    assert gpu_check.paper_targets(numbers) == {"ratio_ge_3x": True, "bf16_peak_ge_35_percent": True}
    numbers["slotlab"]["bf16_peak_percent"] = 20.0
    assert gpu_check.paper_targets(numbers)["bf16_peak_ge_35_percent"] is False
    assert gpu_check.paper_targets({}) == {"ratio_ge_3x": None, "bf16_peak_ge_35_percent": None}
    numbers["targets"] = gpu_check.paper_targets(numbers)
    summary = gpu_check.summarise_train_step({"paper": numbers})
    assert "4.20x" in summary and ">= 35% peak: NOT met" in summary and ">= 3x: met" in summary


def test_sampling_numbers():
    numbers = gpu_check.parse_sampling(SAMPLING_OUTPUT)
    assert numbers["preset"] == "slotdiffusion-clevrtex" and numbers["resolution"] == 128 and numbers["batch"] == 16
    assert numbers["peak_gib"] == 1.25 and numbers["precision"] == "fp32"
    assert numbers["ddim-50"]["images_per_s"] == 16.0 and numbers["ddpm-1000"]["seconds_per_batch"] == 20.0
    assert gpu_check.summarise_sampling(numbers).endswith("measured")


def test_markdown_cells_cannot_break_the_table():
    step = gpu_check.Step("train_step", status="failed", reason="exit code 1: error: a | b\nc")
    record = {"dry_run": False, "started": "s", "written": "w", "elapsed_s": 1.0, "budget_s": 540.0,
              "environment": {}, "steps": [gpu_check.asdict(step)]}
    table = [line for line in gpu_check.render_markdown(record).splitlines() if line.startswith("| train_step")]
    assert len(table) == 1 and table[0].count(" | ") == 4 and "a \\| b c" in table[0]
