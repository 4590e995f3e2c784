"""``crop-flip``: CIFAR's RandomCrop(H x W, padding=pad, zero fill), then a horizontal flip.

``dy, dx`` in 0..2*pad are the crop's offsets in the padded image, ``flip`` 0 or 1. ``--views all``
enumerates the (2*pad+1)^2 * 2 views (162 for pad 4), view v being the same for every row. The crop
is taken at the source resolution, then resized once to the output size.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

from kdcache.stores.errors import SpecError
from kdcache.views.base import U8, ViewOp, resize


class CropFlip(ViewOp):
    """CIFAR augmentation: RandomCrop(padding=pad, zero fill) + horizontal flip."""

    name = "crop-flip"
    param_dtypes = {"dy": U8, "dx": U8, "flip": U8}

    def __init__(self, pad: int = 4):
        super().__init__()
        if isinstance(pad, bool) or not str(pad).isdigit() or int(pad) > 127:
            raise SpecError(f"crop-flip pad must be an integer in 0..127; got {pad!r}")
        self.pad = int(pad)
        self.args = {"pad": self.pad}
        self.num_views_all = (2 * self.pad + 1) ** 2 * 2

    def sample(self, rng, shape, image_hw):
        side = 2 * self.pad + 1
        return {"dy": rng.integers(0, side, shape, dtype=np.uint8),
                "dx": rng.integers(0, side, shape, dtype=np.uint8),
                "flip": rng.integers(0, 2, shape, dtype=np.uint8)}

    def sample_all(self, num_rows):
        side = 2 * self.pad + 1
        dy, dx, flip = np.unravel_index(np.arange(self.num_views_all), (side, side, 2))
        return {k: np.repeat(a.astype(np.uint8)[:, None], num_rows, axis=1)
                for k, a in (("dy", dy), ("dx", dx), ("flip", flip))}

    def transform(self, image, params, size):
        h, w = image.shape[-2:]
        # v2 crop zero-pads outside the image: the same as padding by `pad`, then cropping at (dy, dx)
        x = F.crop(image, int(params["dy"]) - self.pad, int(params["dx"]) - self.pad, h, w)
        if int(params["flip"]):
            x = F.horizontal_flip(x)
        return resize(x, size)

    def transform_batch(self, images, params, size):
        b, _, h, w = images.shape
        p = self.pad
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        dy, dx, flip = (torch.as_tensor(np.asarray(params[k]).astype(np.int64)) for k in ("dy", "dx", "flip"))
        rows = dy[:, None] + torch.arange(h)  # (B, H)
        cols = dx[:, None] + torch.arange(w)  # (B, W)
        cols = torch.where(flip[:, None].bool(), cols.flip(1), cols)
        out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return resize(out.permute(0, 3, 1, 2).contiguous(), size)
