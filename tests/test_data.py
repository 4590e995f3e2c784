"""Dataset specs: shapes, labels, deterministic splits, fingerprints, offline torchvision/imagefolder."""

import copy
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from kdcache.data import load_dataset, parse_spec
from kdcache.stores.errors import SpecError


def _check_items(ds, shape, num_classes):
    assert ds.num_classes == num_classes
    assert ds.labels.dtype == np.int64 and len(ds.labels) == len(ds) == len(ds.sample_ids)
    assert ds.labels.min() >= 0 and ds.labels.max() < num_classes
    assert len(ds.mean) == len(ds.std) == 3 and all(s > 0 for s in ds.std)
    for i in (0, len(ds) - 1):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, *shape)
        assert isinstance(label, int) and label == ds.labels[i]
    image[:] = 0  # items are copies: writing to one leaves the dataset alone
    assert ds[len(ds) - 1][0].any()


@pytest.mark.parametrize("spec, shape, sizes", [("digits", (8, 8), (1437, 360)), ("mnist5k", (28, 28), (4000, 1000))])
def test_bundled_datasets(spec, shape, sizes):
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    assert (len(train), len(test)) == sizes and train.image_size == shape
    _check_items(train, shape, 10)
    _check_items(test, shape, 10)
    assert not set(train.sample_ids) & set(test.sample_ids)
    # stratified: every class in both splits, in about the same proportion
    assert np.all(np.abs(np.bincount(test.labels) / np.bincount(train.labels) - 0.25) < 0.02)
    # grayscale is repeated to 3 channels; the same normalisation serves both splits
    image = train[3][0]
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert (train.mean, train.std) == (test.mean, test.std)
    assert load_dataset(spec, "val").fingerprint() == test.fingerprint()


def test_fingerprint_stable_and_sensitive():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 64
    assert load_dataset("digits?seed=1").fingerprint() != a.fingerprint()
    assert load_dataset("digits", "test").fingerprint() != a.fingerprint()
    pixels = copy.deepcopy(a)
    pixels._fingerprint = None
    pixels._images[5, 3, 3] ^= 1
    assert pixels.fingerprint() != a.fingerprint()
    labels = copy.deepcopy(a)
    labels._fingerprint = None
    labels.labels[7] = (labels.labels[7] + 1) % 10
    assert labels.fingerprint() != a.fingerprint()


def test_mnist_pairs():
    src_train, src_test = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    by_id = {sid: (src_train, i) for i, sid in enumerate(src_train.sample_ids)}
    by_id |= {sid: (src_test, i) for i, sid in enumerate(src_test.sample_ids)}
    for split, source in (("train", src_train), ("test", src_test)):
        ds = load_dataset("mnist-pairs?n=300", split)
        assert len(ds) == 300 and ds.num_classes == 100 and ds.image_size == (28, 56)
        _check_items(ds, (28, 56), 100)
        for i in range(0, 300, 37):
            a_id, b_id = ds.sample_ids[i].split(":")[1].split("+")
            (src_a, ia), (src_b, ib) = by_id[a_id], by_id[b_id]
            assert src_a is source and src_b is source  # sources never cross the split
            assert ds.labels[i] == 10 * src_a.labels[ia] + src_b.labels[ib]
            image = ds[i][0]
            assert torch.equal(image[:, :, :28], src_a[ia][0]) and torch.equal(image[:, :, 28:], src_b[ib][0])
    # ids are "pair<i>:<a>+<b>": the (a, b) draws must be fresh pairs, not a few repeated ones (uniform draws
    # from 4 000 digits repeat about 40 000^2 / (2 * 4 000^2) = 50 of 40 000 pairs)
    full = load_dataset("mnist-pairs").sample_ids
    assert len(full) == 40000 and len({sid.split(":")[1] for sid in full}) > 39800
    assert len(load_dataset("mnist-pairs", "test")) == 5000
    first = load_dataset("mnist-pairs?n=300")
    assert first.fingerprint() == load_dataset("mnist-pairs?n=300").fingerprint()
    assert first.fingerprint() != load_dataset("mnist-pairs?n=300&seed=1").fingerprint()


