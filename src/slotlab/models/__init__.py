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


@TASKS.register("autoencoder")
def _autoencoder(config: Config) -> nn.Module:
    return SlotAutoencoder(config)


def build_model(config: Config) -> nn.Module:
    """The model for ``config.task`` (autoencoder, ...), freshly initialised."""
    return TASKS.build(config.task, config)


__all__ = [
    "AutoencoderOutput", "DecoderOutput", "ENCODERS", "GROUPINGS", "GroupingOutput", "ImageEncoder", "SLOT_INITS",
    "SlotAttention", "SlotAutoencoder", "SoftPositionEmbed", "SpatialBroadcastDecoder", "TASKS", "build_grouping",
    "build_model", "position_grid",
]
