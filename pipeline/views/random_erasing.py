"""``random-erasing``: torchvision's RandomErasing (Zhong et al., 2017) with its box stored.

Sampling follows torchvision v2 ``RandomErasing.make_params`` (``torchvision/transforms/v2/_augment.py``):
erase with probability ``p``; up to 10 tries of an area fraction ~ U(scale) and an aspect ratio
h / w ~ exp(U(log ratio)), the first box that fits (h < H and w < W) placed uniformly; no erase when no
try fits. As ``rrc-flip`` does, the tries run in continuous coordinates with each image's own aspect ratio,
and the box is stored as fractions (top, left, height, width), so it is the same region at any output size.

torchvision erases the normalised float tensor; kdcache ops work on uint8 pixels before normalisation, so
``value`` is a pixel value (0 is black, not the dataset's mean as ``value=0`` after Normalize is), and
``value=random`` fills each pixel with ``round(N(114.5, 57.6))`` clipped to 0..255: torchvision's per-pixel
N(0, 1) in the space of ImageNet's normalisation (mean 0.449, std 0.226 over the channels, times 255),
drawn by a ``torch.Generator`` seeded with the stored ``seed``, so replay is exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdcache.stores.errors import SpecError
from kdcache.views.base import U8, U16, U32, UNIT, ViewOp, check_range, fraction_box

NOISE_MEAN, NOISE_STD = 0.449 * 255, 0.226 * 255  # N(0, 1) after ImageNet's Normalize, in uint8 pixels


class RandomErasing(ViewOp):
    """torchvision RandomErasing(p, scale, ratio, value) on uint8 pixels."""

    name = "random-erasing"
    param_dtypes = {"erase": U8, "top": U16, "left": U16, "height": U16, "width": U16}
    aspect_dependent = True  # the ratio is in pixels: the box's fractions depend on the image's aspect

    def __init__(self, p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0):
        super().__init__()
        self.p = check_range(self.name, "p", p, 0, 1)
        self.scale = self._range("scale", scale, 1.0)
        self.ratio = self._range("ratio", ratio, math.inf)
        if value == "random":
            self.param_dtypes = {**type(self).param_dtypes, "seed": U32}
        else:
            try:
                value = check_range(self.name, "value", value, 0, 255, integer=True)
            except SpecError:
                raise SpecError(f"view op '{self.name}': value must be an integer in [0, 255] or 'random'; "
                                f"got {value!r}") from None
        self.value = value
        self.args = {"p": self.p, "scale": self.scale, "ratio": self.ratio, "value": self.value}

    def _range(self, key: str, value, hi: float) -> list[float]:
        """A ``min..max`` argument with 0 < min <= max <= hi."""
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise SpecError(f"view op '{self.name}': {key} must be a range min..max; got {value!r}")
        lo_value, hi_value = (check_range(self.name, key, v, 0, hi, lo_open=True) for v in value)
        if lo_value > hi_value:
            raise SpecError(f"view op '{self.name}': {key} must be min..max with min <= max; "
                            f"got {lo_value:g}..{hi_value:g}")
        return [lo_value, hi_value]

    def sample(self, rng, shape, image_hw):
        hw = np.broadcast_to(np.asarray(image_hw, dtype=np.float64), (*shape, 2))
        aspect = hw[..., 1] / hw[..., 0]  # W / H
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        hf, wf = np.zeros(shape), np.zeros(shape)
        found = np.zeros(shape, dtype=bool)
        for _ in range(10):  # the same number of draws whatever fits: deterministic in the seed
            area = rng.uniform(self.scale[0], self.scale[1], shape)
            r = np.exp(rng.uniform(log_lo, log_hi, shape))  # h / w in pixels
            h, w = np.sqrt(area * r * aspect), np.sqrt(area / (r * aspect))  # fractions of H and W
            fits = ~found & (h < 1) & (w < 1)
            hf[fits], wf[fits] = h[fits], w[fits]
            found |= fits
        erase = found & (rng.random(shape) < self.p)
        top, left = rng.random(shape) * (1 - hf), rng.random(shape) * (1 - wf)
        hq = np.clip(np.rint(hf * UNIT), 1, UNIT)
        wq = np.clip(np.rint(wf * UNIT), 1, UNIT)
        box = {"top": np.clip(np.rint(top * UNIT), 0, UNIT - hq), "left": np.clip(np.rint(left * UNIT), 0, UNIT - wq),
               "height": hq, "width": wq}
        params = {"erase": erase.astype(np.uint8)}
        params |= {k: np.where(erase, v, 0).astype(np.uint16) for k, v in box.items()}  # no box where nothing erases
        if self.value == "random":
            params["seed"] = rng.integers(0, 2**32, shape, dtype=np.uint32)
        return params

    def transform(self, image, params, size):
        if not int(params["erase"]):
            return image
        top, left, h, w = fraction_box(params, image.shape[-2:])
        out = image.clone()
        if self.value == "random":
            generator = torch.Generator().manual_seed(int(params["seed"]))
            noise = NOISE_MEAN + NOISE_STD * torch.randn((image.shape[0], h, w), generator=generator)
            out[:, top:top + h, left:left + w] = noise.round_().clamp_(0, 255).to(image.dtype)
        else:
            out[:, top:top + h, left:left + w] = self.value
        return out
