"""Object-discovery metrics, batched in torch on the model's device.

Plain functions take predicted masks ``[B, K, H, W]`` (or ids ``[B, H, W]``) and true ids ``[B, H, W]`` and return
``[B]``; metric objects follow ``update()`` / ``compute()``.
"""

from slotlab.metrics.ari import ARIMetric, ari, contingency, fg_ari, mask_ids

__all__ = ["ARIMetric", "ari", "contingency", "fg_ari", "mask_ids"]
