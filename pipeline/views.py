"""View policies: augmentation with explicit, stored parameters, so stage two replays exactly the
input the teacher labelled in stage one (``docs/methods.md``, "What a cache changes").

A policy ``sample``s parameters once per store, one array per parameter of shape (V, N) in its
storage dtype (already quantised, so applying stored values equals applying sampled ones), and
``apply``s one (view, row)'s parameters to an image at any output size. Parameters never depend on
the output size: stage two may replay them at another student resolution.

- ``identity``: the image, resized to the output size if needed; one view.
- ``crop-flip``: CIFAR RandomCrop(padding=pad, zero fill) + horizontal flip; ``dy, dx`` in
  0..2*pad are the crop's offsets in the padded image. ``all`` enumerates the (2*pad+1)^2 * 2 views
  (162 for pad 4), view v being the same for every row.
- ``rrc-flip``: RandomResizedCrop (scale, ratio as torchvision) + flip; the box is stored as
  fractions of the image (top, left, height, width) in uint16 units of 1/65535, so it is
  resolution independent.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision
import torchvision.transforms.v2.functional as F

from kdcache.stores.errors import SpecError

UNIT = 65535  # rrc-flip box coordinates are stored in units of 1/UNIT of the image side
# Views a store may hold: each is a full teacher pass and 3 files (done, checksum, stats) per shard and teacher,
# and sample() holds all (V, N) parameters in memory; 1e9 views would fail deep in numpy instead.
MAX_VIEWS = 10_000


def _to_float(image: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint8:
        return F.to_dtype(image, torch.float32, scale=True)
    return image.to(torch.float32)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, antialiased (as torchvision's RandomResizedCrop); a no-op at the same size."""
    size = [int(size[0]), int(size[1])]
    if list(x.shape[-2:]) != size:
        x = F.resize(x, size, interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return x.clamp_(0.0, 1.0)


class ViewPolicy:
    """Base class. Subclasses set ``name``, ``param_dtypes``, ``num_views_all`` and ``args``."""

    name: str = ""
    param_dtypes: dict[str, np.dtype] = {}
    num_views_all: int | None = None

    def __init__(self) -> None:
        self.args: dict = {}

    def record(self) -> dict:
        """What the store keeps to rebuild and check this policy (JSON-able)."""
        return {"name": self.name, "args": self.args, "torchvision": torchvision.__version__}

    def num_views(self, num_views: int | str) -> int:
        """Resolve ``num_views`` (an int, or "all" where the views can be enumerated)."""
        if num_views == "all":
            if self.num_views_all is None:
                raise SpecError(f"view policy '{self.name}' cannot enumerate all views; "
                                "pass an integer number of views")
            return self.num_views_all
        try:
            v = int(num_views)
        except (TypeError, ValueError):
            raise SpecError(f"number of views must be an integer or 'all'; got {num_views!r}") from None
        if v < 1:
            raise SpecError(f"number of views must be >= 1; got {v}")
        if v > MAX_VIEWS:
            raise SpecError(f"number of views must be at most {MAX_VIEWS} (each is a teacher pass and 3 files per "
                            f"shard); got {v}")
        return v

    def sample(self, num_views: int | str, num_rows: int, image_size=None, seed: int = 0,
               image_sizes=None) -> dict[str, np.ndarray]:
        """{param: (V, N) array in ``param_dtypes``}; deterministic in ``seed``."""
        raise NotImplementedError

    def apply(self, image: torch.Tensor, params: dict, size) -> torch.Tensor:
        """(C, H, W) uint8 or float image + one view's scalars -> float32 (C, *size) in [0, 1]."""
        raise NotImplementedError

    def apply_batch(self, images: torch.Tensor, params: dict, size) -> torch.Tensor:
        """(B, C, H, W) images + {param: (B,) values} -> (B, C, *size); equal to ``apply`` per image."""
        params = {k: np.asarray(v) for k, v in params.items()}
        return torch.stack([self.apply(img, {k: v[b] for k, v in params.items()}, size)
                            for b, img in enumerate(images)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.args})"


class Identity(ViewPolicy):
    """No augmentation. One dummy parameter (always 0) so the store still records V = 1."""

    name = "identity"
    param_dtypes = {"identity": np.dtype(np.uint8)}
    num_views_all = 1

    def sample(self, num_views, num_rows, image_size=None, seed=0, image_sizes=None):
        if self.num_views(num_views) != 1:
            raise SpecError("view policy 'identity' has a single view; pass 1 view or use crop-flip / rrc-flip")
        return {"identity": np.zeros((1, num_rows), dtype=np.uint8)}

    def apply(self, image, params, size):
        return _resize(_to_float(image), size)

    def apply_batch(self, images, params, size):
        return _resize(_to_float(images), size)


class CropFlip(ViewPolicy):
    """CIFAR augmentation: RandomCrop(H x W, padding=pad, zero fill), then horizontal flip."""

    name = "crop-flip"
    param_dtypes = {"dy": np.dtype(np.uint8), "dx": np.dtype(np.uint8), "flip": np.dtype(np.uint8)}

    def __init__(self, pad: int = 4):
        super().__init__()
        if isinstance(pad, bool) or not str(pad).isdigit() or int(pad) > 127:
            raise SpecError(f"crop-flip pad must be an integer in 0..127; got {pad!r}")
        pad = int(pad)
        self.pad = pad
        self.args = {"pad": pad}
        self.num_views_all = (2 * pad + 1) ** 2 * 2

    def sample(self, num_views, num_rows, image_size=None, seed=0, image_sizes=None):
        v = self.num_views(num_views)
        side = 2 * self.pad + 1
        if num_views == "all":
            dy, dx, flip = np.unravel_index(np.arange(v), (side, side, 2))
            return {k: np.repeat(a.astype(np.uint8)[:, None], num_rows, axis=1)
                    for k, a in (("dy", dy), ("dx", dx), ("flip", flip))}
        rng = np.random.default_rng(seed)
        return {
            "dy": rng.integers(0, side, (v, num_rows), dtype=np.uint8),
            "dx": rng.integers(0, side, (v, num_rows), dtype=np.uint8),
            "flip": rng.integers(0, 2, (v, num_rows), dtype=np.uint8),
        }

    def apply(self, image, params, size):
        h, w = image.shape[-2:]
        # v2 crop zero-pads outside the image: same as padding by `pad` then cropping at (dy, dx)
        x = F.crop(_to_float(image), int(params["dy"]) - self.pad, int(params["dx"]) - self.pad, h, w)
        if int(params["flip"]):
            x = F.horizontal_flip(x)
        return _resize(x, size)

    def apply_batch(self, images, params, size):
        x = _to_float(images)
        b, _, h, w = x.shape
        p = self.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy, dx, flip = (torch.as_tensor(np.asarray(params[k]).astype(np.int64)) for k in ("dy", "dx", "flip"))
        rows = dy[:, None] + torch.arange(h)  # (B, H)
        cols = dx[:, None] + torch.arange(w)  # (B, W)
        cols = torch.where(flip[:, None].bool(), cols.flip(1), cols)
        out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return _resize(out.permute(0, 3, 1, 2).contiguous(), size)


class RRCFlip(ViewPolicy):
    """ImageNet augmentation: RandomResizedCrop(scale, ratio) box, then horizontal flip.

    Sampling follows torchvision's ``RandomResizedCrop.get_params`` in continuous coordinates
    (10 tries, then the central crop clamped to ``ratio``), using each image's aspect ratio from
    ``image_sizes`` (N, 2) or ``image_size``; without either, images are taken to be square.
    """

    name = "rrc-flip"
    param_dtypes = {k: np.dtype(np.uint16) for k in ("top", "left", "height", "width")} | {
        "flip": np.dtype(np.uint8)}

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

    def sample(self, num_views, num_rows, image_size=None, seed=0, image_sizes=None):
        v = self.num_views(num_views)
        shape = (v, num_rows)
        if image_sizes is not None:
            hw = np.asarray(image_sizes, dtype=np.float64).reshape(num_rows, 2)
            aspect = (hw[:, 1] / hw[:, 0])[None, :]
        elif image_size is not None:
            aspect = np.full((1, num_rows), image_size[1] / image_size[0])
        else:
            aspect = np.ones((1, num_rows))
        rng = np.random.default_rng(seed)
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        hf, wf = np.zeros(shape), np.zeros(shape)
        found = np.zeros(shape, dtype=bool)
        for _ in range(10):  # the same number of draws whatever happens: deterministic in seed
            area = rng.uniform(self.scale[0], self.scale[1], shape)
            r = np.exp(rng.uniform(lo, hi, shape))
            w, h = np.sqrt(area * r / aspect), np.sqrt(area * aspect / r)  # fractions of W and H
            ok = ~found & (w <= 1) & (h <= 1)
            wf[ok], hf[ok] = w[ok], h[ok]
            found |= ok
        # torchvision's fallback: the whole image, clamped to the ratio range, centred
        aspect_b = np.broadcast_to(aspect, shape)
        fw = np.where(aspect_b > self.ratio[1], self.ratio[1] / aspect_b, 1.0)
        fh = np.where(aspect_b < self.ratio[0], aspect_b / self.ratio[0], 1.0)
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
        H, W = int(image_hw[0]), int(image_hw[1])
        h = min(H, max(1, math.floor(int(params["height"]) * H / UNIT + 0.5)))
        w = min(W, max(1, math.floor(int(params["width"]) * W / UNIT + 0.5)))
        top = min(H - h, math.floor(int(params["top"]) * H / UNIT + 0.5))
        left = min(W - w, math.floor(int(params["left"]) * W / UNIT + 0.5))
        return top, left, h, w

    def apply(self, image, params, size):
        """Crop and resize in the image's own dtype (uint8 images take torchvision's fast uint8 resize,
        as its RandomResizedCrop does on uint8 tensors: 1.6x faster than in float), then to [0, 1]."""
        top, left, h, w = self.box(params, image.shape[-2:])
        x = F.resized_crop(image, top, left, h, w, [int(size[0]), int(size[1])],
                           interpolation=F.InterpolationMode.BILINEAR, antialias=True)
        if int(params["flip"]):
            x = F.horizontal_flip(x)
        return _to_float(x).clamp_(0.0, 1.0)


VIEW_POLICIES: dict[str, type[ViewPolicy]] = {p.name: p for p in (Identity, CropFlip, RRCFlip)}


def get_view_policy(name: str, **args) -> ViewPolicy:
    """Build a policy by name; ``args`` are its constructor arguments (as stored in the store)."""
    cls = VIEW_POLICIES.get(name)
    if cls is None:
        raise SpecError(f"unknown view policy '{name}'; expected one of {', '.join(VIEW_POLICIES)}")
    try:
        return cls(**args)
    except TypeError as err:
        raise SpecError(f"bad arguments {args} for view policy '{name}': {err}") from None


def view_policy_from_record(record: dict) -> ViewPolicy:
    """Rebuild the policy a store recorded; refuse a torchvision whose major.minor differs (replay
    could then differ from what the teacher saw)."""
    stored = str(record.get("torchvision", ""))
    if stored.split(".")[:2] != torchvision.__version__.split(".")[:2]:
        raise SpecError(f"the views were made with torchvision {stored or '?'} but this is {torchvision.__version__}; "
                        f"install torchvision=={stored} to replay them exactly")
    return get_view_policy(record["name"], **record.get("args", {}))
