"""slotlab: object-centric learning with Slot Attention.

Tensor conventions, used everywhere:

* images: float ``[B, 3, H, W]`` in [-1, 1]
* ground-truth masks: int64 ``[B, H, W]`` object ids, 0 = background
* predicted masks: float ``[B, K, H, W]``, summing to 1 over the K slots
* slots: ``[B, K, D]``; attention: ``[B, K, N]`` with N = h * w feature positions, softmax over K
"""

__version__ = "0.1.0"


def load(path, checkpoint: str = "best", device: str = "auto"):
    """Load a trained model (a run directory or an exported folder): see :func:`slotlab.api.load`.

    Example:
        >>> model = slotlab.load("runs/demo")  # doctest: +SKIP
        >>> model.segment("scene.png").masks.shape  # doctest: +SKIP
        torch.Size([1, 7, 32, 32])
    """
    from slotlab.api import load as load_model

    return load_model(path, checkpoint, device)
