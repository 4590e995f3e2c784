"""``identity``: the image as it is, resized to the output size if needed; a single view."""

from __future__ import annotations

import numpy as np

from kdcache.views.base import U8, ViewOp, resize


class Identity(ViewOp):
    """No augmentation (one view). One dummy parameter (always 0), so the store still records V = 1."""

    name = "identity"
    param_dtypes = {"identity": U8}
    num_views_all = 1

    def sample(self, rng, shape, image_hw):
        return {"identity": np.zeros(shape, dtype=np.uint8)}

    def sample_all(self, num_rows):
        return {"identity": np.zeros((1, num_rows), dtype=np.uint8)}

    def transform(self, image, params, size):
        return resize(image, size)

    def transform_batch(self, images, params, size):
        return resize(images, size)
