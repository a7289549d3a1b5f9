"""Models: ``build_model(config)`` builds the model of ``config.task``.

Public modules: :class:`SlotAttention`, :class:`SlotAutoencoder`, :class:`SpatialBroadcastDecoder`.
New tasks register a factory ``(Config) -> nn.Module`` in :data:`TASKS`; the module must offer
``compute_loss(batch, step) -> (loss, logs)``.
"""

from __future__ import annotations

from torch import nn

from slotlab.config import Config
from slotlab.models.autoencoder import AutoencoderOutput, SlotAutoencoder
from slotlab.models.broadcast_decoder import DecoderOutput, SpatialBroadcastDecoder
from slotlab.models.encoders import ENCODERS, ImageEncoder, SoftPositionEmbed, position_grid
from slotlab.models.slot_attention import GROUPINGS, SLOT_INITS, GroupingOutput, SlotAttention, build_grouping
from slotlab.registry import Registry

TASKS: Registry[nn.Module] = Registry("task")

# Modules that register tasks, grouping modules or slot initialisations when imported. They are imported on first
# use by build_model() so that optional parts (diffusers, ...) load only when a config asks for them.
PLUGIN_MODULES = (
    "slotlab.models.slot_mixture",  # grouping: slot_mixture
    "slotlab.models.soft_kmeans",  # grouping: soft_kmeans
    "slotlab.models.set_prediction",  # task: setpred
    "slotlab.diffusion.vae",  # task: vae
    "slotlab.diffusion.slot_diffusion",  # task: slot_diffusion
)


def load_plugins() -> None:
    """Import every module of :data:`PLUGIN_MODULES` (idempotent)."""
    import importlib

    for name in PLUGIN_MODULES:
        importlib.import_module(name)


@TASKS.register("autoencoder")
def _autoencoder(config: Config) -> nn.Module:
    return SlotAutoencoder(config)


def build_model(config: Config) -> nn.Module:
    """The model for ``config.task`` (autoencoder, ...), freshly initialised."""
    load_plugins()
    return TASKS.build(config.task, config)


__all__ = [
    "AutoencoderOutput", "DecoderOutput", "ENCODERS", "GROUPINGS", "GroupingOutput", "ImageEncoder", "SLOT_INITS",
    "SlotAttention", "SlotAutoencoder", "SoftPositionEmbed", "SpatialBroadcastDecoder", "TASKS", "build_grouping",
    "build_model", "load_plugins", "position_grid",
]
