"""``autoaugment``: AutoAugment, one of a policy's 25 learned sub-policies of two ops, each firing by its probability.

torchvision 0.29's ``v2.AutoAugment`` (``transforms/v2/_auto_augment.py``; the policies of the AutoAugment paper,
arXiv:1805.09501, transcribed from its ``_get_policies``), magnitudes from 10 bins. The sub-policy, whether each
op fires and the sign of signed ops are drawn here and stored, so replay applies bit for bit what torchvision
would with the same draws.
"""

from __future__ import annotations

import numpy as np

from kdcache.stores.errors import SpecError
from kdcache.views._augment_ops import AUTOAUGMENT_SPACE, apply_op, bin_magnitude, is_signed
from kdcache.views.base import U8, ViewOp

NUM_BINS = 10
SubPolicy = tuple[tuple[str, float, int | None], tuple[str, float, int | None]]  # ((op, probability, bin), ...)
POLICIES: dict[str, tuple[SubPolicy, ...]] = {
    "imagenet": (
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
        (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
        (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
        (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
        (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
        (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
        (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
        (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ),
    "cifar10": (
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
        (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
        (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
        (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
        (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
        (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
        (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
        (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
        (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
        (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
        (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
        (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
        (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ),
    "svhn": (
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)),
        (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)),
        (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)),
        (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)),
        (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)),
        (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)),
        (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)),
        (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)),
        (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ),
}


class AutoAugment(ViewOp):
    """AutoAugment: a random sub-policy of two ops (ImageNet, CIFAR-10 or SVHN), each firing by its probability.

    ``sub`` (the sub-policy), ``apply0``/``apply1`` (1: that op fires), ``sign0``/``sign1`` (1: its magnitude
    is negated)."""

    name = "autoaugment"
    param_dtypes = {"sub": U8, "apply0": U8, "apply1": U8, "sign0": U8, "sign1": U8}

    def __init__(self, policy: str = "imagenet"):
        super().__init__()
        if not isinstance(policy, str) or policy not in POLICIES:
            raise SpecError(f"view op '{self.name}': policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        self.sub_policies = POLICIES[policy]
        self.args = {"policy": policy}
        self.probability = np.array([[p for _, p, _ in sub] for sub in self.sub_policies])  # (25, 2)
        self.signed = np.array([[is_signed(AUTOAUGMENT_SPACE, name) for name, _, _ in sub]
                                for sub in self.sub_policies], dtype=np.uint8)

    def sample(self, rng, shape, image_hw):
        sub = rng.integers(0, len(self.sub_policies), shape)
        params = {"sub": sub.astype(np.uint8)}
        for k in (0, 1):
            fires = (rng.random(shape) < self.probability[sub, k]).astype(np.uint8)
            params[f"apply{k}"] = fires
            params[f"sign{k}"] = rng.integers(0, 2, shape, dtype=np.uint8) * self.signed[sub, k] * fires
        return params

    def transform(self, image, params, size):
        height, width = image.shape[-2:]
        for k, (name, _, index) in enumerate(self.sub_policies[int(params["sub"])]):
            if int(params[f"apply{k}"]):
                magnitude = bin_magnitude(AUTOAUGMENT_SPACE[name], NUM_BINS, index, bool(params[f"sign{k}"]),
                                          height, width)
                image = apply_op(image, name, magnitude)
        return image
