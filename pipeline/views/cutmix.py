"""``cutmix``: Yun et al.'s CutMix, a box of the partner row's view pasted into the view.

Follows timm (``timm/data/mixup.py``: ``rand_bbox``, ``cutmix_bbox_and_lam`` with ``correct_lam=True``):
lambda ~ Beta(alpha, alpha), a box with sides ``sqrt(1 - lambda)`` times the image's, centred uniformly over
the image and clipped at its border; the row's own label weighs ``1 - (box pixels) / (H * W)``. timm draws the
centre and the side in integer pixels at the batch's size; here the centre (``cy``, ``cx``) and the side
fraction ``cut`` = sqrt(1 - lambda) are stored as fractions and the box is rounded to pixels (and clipped) at
the size the op renders, so it is the same region at any resolution and the weight is exact for the pixels the
student sees. A ``cut`` of 0 (lambda 1) is an empty box.
"""

from __future__ import annotations

import math

import numpy as np

from kdcache.views.base import U16, UNIT, MixOp, quantise


def pixel_edges(centre: int, cut: int, n: int) -> tuple[int, int]:
    """``centre -/+ cut / 2`` (uint16 fractions of a side of n pixels) -> pixel edges rounded and clipped to 0..n."""
    lo, hi = ((2 * centre + sign * cut) * n / (2 * UNIT) for sign in (-1, 1))
    return min(n, max(0, math.floor(lo + 0.5))), min(n, max(0, math.floor(hi + 0.5)))


class CutMix(MixOp):
    """CutMix(alpha), firing with probability ``p``."""

    name = "cutmix"
    param_dtypes = {"cy": U16, "cx": U16, "cut": U16}

    def __init__(self, alpha=1.0, p=1.0):
        super().__init__(alpha, p)

    def sample(self, rng, shape, image_hw):
        lam = rng.beta(self.alpha, self.alpha, shape)
        return {"cy": quantise(rng.random(shape)), "cx": quantise(rng.random(shape)), "cut": quantise(np.sqrt(1 - lam))}

    @staticmethod
    def box(params, image_hw) -> tuple[int, int, int, int]:
        """The pasted pixels as half-open edges (y0, y1, x0, x1) inside an H x W image (empty when y0 == y1
        or x0 == x1): centre -/+ cut / 2, rounded to pixels and clipped to the image."""
        cut = int(params["cut"])
        return (*pixel_edges(int(params["cy"]), cut, int(image_hw[0])),
                *pixel_edges(int(params["cx"]), cut, int(image_hw[1])))

    def mix(self, image, partner, params):
        y0, y1, x0, x1 = self.box(params, image.shape[-2:])
        out = image.clone()
        out[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
        return out

    def weight(self, params, size):
        y0, y1, x0, x1 = self.box(params, size)
        return 1 - (y1 - y0) * (x1 - x0) / (int(size[0]) * int(size[1]))
