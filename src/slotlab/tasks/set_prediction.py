"""Set property prediction (Slot Attention paper, section 4.2): slots -> object coordinates and properties, AP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from slotlab.errors import UserError
from slotlab.metrics.set_prediction import AP_THRESHOLDS, PAPER_COORD_SCALE, ap_key, average_precision, set_targets
from slotlab.models.set_prediction import SetPredictionModel
from slotlab.tasks import Task, register


class SetPredictionEvaluator:
    """AP at every threshold of :data:`~slotlab.metrics.set_prediction.AP_THRESHOLDS` over the batches seen.

    ``summary()`` gives ``{"ap_inf", "ap_1", "ap_0.5", "ap_0.25", "ap_0.125", "num_objects"}``; the dataset's
    ``info["coord_scale"]`` (default 6, the paper's) converts [0, 1] coordinates to scene units.
    """

    def __init__(self, model: nn.Module, info: dict[str, Any] | None = None):
        self.model = model
        self.scale = float((info or {}).get("coord_scale", PAPER_COORD_SCALE))
        self.preds: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, batch: dict[str, torch.Tensor], indices=None) -> None:
        self.preds.append(self.model.predict(batch["image"]).float().cpu())
        self.targets.append(set_targets(batch["obj_coords"], batch["obj_props"]).cpu())

    def summary(self) -> dict[str, Any]:
        pred, target = torch.cat(self.preds), torch.cat(self.targets)
        metrics: dict[str, Any] = {ap_key(t): average_precision(pred, target, t, self.scale) for t in AP_THRESHOLDS}
        metrics["num_objects"] = int(target[..., -1].sum())
        return metrics


@register("setpred")
class SetPredictionTask(Task):
    """:class:`~slotlab.models.set_prediction.SetPredictionModel`, Hungarian-matched losses, scored by AP."""

    def build_model(self) -> nn.Module:
        return SetPredictionModel(self.config)

    def start_training(self, model: nn.Module, train_set: Any, fresh: bool) -> None:
        """Refuse a dataset whose object metadata holds values outside the known vocabulary.

        Object discovery keeps such values as unknown (-1); set prediction would silently learn from holes.
        """
        notes = train_set.info.get("unknown_values", [])
        if notes:
            raise UserError(f"set prediction needs every object's properties, but {len(notes)} object value(s) of "
                            f"dataset {self.config.data.name!r} are outside the known vocabulary, e.g. {notes[0]}")

    def evaluator(self, model: nn.Module, dataset: Any = None, out_dir: Path | None = None) -> SetPredictionEvaluator:
        return SetPredictionEvaluator(model, dataset.info if dataset is not None else None)
