"""``mixup``: Zhang et al.'s Mixup, the view blended with its partner row's view.

lambda ~ Beta(alpha, alpha) is drawn per (view, row) and stored (uint16 units of 1/UNIT); the mixed image is
``lam * own + (1 - lam) * partner`` and the row's own label weighs ``lam``, as timm's ``Mixup`` (``mode='elem'``,
``timm/data/mixup.py``) does, but with a stored partner instead of the batch's mirror element, so stage two
rebuilds the same image (``kdcache.views.policy``).
"""

from __future__ import annotations

from kdcache.views.base import U16, UNIT, MixOp, quantise


class Mixup(MixOp):
    """Mixup(alpha), firing with probability ``p``."""

    name = "mixup"
    param_dtypes = {"lam": U16}

    def __init__(self, alpha=0.8, p=1.0):
        super().__init__(alpha, p)

    def sample(self, rng, shape, image_hw):
        return {"lam": quantise(rng.beta(self.alpha, self.alpha, shape))}

    def mix(self, image, partner, params):
        lam = self.weight(params, image.shape[-2:])
        return image * lam + partner * (1 - lam)

    def weight(self, params, size):
        return int(params["lam"]) / UNIT
