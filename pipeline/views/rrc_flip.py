"""``rrc-flip``: ImageNet's RandomResizedCrop(scale, ratio) box, then a horizontal flip.

The box is stored as fractions of the image (top, left, height, width) in uint16 units of
1/65535, so it is resolution independent. Sampling follows torchvision's
``RandomResizedCrop.get_params`` in continuous coordinates (10 tries, then the central crop clamped
to ``ratio``), with each image's own aspect ratio.
"""

from __future__ import annotations

import math

import numpy as np
import torchvision.transforms.v2.functional as F

from kdcache.stores.errors import SpecError
from kdcache.views.base import U8, U16, UNIT, ViewOp, fraction_box


class RRCFlip(ViewOp):
    """ImageNet augmentation: RandomResizedCrop(scale, ratio) + horizontal flip."""

    name = "rrc-flip"
    param_dtypes = {"top": U16, "left": U16, "height": U16, "width": U16, "flip": U8}
    aspect_dependent = True

    def __init__(self, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        super().__init__()
        try:
            scale = [float(s) for s in scale]
            ratio = [float(r) for r in ratio]
        except (TypeError, ValueError):
            raise SpecError(f"rrc-flip scale and ratio must be pairs of numbers; got {scale!r}, {ratio!r}") from None
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise SpecError(f"rrc-flip scale must be (min, max) with 0 < min <= max <= 1; got {scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise SpecError(f"rrc-flip ratio must be (min, max) with 0 < min <= max; got {ratio}")
        self.scale, self.ratio = scale, ratio
        self.args = {"scale": scale, "ratio": ratio}

    def sample(self, rng, shape, image_hw):
        hw = np.broadcast_to(np.asarray(image_hw, dtype=np.float64), (*shape, 2))
        aspect = hw[..., 1] / hw[..., 0]
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        hf, wf = np.zeros(shape), np.zeros(shape)
        found = np.zeros(shape, dtype=bool)
        for _ in range(10):  # the same number of draws whatever happens: deterministic in the seed
            area = rng.uniform(self.scale[0], self.scale[1], shape)
            r = np.exp(rng.uniform(lo, hi, shape))
            w, h = np.sqrt(area * r / aspect), np.sqrt(area * aspect / r)  # fractions of W and H
            ok = ~found & (w <= 1) & (h <= 1)
            wf[ok], hf[ok] = w[ok], h[ok]
            found |= ok
        # torchvision's fallback: the whole image, clamped to the ratio range, centred
        fw = np.where(aspect > self.ratio[1], self.ratio[1] / aspect, 1.0)
        fh = np.where(aspect < self.ratio[0], aspect / self.ratio[0], 1.0)
        wf, hf = np.where(found, wf, fw), np.where(found, hf, fh)
        u_top, u_left = rng.random(shape), rng.random(shape)
        top = np.where(found, u_top, 0.5) * (1 - hf)
        left = np.where(found, u_left, 0.5) * (1 - wf)
        hq = np.clip(np.rint(hf * UNIT), 1, UNIT)
        wq = np.clip(np.rint(wf * UNIT), 1, UNIT)
        return {
            "top": np.clip(np.rint(top * UNIT), 0, UNIT - hq).astype(np.uint16),
            "left": np.clip(np.rint(left * UNIT), 0, UNIT - wq).astype(np.uint16),
            "height": hq.astype(np.uint16),
            "width": wq.astype(np.uint16),
            "flip": rng.integers(0, 2, shape, dtype=np.uint8),
        }

    @staticmethod
    def box(params: dict, image_hw) -> tuple[int, int, int, int]:
        """Stored fractions -> the pixel box (top, left, height, width) inside an H x W image."""
        return fraction_box(params, image_hw)

    def transform(self, image, params, size):
        """Crop and resize in the image's own dtype (uint8 images take torchvision's fast uint8 resize, as
        its RandomResizedCrop does on uint8 tensors: 1.6x faster than in float)."""
        top, left, h, w = self.box(params, image.shape[-2:])
        x = F.resized_crop(image, top, left, h, w, [int(size[0]), int(size[1])],
                           interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        return F.horizontal_flip(x) if int(params["flip"]) else x
