"""The op table of the auto-augment family (RandAugment, TrivialAugment, AutoAugment), shared by their view ops.

Transcribed from torchvision 0.29 ``torchvision/transforms/v2/_auto_augment.py``: ``apply_op`` is
``_AutoAugmentBase._apply_image_or_video_transform`` written with public ``torchvision.transforms.v2.functional``
calls (NEAREST interpolation, fill None, shears about the top-left corner, solarize threshold ``255 * magnitude``
on uint8), and the ``*_SPACE`` tables are the classes' ``_AUGMENTATION_SPACE``. ``MagnitudeRange.bins`` rebuilds
torchvision's float32 magnitudes, so a bin replays bit for bit what torchvision applies. Stores keep an op as its
index in ``OP_NAMES`` (uint8): never reorder that tuple, only append to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

NEAREST = F.InterpolationMode.NEAREST
OP_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
            "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OP_INDEX = {name: i for i, name in enumerate(OP_NAMES)}
ENHANCERS = {"Brightness": F.adjust_brightness, "Color": F.adjust_saturation, "Contrast": F.adjust_contrast,
             "Sharpness": F.adjust_sharpness}  # each applies factor 1 + magnitude
UNARY = {"AutoContrast": F.autocontrast, "Equalize": F.equalize, "Invert": F.invert}


@dataclass(frozen=True)
class MagnitudeRange:
    """An op's magnitude as its strength goes from 0 to 1: from ``start`` to ``end``, both times the image width
    or height for translations that scale with it (``side``). ``integer`` magnitudes (Posterize's bits) are
    rounded; ``signed`` ones are negated half the time."""

    start: float
    end: float
    signed: bool
    side: str = ""  # "", "width" or "height"
    integer: bool = False

    def bounds(self, height: int, width: int) -> tuple[float, float]:
        scale = {"": 1, "width": width, "height": height}[self.side]
        return self.start * scale, self.end * scale

    def bins(self, num_bins: int, height: int, width: int) -> torch.Tensor:
        """torchvision's ``num_bins`` magnitudes: its float32 linspace, or Posterize's rounded ints."""
        start, end = self.bounds(height, width)
        if self.integer:
            return (start - torch.arange(num_bins) / ((num_bins - 1) / (start - end))).round().int()
        return torch.linspace(start, end, num_bins)

    def at(self, strength: float, height: int, width: int) -> float:
        """The magnitude at ``strength`` in [0, 1], continuous (``integer`` ones rounded half to even)."""
        start, end = self.bounds(height, width)
        value = start + (end - start) * strength
        return float(round(value)) if self.integer else value


Space = dict[str, MagnitudeRange | None]  # op name -> its magnitudes (None: the op takes none)

_COLOUR_09 = MagnitudeRange(0.0, 0.9, signed=True)
RANDAUGMENT_SPACE: Space = {
    "Identity": None,
    "ShearX": MagnitudeRange(0.0, 0.3, signed=True),
    "ShearY": MagnitudeRange(0.0, 0.3, signed=True),
    "TranslateX": MagnitudeRange(0.0, 150.0 / 331.0, signed=True, side="width"),
    "TranslateY": MagnitudeRange(0.0, 150.0 / 331.0, signed=True, side="height"),
    "Rotate": MagnitudeRange(0.0, 30.0, signed=True),
    "Brightness": _COLOUR_09,
    "Color": _COLOUR_09,
    "Contrast": _COLOUR_09,
    "Sharpness": _COLOUR_09,
    "Posterize": MagnitudeRange(8, 4, signed=False, integer=True),
    "Solarize": MagnitudeRange(1.0, 0.0, signed=False),
    "AutoContrast": None,
    "Equalize": None,
}
AUTOAUGMENT_SPACE: Space = {name: r for name, r in RANDAUGMENT_SPACE.items() if name != "Identity"} | {"Invert": None}

_COLOUR_099 = MagnitudeRange(0.0, 0.99, signed=True)
TRIVIALAUGMENT_WIDE_SPACE: Space = {
    "Identity": None,
    "ShearX": MagnitudeRange(0.0, 0.99, signed=True),
    "ShearY": MagnitudeRange(0.0, 0.99, signed=True),
    "TranslateX": MagnitudeRange(0.0, 32.0, signed=True),
    "TranslateY": MagnitudeRange(0.0, 32.0, signed=True),
    "Rotate": MagnitudeRange(0.0, 135.0, signed=True),
    "Brightness": _COLOUR_099,
    "Color": _COLOUR_099,
    "Contrast": _COLOUR_099,
    "Sharpness": _COLOUR_099,
    "Posterize": MagnitudeRange(8, 2, signed=False, integer=True),
    "Solarize": MagnitudeRange(1.0, 0.0, signed=False),
    "AutoContrast": None,
    "Equalize": None,
}


def op_indices(space: Space) -> np.ndarray:
    """The space's ops as ``OP_NAMES`` indices (uint8), in the space's order."""
    return np.array([OP_INDEX[name] for name in space], dtype=np.uint8)


def is_signed(space: Space, name: str) -> bool:
    """Whether op ``name`` of ``space`` has a magnitude that is negated half the time."""
    return space.get(name) is not None and space[name].signed


def signed_ops(space: Space) -> np.ndarray:
    """(len(OP_NAMES),) uint8: 1 for the ops of ``space`` whose magnitude is negated half the time."""
    return np.array([is_signed(space, name) for name in OP_NAMES], dtype=np.uint8)


def bin_magnitude(magnitudes: MagnitudeRange | None, num_bins: int, index: int, negate: bool, height: int,
                  width: int) -> float:
    """torchvision's magnitude for bin ``index`` of ``num_bins`` (0.0 for an op without one), negated if asked
    (signed ops only)."""
    if magnitudes is None:
        return 0.0
    value = float(magnitudes.bins(num_bins, height, width)[index])
    return -value if negate and magnitudes.signed else value


def apply_op(image: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    """Op ``name`` at ``magnitude``, as torchvision's ``_apply_image_or_video_transform`` (fill None, NEAREST)."""
    if name == "Identity":
        return image
    if name in ("ShearX", "ShearY"):
        # the AutoAugment paper's PIL affine (1, magnitude, 0, 0, 1, 0) is a shear of atan(magnitude) degrees
        # about the top-left corner
        degrees = math.degrees(math.atan(magnitude))
        shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
        return F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=NEAREST,
                        fill=None, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return F.affine(image, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST,
                        fill=None)
    if name == "Rotate":
        return F.rotate(image, angle=magnitude, interpolation=NEAREST, fill=None)
    if name in ENHANCERS:
        return ENHANCERS[name](image, 1.0 + magnitude)
    if name == "Posterize":
        return F.posterize(image, bits=int(magnitude))
    if name == "Solarize":
        bound = 1.0 if image.is_floating_point() else torch.iinfo(image.dtype).max
        threshold = bound * magnitude
        # above the brightest value no pixel is inverted (PIL's solarize; torchvision's refuses such thresholds)
        return image if threshold > bound else F.solarize(image, threshold=threshold)
    return UNARY[name](image)
