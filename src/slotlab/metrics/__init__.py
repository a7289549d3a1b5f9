"""Object-discovery metrics, batched in torch on the model's device.

Plain functions take predicted masks ``[B, K, H, W]`` (or ids ``[B, H, W]``) and true ids ``[B, H, W]`` and return
``[B]``; metric objects follow ``update()`` / ``compute()``. See ``docs/metrics.md`` for definitions and edge cases.
"""

from slotlab.metrics.ari import ARIMetric, ari, contingency, fg_ari, mask_ids
from slotlab.metrics.object_discovery import ObjectDiscoveryMetrics, object_discovery_scores
from slotlab.metrics.overlap import MBOMetric, MIoUMetric, mbo, miou
from slotlab.metrics.reconstruction import MSEMetric, clevrtex_mse_per_image, mse_per_image
from slotlab.metrics.set_prediction import average_precision as average_precision  # set prediction AP

__all__ = [
    "ARIMetric", "MBOMetric", "MIoUMetric", "MSEMetric", "ObjectDiscoveryMetrics", "ari", "clevrtex_mse_per_image",
    "contingency", "fg_ari", "mask_ids", "mbo", "miou", "mse_per_image", "object_discovery_scores",
]
