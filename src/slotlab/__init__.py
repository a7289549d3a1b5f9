"""slotlab: object-centric learning with Slot Attention.

Tensor conventions, used everywhere:

* images: float ``[B, 3, H, W]`` in [-1, 1]
* ground-truth masks: int64 ``[B, H, W]`` object ids, 0 = background
* predicted masks: float ``[B, K, H, W]``, summing to 1 over the K slots
* slots: ``[B, K, D]``; attention: ``[B, K, N]`` with N = h * w feature positions, softmax over K
"""

__version__ = "0.1.0"
