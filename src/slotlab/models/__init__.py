"""Models: encoders, grouping modules (Slot Attention and its variants), decoders and the slot autoencoder.

May import only ``config``, ``registry``, ``io``, ``runs``, ``errors`` and its own modules (see the
layers in ``pyproject.toml``). Which model a run trains is the task's business (:mod:`slotlab.tasks`).

Public modules: :class:`SlotAttention`, :class:`SlotAutoencoder`, :class:`SpatialBroadcastDecoder`; the registries
:data:`ENCODERS`, :data:`GROUPINGS` and :data:`SLOT_INITS` map config names to classes.
"""

from __future__ import annotations

from slotlab.models import (  # noqa: F401 - register grouping modules on import
    invariant_slot_attention,
    slot_mixture,
    soft_kmeans,
)
from slotlab.models.autoencoder import AutoencoderOutput, SlotAutoencoder
from slotlab.models.broadcast_decoder import DecoderOutput, SpatialBroadcastDecoder
from slotlab.models.encoders import ENCODERS, ImageEncoder, SoftPositionEmbed, position_grid
from slotlab.models.slate import DiscreteVAE, Slate
from slotlab.models.slot_attention import GROUPINGS, SLOT_INITS, GroupingOutput, SlotAttention, build_grouping

__all__ = [
    "AutoencoderOutput", "DecoderOutput", "DiscreteVAE", "ENCODERS", "GROUPINGS", "GroupingOutput", "ImageEncoder",
    "SLOT_INITS", "Slate", "SlotAttention", "SlotAutoencoder", "SoftPositionEmbed", "SpatialBroadcastDecoder",
    "build_grouping", "position_grid",
]