def test_parse_spec():
    assert parse_spec("digits") == ("digits", {})
    assert parse_spec("torchvision:CIFAR100?root=/d&download=1") == ("torchvision:CIFAR100",
                                                                      {"root": "/d", "download": "1"})
    for bad in ("x?a", "x?a=1&a=2", "", "x?=1"):
        with pytest.raises(SpecError):
            parse_spec(bad)


@pytest.mark.parametrize("spec, split, match", [
    ("nope", "train", "unknown dataset spec 'nope'; expected one of digits, mnist5k"),
    ("digits", "dev", "unknown split"),
    ("digits?n=3", "train", "unknown argument"),
    ("mnist-pairs?n=x", "train", "must be an integer"),
    ("mnist-pairs?n=0", "train", "n >= 1"),
    ("torchvision:NoSuchSet", "train", "no dataset"),
    ("imagefolder:/no/such/dir", "train", "not a directory"),
])
def test_bad_specs(spec, split, match):
    with pytest.raises(SpecError, match=match):
        load_dataset(spec, split)


def test_torchvision_missing_without_download(tmp_path):
    with pytest.raises(SpecError, match=r"download=1"):
        load_dataset(f"torchvision:CIFAR10?root={tmp_path}")
    with pytest.raises(SpecError, match=r"download=1"):
        load_dataset(f"cifar100?root={tmp_path}", "test")


def _write_idx(path, array: np.ndarray):
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_in_memory_offline(tmp_path):
    """A fake MNIST in torchvision's raw layout goes through the in-memory (``.data``) path."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    train = load_dataset(f"torchvision:mnist?root={tmp_path}")
    test = load_dataset(f"torchvision:MNIST?root={tmp_path}", "test")
    assert (len(train), len(test)) == (12, 5) and train.in_memory
    _check_items(train, (28, 28), 10)
    assert train.mean[0] == pytest.approx(0.1307) and train.fingerprint() != test.fingerprint()


def test_torchvision_generic_offline():
    ds = load_dataset("torchvision:FakeData?size=4&num_classes=3")
    assert not ds.in_memory and ds.image_size is None and ds.num_classes == 3
    image, label = ds[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 224, 224) and 0 <= label < 3
    assert ds.fingerprint() == load_dataset("torchvision:FakeData?size=4&num_classes=3").fingerprint()
    with pytest.raises(SpecError, match="single split"):
        load_dataset("torchvision:FakeData?size=4", "test")
    with pytest.raises(SpecError, match="unknown argument 'bogus'"):
        load_dataset("torchvision:FakeData?bogus=1")


def _folder(root, sizes):
    for cls, files in sizes.items():
        (root / cls).mkdir(parents=True)
        for name, (h, w) in files.items():
            Image.new("RGB", (w, h), color=(len(name), 40, 200)).save(root / cls / name)


def test_imagefolder(tmp_path):
    _folder(tmp_path / "train", {"cat": {"a.png": (10, 12), "b.jpg": (7, 9)}, "dog": {"c.png": (5, 5)}})
    _folder(tmp_path / "val", {"dog": {"d.png": (6, 4)}})
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    spec = f"imagefolder:{tmp_path / 'train'}?val={tmp_path / 'val'}"
    train, val = load_dataset(spec), load_dataset(spec, "test")
    assert train.classes == ["cat", "dog"] and train.image_size is None
    assert train.sample_ids == ["cat/a.png", "cat/b.jpg", "dog/c.png"] and list(train.labels) == [0, 0, 1]
    assert val.sample_ids == ["dog/d.png"] and list(val.labels) == [1]
    image, label = train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 10, 12) and label == 0
    assert train.image_sizes().tolist() == [[10, 12], [7, 9], [5, 5]]
    before = train.fingerprint()
    assert load_dataset(spec).fingerprint() == before
    Image.new("RGB", (40, 40)).save(tmp_path / "train" / "dog" / "c.png")
    assert load_dataset(spec).fingerprint() != before
    with pytest.raises(SpecError, match=r"\?val="):
        load_dataset(f"imagefolder:{tmp_path / 'train'}", "test")
    with pytest.raises(SpecError, match=r"val classes \['cat'\] are not in the train folder"):
        load_dataset(f"imagefolder:{tmp_path / 'val'}?val={tmp_path / 'train'}", "test")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(SpecError, match="no images"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
