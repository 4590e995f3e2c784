"""``randaugment``: RandAugment, ``n`` ops drawn uniformly (with replacement) from 14, at a fixed or uniform magnitude.

``space=torchvision`` (default) is torchvision 0.29's ``v2.RandAugment`` (``transforms/v2/_auto_augment.py``):
``magnitude`` a bin of ``num_bins`` replays it bit for bit; ``magnitude=uniform`` (torchvision has no such mode)
draws each op's strength uniformly over its whole range instead, ``[0, max]`` (Posterize 8..4 bits, rounded;
Solarize threshold 1..0), with torchvision's signs.

``space=sld`` (with ``magnitude=uniform``) is the strong view of Swapped Logit Distillation's official code,
``RandAugment(2, 10)`` in ``mdistiller/dataset/cifar100.py`` (and ``imagenet.py``) of
github.com/StephenEkaputra/Swapped-Logit-Distillation (FixMatch's variant, its comments say): the same 14 ops,
each with a value uniform over ``augment_list()``'s range and no sign flip (the ``m`` argument is unused). Its
ranges differ from torchvision's: Brightness, Color, Contrast and Sharpness take factors in [0.05, 0.95] (they
only ever weaken), Posterize ``int(uniform(4, 8))`` bits, Rotate [-30, 30] degrees, shears [-0.3, 0.3],
Solarize thresholds [0, 256], translations [-0.3, 0.3] of the side. What remains different: SLD runs PIL
ops and this runs tensor ops; on random and smooth test images they agree exactly on brightness, sharpness,
equalize, posterize and solarize, on shears and translations but at nearest-sampling ties, within one grey
level on colour, contrast and autocontrast, and on all but a few border pixels of rotations. A strength stored
in 1/65535 steps makes 8-bit Posterize (identity) possible once in 65536 draws. SLD's RandAugment always ends
with a Cutout (side uniform in [0, 0.5] of the width, grey fill), a separate op here, so its CIFAR strong view
is ``crop-flip | randaugment:n=2,magnitude=uniform,space=sld | cutout...``.
"""

from __future__ import annotations

import numpy as np

from kdcache.stores.errors import SpecError
from kdcache.views._augment_ops import (
    OP_NAMES,
    RANDAUGMENT_SPACE,
    MagnitudeRange,
    Space,
    apply_op,
    bin_magnitude,
    op_indices,
    signed_ops,
)
from kdcache.views.base import U8, U16, UNIT, ViewOp, check_range

UNIFORM = "uniform"
SLD_SPACE: Space = {  # SLD's augment_list(), in the units apply_op takes
    "Identity": None,
    "ShearX": MagnitudeRange(-0.3, 0.3, signed=False),
    "ShearY": MagnitudeRange(-0.3, 0.3, signed=False),
    # PIL's (1, 0, v * W, 0, 1, 0) moves the picture by -v * W, rounded to whole pixels by its nearest sampling
    "TranslateX": MagnitudeRange(0.3, -0.3, signed=False, side="width", integer=True),
    "TranslateY": MagnitudeRange(0.3, -0.3, signed=False, side="height", integer=True),
    "Rotate": MagnitudeRange(-30.0, 30.0, signed=False),
    "Brightness": MagnitudeRange(-0.95, -0.05, signed=False),  # factors 1 + magnitude in [0.05, 0.95]
    "Color": MagnitudeRange(-0.95, -0.05, signed=False),
    "Contrast": MagnitudeRange(-0.95, -0.05, signed=False),
    "Sharpness": MagnitudeRange(-0.95, -0.05, signed=False),
    "Posterize": MagnitudeRange(3.5, 7.5, signed=False, integer=True),  # round(3.5 + 4u) == SLD's int(4 + 4u)
    "Solarize": MagnitudeRange(0.0, 256 / 255, signed=False),  # thresholds 255 * magnitude in [0, 256]
    "AutoContrast": None,
    "Equalize": None,
}
SPACES = {"torchvision": RANDAUGMENT_SPACE, "sld": SLD_SPACE}


class RandAugment(ViewOp):
    """RandAugment: n of 14 ops per image, at a fixed magnitude bin or uniform (torchvision's or SLD's ranges).

    Per op i: ``op{i}`` (index into ``OP_NAMES``), ``mag{i}`` (the bin, or for ``uniform`` the strength in units
    of 1/65535) and ``sign{i}`` (1: negated)."""

    name = "randaugment"

    def __init__(self, n: int = 2, magnitude: int | str = 9, num_bins: int = 31, space: str = "torchvision"):
        super().__init__()
        self.n = check_range(self.name, "n", n, 1, 16, integer=True)
        self.num_bins = check_range(self.name, "num_bins", num_bins, 2, 256, integer=True)
        self.magnitude = magnitude if magnitude == UNIFORM else self._bin(magnitude)
        if not isinstance(space, str) or space not in SPACES:
            raise SpecError(f"view op '{self.name}': space must be one of {', '.join(SPACES)}; got {space!r}")
        if space == "sld" and self.magnitude != UNIFORM:
            raise SpecError(f"view op '{self.name}': space=sld draws every magnitude uniformly, as SLD's code does; "
                            f"pass magnitude=uniform, not {magnitude!r}")
        self.space = SPACES[space]
        self.space_ops, self.signed = op_indices(self.space), signed_ops(self.space)
        self.args = {"n": self.n, "magnitude": self.magnitude, "num_bins": self.num_bins, "space": space}
        magnitude_dtype = U16 if self.magnitude == UNIFORM else U8
        self.param_dtypes = {f"{kind}{i}": magnitude_dtype if kind == "mag" else U8
                             for i in range(self.n) for kind in ("op", "mag", "sign")}

    def _bin(self, magnitude) -> int:
        try:
            return check_range(self.name, "magnitude", magnitude, 0, self.num_bins - 1, integer=True)
        except SpecError:
            raise SpecError(f"view op '{self.name}': magnitude must be an integer bin in [0, {self.num_bins - 1}] "
                            f"(num_bins={self.num_bins}) or '{UNIFORM}'; got {magnitude!r}") from None

    def sample(self, rng, shape, image_hw):
        params = {}
        for i in range(self.n):
            op = params[f"op{i}"] = self.space_ops[rng.integers(0, len(self.space_ops), shape)]
            if self.magnitude == UNIFORM:
                params[f"mag{i}"] = rng.integers(0, UNIT + 1, shape, dtype=np.uint16)
            else:
                params[f"mag{i}"] = np.full(shape, self.magnitude, dtype=np.uint8)
            params[f"sign{i}"] = rng.integers(0, 2, shape, dtype=np.uint8) * self.signed[op]
        return params

    def magnitude_of(self, name: str, mag: int, negate: bool, height: int, width: int) -> float:
        """The magnitude ``apply_op`` takes for op ``name`` at stored ``mag`` and sign."""
        magnitudes = self.space[name]
        if self.magnitude != UNIFORM:
            return bin_magnitude(magnitudes, self.num_bins, mag, negate, height, width)
        if magnitudes is None:
            return 0.0
        value = magnitudes.at(mag / UNIT, height, width)
        return -value if negate and magnitudes.signed else value

    def transform(self, image, params, size):
        height, width = image.shape[-2:]
        for i in range(self.n):
            name = OP_NAMES[int(params[f"op{i}"])]
            magnitude = self.magnitude_of(name, int(params[f"mag{i}"]), bool(params[f"sign{i}"]), height, width)
            image = apply_op(image, name, magnitude)
        return image
