"""Models: ``build_model(config)`` builds the model of ``config.task``.

Public modules: :class:`SlotAttention`, :class:`SlotAutoencoder`, :class:`SpatialBroadcastDecoder`.
New tasks register a factory ``(Config) -> nn.Module`` in :data:`TASKS`; the module must offer
``compute_loss(batch, step) -> (loss, logs)``.
"""

from __future__ import annotations

from torch import nn

from slotlab.config import Config
from slotlab.errors import UserError
from slotlab.models.autoencoder import AutoencoderOutput, SlotAutoencoder
from slotlab.models.broadcast_decoder import DecoderOutput, SpatialBroadcastDecoder
from slotlab.models.encoders import ENCODERS, ImageEncoder, SoftPositionEmbed, position_grid
from slotlab.models.slot_attention import GROUPINGS, SLOT_INITS, GroupingOutput, SlotAttention, build_grouping
from slotlab.registry import Registry

TASKS: Registry[nn.Module] = Registry("task")

# Modules that register grouping modules (cheap to import) and tasks when imported. Task modules are imported only
# when a config asks for their task, so that heavy optional parts (diffusers) load only when needed.
GROUPING_MODULES = (
    "slotlab.models.slot_mixture",  # grouping: slot_mixture
    "slotlab.models.soft_kmeans",  # grouping: soft_kmeans
)
TASK_MODULES = {
    "setpred": "slotlab.models.set_prediction",
    "vae": "slotlab.diffusion.vae",
    "slot_diffusion": "slotlab.diffusion.slot_diffusion",
}


def load_plugins(task: str | None = None) -> None:
    """Import the grouping modules and the module of ``task`` (every task module when ``task`` is None)."""
    import importlib

    modules = list(GROUPING_MODULES)
    if task is None:
        modules += TASK_MODULES.values()
    elif task in TASK_MODULES:
        modules.append(TASK_MODULES[task])
    elif task not in TASKS:
        known = sorted([*TASKS.names(), *TASK_MODULES])
        raise UserError(f"unknown task {task!r} (known: {', '.join(known)})")
    for name in modules:
        importlib.import_module(name)


@TASKS.register("autoencoder")
def _autoencoder(config: Config) -> nn.Module:
    return SlotAutoencoder(config)


def build_model(config: Config) -> nn.Module:
    """The model for ``config.task`` (autoencoder, ...), freshly initialised."""
    load_plugins(config.task)
    return TASKS.build(config.task, config)


__all__ = [
    "AutoencoderOutput", "DecoderOutput", "ENCODERS", "GROUPINGS", "GroupingOutput", "ImageEncoder", "SLOT_INITS",
    "SlotAttention", "SlotAutoencoder", "SoftPositionEmbed", "SpatialBroadcastDecoder", "TASKS", "build_grouping",
    "build_model", "load_plugins", "position_grid",
]
