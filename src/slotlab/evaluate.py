"""``slotlab eval RUN_DIR``: score a trained run on a split with its task's evaluator.

Writes ``RUN_DIR/eval/<split>-<checkpoint>/metrics.json`` (e.g. ``eval/val-best``; ``-first<N>`` with ``--limit``)
with the task's scores (ARI, FG-ARI, mIoU, mBO, MSE for slot models, see ``docs/metrics.md``; PSNR for the VAE; AP
for set prediction; the disentanglement view for VQ-SA), and the task's pictures and tables beside it (see
:mod:`slotlab.tasks.autoencoder`). Evaluating another split or checkpoint never overwrites these.

Slot Attention samples its initial slots anew for every image, so one score is one draw of that noise (on CLEVR6 the
FG-ARI of five draws spreads over about 0.01). ``--draws N`` scores N draws (noise seeds S, S+1, ...) and reports
each score's mean, with the standard deviation and every draw's value beside it.

May import the layers below it: ``train`` and everything under it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slotlab.config import restarts_unavailable
from slotlab.data import build_dataset
from slotlab.errors import UserError
from slotlab.io import atomic_write_text
from slotlab.runs import choose_checkpoint, eval_dir, keep_freed_memory
from slotlab.tasks import get_task, load_trained_model


@torch.no_grad()
def evaluate_run(run_dir: Path, split: str = "val", checkpoint: str = "best", limit: int = 0,
                 batch_size: int = 0, device: str = "auto", seed: int = 0, iters: int = 0,
                 draws: int = 1, restarts: int = 0, posterior: bool | None = None) -> dict[str, Any]:
    """Score ``split`` of the run's dataset and save metrics and pictures under ``RUN_DIR/eval``.

    Args:
        run_dir: a run directory made by ``slotlab train``.
        split: ``val``, ``train`` or ``test``.
        checkpoint: ``best`` or ``last``.
        limit: score only the first ``limit`` images (0 = all).
        batch_size: evaluation batch size (0 = the training batch size).
        device: ``auto``, ``cpu``, ``cuda``, ...
        seed: seed of the slot initialisation noise (of the first draw).
        iters: grouping iterations T at test time (0 = the run's ``model.test_iters``, or as trained). Slot
            Attention is a fixed-point iteration, so more iterations than in training often sharpen the slots (the
            Slot Attention paper's figure 5 / 7).
        draws: how many draws of the noise to score, with seeds ``seed``, ``seed + 1``, ...; with more than one,
            each numeric score is the mean over the draws, ``std`` holds the standard deviations and ``per_draw``
            every draw's scores. The pictures and ``per_image.csv`` show the first draw.
        restarts: draws of the initial slots per image inside one forward pass, each image keeping the one whose
            decoder masks agree best with its attention masks (0 = the run's ``model.test_restarts``); only runs
            with Gaussian initial slots draw differently each time.
        posterior: score each pixel's posterior over the slots (True) or the masks that compose the image (False)
            instead of what the run hands out (None: its ``model.mask_posterior``); slot autoencoders only.

    Returns:
        The metrics dict written to ``eval/metrics.json``.
    """
    if limit < 0:
        raise UserError(f"limit must be 0 (all images) or positive, got {limit}")
    if batch_size < 0:
        raise UserError(f"batch size must be 0 (the training batch size) or positive, got {batch_size}")
    if iters < 0:
        raise UserError(f"iters must be 0 (the run's own test-time T) or positive, got {iters}")
    if draws < 1:
        raise UserError(f"draws must be 1 or more, got {draws}")
    if restarts < 0:
        raise UserError(f"restarts must be 0 (the run's own model.test_restarts) or positive, got {restarts}")
    if not 0 <= seed <= 2**64 - draws:  # torch.manual_seed takes 64-bit seeds
        raise UserError(f"seed must be 0 to 2**64 - draws, got {seed}")
    run_dir = Path(run_dir)
    checkpoint = choose_checkpoint(run_dir, checkpoint)
    config, model = load_trained_model(run_dir, checkpoint, device)
    grouping = getattr(model, "grouping", None)
    if iters and not hasattr(grouping, "num_iters"):
        raise UserError(f"--iters: the {config.task} model of {str(run_dir)!r} has no grouping iterations to set")
    if iters == getattr(grouping, "num_iters", None):
        iters = 0  # the run's own test-time number: the plain evaluation
    if iters:
        grouping.test_iters = iters
    if restarts == getattr(model, "test_restarts", 1):
        restarts = 0  # the run's own number (one draw where the model has none): the plain evaluation
    if restarts:
        why = restarts_unavailable(config)
        if why:
            raise UserError(f"--restarts: {str(run_dir)!r} {why}")
        model.test_restarts = restarts
    if posterior == getattr(model, "mask_posterior", None):
        posterior = None  # the run's own masks: the plain evaluation
    if posterior is not None:
        if not hasattr(model, "mask_posterior"):
            raise UserError(f"--posterior: the {config.task} model of {str(run_dir)!r} composes no image from slot "
                            "masks (slot autoencoders only)")
        model.mask_posterior = posterior
    dev = next(model.parameters()).device
    dataset = build_dataset(config.data, split)
    if len(dataset) == 0:
        raise UserError(f"the {split} split of dataset {config.data.name!r} is empty: nothing to evaluate")
    if dev.type == "cpu":
        keep_freed_memory()  # after the data: only the batches' tensors come and go from here on
    count = len(dataset) if limit == 0 else min(limit, len(dataset))
    # eval/val-best and the like: other evaluations stay
    out_dir = eval_dir(run_dir, split, checkpoint, limit, iters, seed, draws, restarts, posterior)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"split": split, "num_images": count, "checkpoint": checkpoint}
    if hasattr(grouping, "num_iters"):
        metrics["iters"] = grouping.num_iters  # model.eval(): the test-time T
    if hasattr(model, "restarts"):
        metrics["restarts"] = model.restarts()  # model.eval(): the draws each image's slots are chosen from
    if hasattr(model, "mask_posterior"):
        metrics["mask_posterior"] = model.mask_posterior  # the masks scored: each pixel's posterior, or the mixture's
    start = time.perf_counter()
    scores = []  # one summary per draw
    for draw in range(draws):
        torch.manual_seed(seed + draw)
        evaluator = get_task(config).evaluator(model, dataset, out_dir if draw == 0 else None)  # pictures: draw 0
        desc = "eval" if draws == 1 else f"eval, draw {draw + 1}/{draws}"
        for indices, batch in dataset.batches(count, batch_size or config.train.batch_size, dev, desc=desc):
            evaluator.update(batch, indices)
        scores.append(evaluator.summary())
    metrics.update(scores[0] if draws == 1 else mean_over_draws(scores, seed))
    metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def mean_over_draws(scores: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """One summary of several draws' ``scores``: each numeric score's mean, with ``std`` (population standard
    deviations), ``per_draw`` (every draw's value) and ``seeds`` (the noise seed of each draw); anything else (text,
    nested tables) as the first draw has it."""
    per_draw = {key: [s[key] for s in scores] for key, value in scores[0].items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)
                and all(isinstance(s.get(key), (int, float)) for s in scores)}
    values = {key: np.asarray(found, dtype=np.float64) for key, found in per_draw.items()}  # key -> [draws]
    return {**scores[0], **{key: float(v.mean()) for key, v in values.items()},
            "draws": len(scores), "seeds": [seed + draw for draw in range(len(scores))],
            "std": {key: float(v.std()) for key, v in values.items()}, "per_draw": per_draw}
