"""View policies: stored parameters replay the same view, at any output size, deterministically."""

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.stores.errors import SpecError
from kdcache.views import UNIT, RRCFlip, get_view_policy, view_policy_from_record

POLICIES = [("identity", 1), ("crop-flip", 5), ("rrc-flip", 5)]


def _images(n=6, h=20, w=24, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _float(image):
    return F.to_dtype(image, torch.float32, scale=True)


def _smooth(h=40, w=48):
    """A smooth uint8 image: resampling it at two resolutions gives nearly the same picture."""
    y, x = torch.meshgrid(torch.linspace(0, 3, h), torch.linspace(0, 3, w), indexing="ij")
    channels = [torch.sin(x + y), torch.cos(2 * x - y), torch.sin(x * y / 3)]
    return ((torch.stack(channels) + 1) * 127.5).round().to(torch.uint8)


def _row(params, view, row):
    return {k: v[view, row].item() for k, v in params.items()}


def test_crop_flip_all_enumerates_162_views():
    policy = get_view_policy("crop-flip")
    params = policy.sample("all", 7, (32, 32), seed=0)
    assert policy.num_views_all == 162
    assert {k: (v.shape, v.dtype) for k, v in params.items()} == {
        k: ((162, 7), np.dtype(np.uint8)) for k in ("dy", "dx", "flip")}
    assert all((v == v[:, :1]).all() for v in params.values())  # view v is the same for every row
    views = {(int(params["dy"][v, 0]), int(params["dx"][v, 0]), int(params["flip"][v, 0])) for v in range(162)}
    assert views == {(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)}


def test_crop_flip_matches_pad_then_crop():
    image = _images(1)[0]
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    policy = get_view_policy("crop-flip")
    for dy, dx, flip in ((0, 0, 0), (8, 3, 1), (4, 4, 1), (2, 8, 0)):
        expected = padded[:, dy:dy + 20, dx:dx + 24]
        expected = expected.flip(-1) if flip else expected
        out = policy.apply(image, {"dy": dy, "dx": dx, "flip": flip}, (20, 24))
        assert out.dtype == torch.float32
        assert torch.equal(out, _float(expected))


@pytest.mark.parametrize("size", [(20, 24), (32, 32), (9, 11)])
def test_identity_equals_centre_crop_without_flip(size):
    image = _images(1)[0]
    identity = get_view_policy("identity").apply(image, {"identity": 0}, size)
    centre = get_view_policy("crop-flip").apply(image, {"dy": 4, "dx": 4, "flip": 0}, size)
    assert identity.shape == (3, *size) and torch.equal(identity, centre)


@pytest.mark.parametrize("name, views", POLICIES)
def test_sample_deterministic_and_dtyped(name, views):
    policy = get_view_policy(name)
    a = policy.sample(views, 50, (20, 24), seed=3)
    b = policy.sample(views, 50, (20, 24), seed=3)
    assert set(a) == set(policy.param_dtypes)
    for k, v in a.items():
        assert v.shape == (views, 50) and v.dtype == policy.param_dtypes[k]
        assert np.array_equal(v, b[k])
    if name != "identity":
        c = policy.sample(views, 50, (20, 24), seed=4)
        assert any(not np.array_equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name, views", POLICIES)
def test_stored_params_replay_exactly_at_any_size(name, views, tmp_path):
    """Params written to disk and read back give bit-identical views; other sizes only resize."""
    policy = get_view_policy(name)
    images = _images()
    params = policy.sample(views, len(images), (20, 24), seed=1)
    np.savez(tmp_path / "p.npz", **params)
    stored = dict(np.load(tmp_path / "p.npz"))
    for size in ((20, 24), (32, 32), (12, 12)):
        for row in range(len(images)):
            out = policy.apply(images[row], _row(stored, views - 1, row), size)
            assert out.shape == (3, *size) and out.dtype == torch.float32
            assert out.min() >= 0 and out.max() <= 1
            assert torch.equal(out, policy.apply(images[row], _row(params, views - 1, row), size))
        if name == "crop-flip":  # the crop happens at the source resolution, then one resize (in uint8)
            native = policy.apply(images[0], _row(params, 0, 0), (20, 24))
            resized = F.resize(native, list(size), antialias=True).clamp(0, 1)
            assert (policy.apply(images[0], _row(params, 0, 0), size) - resized).abs().max() <= 1 / 255 + 1e-6
    if name == "rrc-flip":  # the box is the same region at every output size
        big = policy.apply(_smooth(), _row(params, 0, 0), (64, 64))
        small = policy.apply(_smooth(), _row(params, 0, 0), (16, 16))
        assert (F.resize(big, [16, 16], antialias=True) - small).abs().max() < 0.05


@pytest.mark.parametrize("name, views", POLICIES)
def test_apply_batch_equals_apply(name, views):
    policy = get_view_policy(name)
    images = _images()
    params = policy.sample(views, len(images), (20, 24), seed=2)
    for size in ((20, 24), (16, 16)):
        batch = policy.apply_batch(images, {k: v[views - 1] for k, v in params.items()}, size)
        single = torch.stack([policy.apply(img, _row(params, views - 1, i), size) for i, img in enumerate(images)])
        assert torch.allclose(batch, single, atol=1e-6)


def test_rrc_params_in_range():
    policy = get_view_policy("rrc-flip")
    hw = (30, 60)
    p = {k: v.astype(np.float64) for k, v in policy.sample(20, 500, hw, seed=0).items()}
    assert (p["height"] >= 1).all() and (p["width"] >= 1).all()
    assert (p["top"] + p["height"] <= UNIT).all() and (p["left"] + p["width"] <= UNIT).all()
    area = p["height"] * p["width"] / UNIT**2
    ratio = (p["width"] * hw[1]) / (p["height"] * hw[0])
    assert area.min() >= 0.08 - 1e-3 and area.max() <= 1
    assert ratio.min() >= 0.75 - 1e-3 and ratio.max() <= 4 / 3 + 1e-3
    assert set(np.unique(p["flip"])) == {0, 1}
    assert 0.2 < area.mean() < 0.7  # torchvision's distribution, not a degenerate one


def test_rrc_full_box_is_resize_and_flip():
    image = _images(1)[0]
    policy = get_view_policy("rrc-flip")
    full = {"top": 0, "left": 0, "height": UNIT, "width": UNIT, "flip": 0}
    assert torch.equal(policy.apply(image, full, (20, 24)), _float(image))
    assert torch.equal(policy.apply(image, {**full, "flip": 1}, (20, 24)), _float(image.flip(-1)))


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 4000), w=st.integers(1, 4000), top=st.integers(0, UNIT), left=st.integers(0, UNIT),
       height=st.integers(1, UNIT), width=st.integers(1, UNIT))
