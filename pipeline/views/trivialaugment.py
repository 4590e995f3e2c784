"""``trivialaugment``: TrivialAugment Wide, one op of 14 at a uniformly drawn magnitude bin, with wide ranges.

torchvision 0.29's ``v2.TrivialAugmentWide`` (``transforms/v2/_auto_augment.py``): the op, the bin in
0..num_bins-1 and the sign of signed ops are drawn here and stored, so replay applies bit for bit what
torchvision would with the same draws.
"""

from __future__ import annotations

import numpy as np

from kdcache.views._augment_ops import (
    OP_NAMES,
    TRIVIALAUGMENT_WIDE_SPACE,
    apply_op,
    bin_magnitude,
    op_indices,
    signed_ops,
)
from kdcache.views.base import U8, ViewOp, check_range


class TrivialAugment(ViewOp):
    """TrivialAugment Wide: one of 14 ops at a uniformly drawn magnitude bin, with torchvision's wide ranges.

    ``op`` (index into ``OP_NAMES``), ``mag`` (its bin), ``sign`` (1: negated)."""

    name = "trivialaugment"
    param_dtypes = {"op": U8, "mag": U8, "sign": U8}

    def __init__(self, num_bins: int = 31):
        super().__init__()
        self.num_bins = check_range(self.name, "num_bins", num_bins, 2, 256, integer=True)
        self.args = {"num_bins": self.num_bins}
        self.space_ops, self.signed = op_indices(TRIVIALAUGMENT_WIDE_SPACE), signed_ops(TRIVIALAUGMENT_WIDE_SPACE)

    def sample(self, rng, shape, image_hw):
        op = self.space_ops[rng.integers(0, len(self.space_ops), shape)]
        return {"op": op,
                "mag": rng.integers(0, self.num_bins, shape, dtype=np.uint8),
                "sign": rng.integers(0, 2, shape, dtype=np.uint8) * self.signed[op]}

    def transform(self, image, params, size):
        name = OP_NAMES[int(params["op"])]
        magnitude = bin_magnitude(TRIVIALAUGMENT_WIDE_SPACE[name], self.num_bins, int(params["mag"]),
                                  bool(params["sign"]), *image.shape[-2:])
        return apply_op(image, name, magnitude)
