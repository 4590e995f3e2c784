"""The view-op interface: one augmentation step whose random choices are sampled up front and stored.

A ``ViewOp`` ``sample``s its parameters for every (view, row) at once, as arrays of shape (V, N) in
its storage dtype (already quantised: applying stored values equals applying sampled ones), and
``transform``s one image with one (view, row)'s scalars. Ops keep the image's dtype (uint8 in, uint8
out, as torchvision v2 does), so a chain of ops (``kdcache.views.pipeline``) works on uint8 pixels
and converts to float once, at the end. Parameters never depend on the output size: boxes and
offsets are fractions of the image side (``UNIT``), so stage two may replay at another resolution.

Mixing ops (``mixes = True``: Mixup, CutMix) combine the view with a partner row's view; the
pipeline draws the partner and its own view parameters, the op only says how two images mix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

from kdcache.stores.errors import SpecError

UNIT = 65535  # fractions of an image side (boxes, offsets, lambda) are stored in uint16 units of 1/UNIT
# Views a store may hold: each is a full teacher pass and 3 files (done, checksum, stats) per shard and teacher,
# and sampling holds all (V, N) parameters in memory; 1e9 views would fail deep in numpy instead.
MAX_VIEWS = 10_000
U8, U16, U32 = np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32)


class ViewOp:
    """One augmentation step. Subclasses set ``name`` (as written in a policy string), ``param_dtypes``
    and, in ``__init__``, ``self.args`` (the JSON-able constructor arguments the store records)."""

    name: str = ""
    param_dtypes: dict[str, np.dtype] = {}
    num_views_all: int | None = None  # views that can be enumerated ("--views all"), else None
    mixes: bool = False  # Mixup / CutMix: the pipeline hands it a partner image
    aspect_dependent: bool = False  # its draws depend on each image's aspect ratio (sampling needs the sizes)

    def __init__(self) -> None:
        self.args: dict[str, Any] = {}

    def sample(self, rng: np.random.Generator, shape: tuple[int, int], image_hw: np.ndarray) -> dict[str, np.ndarray]:
        """{param: ``shape`` array in ``param_dtypes``}. ``image_hw`` (float, broadcastable to (*shape, 2)) is
        each (view, row)'s source image (H, W), for ops whose draws depend on its aspect ratio."""
        raise NotImplementedError

    def sample_all(self, num_rows: int) -> dict[str, np.ndarray]:
        """The ``num_views_all`` enumerated views (only ops that set ``num_views_all``)."""
        raise SpecError(f"view op '{self.name}' cannot enumerate all views; pass an integer number of views")

    def transform(self, image: torch.Tensor, params: dict[str, Any], size: tuple[int, int]) -> torch.Tensor:
        """(C, H, W) image + one (view, row)'s scalars -> the augmented image, in the same dtype."""
        raise NotImplementedError

    def transform_batch(self, images: torch.Tensor, params: dict[str, np.ndarray], size) -> torch.Tensor:
        """(B, C, H, W) + {param: (B,)} -> (B, C, H', W'); equal to ``transform`` per image (override to vectorise)."""
        return torch.stack([self.transform(img, {k: v[b].item() for k, v in params.items()}, size)
                            for b, img in enumerate(images)])

    def spec(self) -> str:
        """The op as written in a policy string: ``name`` or ``name:key=value,...``."""
        if not self.args:
            return self.name
        return f"{self.name}:" + ",".join(f"{k}={format_value(v)}" for k, v in self.args.items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.args})"


class MixOp(ViewOp):
    """Mixup / CutMix. ``self.p`` is the probability it fires; mixing ops are tried left to right and the
    first that fires mixes the view (``kdcache.views.policy``)."""

    mixes = True

    def __init__(self, alpha: float, p: float):
        """``alpha``: the Beta(alpha, alpha) of lambda, > 0; ``p``: the probability the op fires, in (0, 1]."""
        super().__init__()
        self.alpha = check_range(self.name, "alpha", alpha, 0, math.inf, lo_open=True)
        self.p = check_range(self.name, "p", p, 0, 1, lo_open=True)
        self.args = {"alpha": self.alpha, "p": self.p}

    def mix(self, image: torch.Tensor, partner: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        """Two float32 (C, H, W) images in [0, 1] at the output size -> the mixed image."""
        raise NotImplementedError

    def weight(self, params: dict[str, Any], size: tuple[int, int]) -> float:
        """The weight of the row's own label in the mix at output ``size`` (its partner's is 1 - weight)."""
        raise NotImplementedError


def format_value(value: Any) -> str:
    """A constructor argument as a policy string writes it: 4, 0.5, uniform, 0.08..1."""
    if isinstance(value, list | tuple):
        return "..".join(format_value(v) for v in value)
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)  # the spec string must rebuild the same op
    return str(value)


def to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]; float images pass through (as float32)."""
    if image.dtype == torch.uint8:
        return F.to_dtype(image, torch.float32, scale=True)
    return image.to(torch.float32)


def resize(image: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, antialiased (as torchvision's RandomResizedCrop), in the image's dtype; a no-op at the same size."""
    size = [int(size[0]), int(size[1])]
    if list(image.shape[-2:]) != size:
        image = F.resize(image, size, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        if image.is_floating_point():
            image = image.clamp_(0.0, 1.0)
    return image


def fraction_box(params: dict[str, Any], image_hw,
                 keys=("top", "left", "height", "width")) -> tuple[int, int, int, int]:
    """A box stored as fractions of the image (uint16 units of 1/UNIT) -> pixels (top, left, height, width)
    inside an H x W image; height and width at least 1."""
    H, W = int(image_hw[0]), int(image_hw[1])
    top, left, height, width = (int(params[k]) for k in keys)
    h = min(H, max(1, math.floor(height * H / UNIT + 0.5)))
    w = min(W, max(1, math.floor(width * W / UNIT + 0.5)))
    return (min(H - h, math.floor(top * H / UNIT + 0.5)), min(W - w, math.floor(left * W / UNIT + 0.5)), h, w)


def quantise(fraction: np.ndarray) -> np.ndarray:
    """Fractions in [0, 1] -> uint16 units of 1/UNIT."""
    return np.clip(np.rint(np.asarray(fraction, dtype=np.float64) * UNIT), 0, UNIT).astype(np.uint16)


def check_range(op: str, key: str, value: Any, lo: float, hi: float, *, integer: bool = False,
                lo_open: bool = False) -> float | int:
    """A constructor argument as a number in [lo, hi] (or (lo, hi] with ``lo_open``), else one-line SpecError."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    ok = math.isfinite(number) and (lo < number if lo_open else lo <= number) and number <= hi
    if integer:
        ok = ok and number.is_integer()
    if isinstance(value, bool) or not ok:
        what = "an integer" if integer else "a number"
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise SpecError(f"view op '{op}': {key} must be {what} in {interval}; got {value!r}")
    return int(number) if integer else number
