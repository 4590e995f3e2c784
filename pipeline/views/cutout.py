"""``cutout``: a square hole of random size filled with a constant colour, as SLD's strong view ends.

Transcribed from the Swapped Logit Distillation code (StephenEkaputra/Swapped-Logit-Distillation,
``mdistiller/dataset/cifar100.py``: ``RandAugment.__call__``, ``Cutout`` and ``CutoutAbs``), whose strong
CIFAR view runs this after its two RandAugment ops (FixMatch's recipe with the size raised to 0.5):

- the side is ``v = U[0, size) * W`` pixels (``random.random() * 0.5`` times the image *width*, also for
  the rows): the hole is square in pixels;
- the centre is ``np.random.uniform(W)``, which numpy reads as ``uniform(low=W, high=1.0)``: uniform over
  (1, W] pixels, not [0, W) (rows likewise over (1, H]);
- the corner is ``x0 = int(max(0, cx - v / 2))`` and the hole spans ``x0 .. min(W, x0 + v)``, so a hole
  at the top or left border keeps its full side and only the bottom and right borders clip it; PIL's
  ``ImageDraw.rectangle`` fills both end pixels (``int(x1)`` included), so a hole is ``int(v) + 1``
  pixels wide unless clipped;
- the fill is (125, 123, 114), about CIFAR's mean colour (``fill`` here).

Differences: SLD draws on the PIL image, this op writes the same pixels into the uint8 tensor; the draws are
stored as fractions (``side`` of the width, ``cy``/``cx`` of the centre's range, 0 for pixel 1 and UNIT for
pixel H or W) and placed at the size the op renders, so after ``crop-flip`` at 32 x 32 it is SLD's hole
pixel for pixel and at other sizes the same region. SLD skips ``v <= 0``: a stored side of 0 does too.
"""

from __future__ import annotations

import torch

from kdcache.stores.errors import SpecError
from kdcache.views.base import U16, UNIT, ViewOp, check_range, quantise

SLD_FILL = (125, 123, 114)


class Cutout(ViewOp):
    """SLD / FixMatch Cutout: a square hole with a side of up to ``size`` times the image width."""

    name = "cutout"
    param_dtypes = {"cy": U16, "cx": U16, "side": U16}

    def __init__(self, size=0.5, fill=SLD_FILL):
        super().__init__()
        self.size = check_range(self.name, "size", size, 0, 1, lo_open=True)
        values = list(fill) if isinstance(fill, list | tuple) else [fill]
        if not values:
            raise SpecError(f"view op '{self.name}': fill must be one value or one per channel in [0, 255]; got []")
        self.fill = [check_range(self.name, "fill", v, 0, 255, integer=True) for v in values]
        self.args = {"size": self.size, "fill": self.fill}
        self._fills: dict[torch.dtype, torch.Tensor] = {}

    def sample(self, rng, shape, image_hw):
        # 1 - U[0, 1) is SLD's centre draw uniform(low=W, high=1) = W + (1 - W) U, as a fraction of (1, W]
        return {"cy": quantise(1 - rng.random(shape)), "cx": quantise(1 - rng.random(shape)),
                "side": quantise(self.size * rng.random(shape))}

    @staticmethod
    def box(params, image_hw) -> tuple[int, int, int, int]:
        """The filled pixels (top, left, height, width) in an H x W image, as SLD's ``CutoutAbs`` draws them;
        height 0 when the side is 0 (no hole)."""
        h, w = int(image_hw[0]), int(image_hw[1])
        side = int(params["side"]) * w / UNIT
        if side <= 0:
            return 0, 0, 0, 0
        cy = 1 + int(params["cy"]) / UNIT * (h - 1)
        cx = 1 + int(params["cx"]) / UNIT * (w - 1)
        y0, x0 = int(max(0.0, cy - side / 2)), int(max(0.0, cx - side / 2))
        y1, x1 = min(h, y0 + side), min(w, x0 + side)  # PIL fills rows y0..int(y1) and columns x0..int(x1)
        return y0, x0, min(h, int(y1) + 1) - y0, min(w, int(x1) + 1) - x0

    def transform(self, image, params, size):
        top, left, h, w = self.box(params, image.shape[-2:])
        if h == 0:
            return image
        channels = image.shape[0]
        if len(self.fill) not in (1, channels):
            raise SpecError(f"view op '{self.name}': fill has {len(self.fill)} values but the image has "
                            f"{channels} channels; give one value or {channels}")
        out = image.clone()
        out[:, top:top + h, left:left + w] = self._fill(image.dtype)
        return out

    def _fill(self, dtype: torch.dtype) -> torch.Tensor:
        """The fill as a (C or 1, 1, 1) tensor, built once per dtype (building it per call cost 6 us of 14)."""
        if dtype not in self._fills:
            self._fills[dtype] = torch.tensor(self.fill, dtype=dtype).reshape(-1, 1, 1)
        return self._fills[dtype]