def test_rrc_box_inside_any_image(h, w, top, left, height, width):
    t, l_, bh, bw = RRCFlip.box({"top": top, "left": left, "height": height, "width": width}, (h, w))
    assert t >= 0 and bh >= 1 and t + bh <= h
    assert l_ >= 0 and bw >= 1 and l_ + bw <= w


def test_record_round_trip():
    policy = get_view_policy("rrc-flip", scale=[0.2, 1.0])
    record = policy.record()
    assert record["torchvision"] == torchvision.__version__
    again = view_policy_from_record(record)
    assert again.args == policy.args and again.name == "rrc-flip"
    with pytest.raises(SpecError, match="torchvision 0.1.0"):
        view_policy_from_record({**record, "torchvision": "0.1.0"})


@pytest.mark.parametrize("make, match", [
    (lambda: get_view_policy("nosuch"), "unknown view policy 'nosuch'"),
    (lambda: get_view_policy("crop-flip", size=3), "bad arguments"),
    (lambda: get_view_policy("crop-flip", pad=-1), "pad"),
    (lambda: get_view_policy("rrc-flip", scale=(0.5, 0.1)), "scale"),
    (lambda: get_view_policy("identity").sample(2, 10, (8, 8), 0), "single view"),
    (lambda: get_view_policy("rrc-flip").sample("all", 10, (8, 8), 0), "cannot enumerate"),
    (lambda: get_view_policy("crop-flip").sample(0, 10, (8, 8), 0), ">= 1"),
])
def test_bad_policies(make, match):
    with pytest.raises(SpecError, match=match):
        make()


def test_all_views_of_identity_is_one():
    assert get_view_policy("identity").sample("all", 4, None, 0)["identity"].shape == (1, 4)
