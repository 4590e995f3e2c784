"""Cutout, RandomErasing, Mixup and CutMix: stored parameters replay exactly, follow their reference
implementations (SLD's Cutout, torchvision's RandomErasing, timm's Mixup / CutMix) and mix through the policy."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from torchvision.transforms import v2

from kdcache.stores.errors import SpecError
from kdcache.views import UNIT, policy_from_spec
from kdcache.views.base import fraction_box
from kdcache.views.cutmix import CutMix
from kdcache.views.cutout import SLD_FILL, Cutout
from kdcache.views.random_erasing import NOISE_MEAN, NOISE_STD

OPS = ["cutout", "cutout:0.3,fill=0", "random-erasing", "random-erasing:p=1,value=random", "mixup", "cutmix:0.4"]
MIXING = "crop-flip | cutmix:alpha=1,p=0.5 | mixup:alpha=0.8"


def _images(n=6, h=32, w=32, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _row(params, view, row):
    return {k: v[view, row].item() for k, v in params.items()}


def _op(spec):
    return policy_from_spec(f"crop-flip | {spec}").ops[1]


def _changed(a, b):
    """The bounding box (top, left, height, width) of the pixels where two images differ; it must be a full box."""
    ys, xs = np.nonzero((a != b).any(0).numpy())
    top, left, h, w = ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert len(ys) == h * w
    return top, left, h, w


@pytest.mark.parametrize("spec", OPS)
def test_params_dtyped_deterministic_and_spec_round_trip(spec):
    op = _op(spec)
    hw = np.array([32.0, 48.0])
    a = op.sample(np.random.default_rng(0), (4, 50), hw)
    b = op.sample(np.random.default_rng(0), (4, 50), hw)
    c = op.sample(np.random.default_rng(1), (4, 50), hw)
    assert set(a) == set(op.param_dtypes)
    for k, v in a.items():
        assert v.shape == (4, 50) and v.dtype == op.param_dtypes[k]
        assert np.array_equal(v, b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    rebuilt = _op(op.spec())
    assert type(rebuilt) is type(op) and rebuilt.args == op.args and rebuilt.spec() == op.spec()


@pytest.mark.parametrize("spec", ["crop-flip | cutout:0.5", "crop-flip | random-erasing:p=0.8,value=random",
                                  "crop-flip | cutout | random-erasing", MIXING])
def test_stored_params_replay_bit_identically(spec, tmp_path):
    policy = policy_from_spec(spec)
    images = _images()
    params = policy.sample(3, len(images), (32, 32), seed=1)
    assert set(params) == set(policy.param_dtypes)
    np.savez(tmp_path / "p.npz", **params)
    stored = dict(np.load(tmp_path / "p.npz"))
    for size in ((32, 32), (48, 40)):
        for view in range(3):
            for row in range(len(images)):
                mine, theirs = _row(params, view, row), _row(stored, view, row)
                partner = images[mine["partner"]] if policy.mixes else None
                out = policy.apply(images[row], theirs, size, partner=partner)
                assert out.shape == (3, *size) and out.dtype == torch.float32
                assert torch.equal(out, policy.apply(images[row], mine, size, partner=partner))


# ---------------------------------------------------------------------------------------------------- cutout
def _sld_cutout(image, params):
    """SLD's ``CutoutAbs`` (mdistiller/dataset/cifar100.py) on a PIL image, with its draws taken from ``params``."""
    img = Image.fromarray(image.permute(1, 2, 0).numpy())
    w, h = img.size
    v = params["side"] / UNIT * w
    if v <= 0:
        return image
    x0 = 1 + params["cx"] / UNIT * (w - 1)  # np.random.uniform(w): uniform over (1, w]
    y0 = 1 + params["cy"] / UNIT * (h - 1)
    x0, y0 = int(max(0, x0 - v / 2.0)), int(max(0, y0 - v / 2.0))
    x1, y1 = min(w, x0 + v), min(h, y0 + v)
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), SLD_FILL)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("hw", [(32, 32), (20, 36)])
def test_cutout_is_sld_hole_and_exactly_its_box(hw):
    op = Cutout()
    images = _images(40, *hw)
    params = op.sample(np.random.default_rng(0), (1, 40), np.array(hw, dtype=float))
    for row, image in enumerate(images):
        p = _row(params, 0, row)
        out = op.transform(image, p, hw)
        assert torch.equal(out, _sld_cutout(image, p))
        top, left, h, w = op.box(p, hw)
        inside = torch.zeros(hw, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert torch.equal(out[:, ~inside], image[:, ~inside])
        assert (out[:, inside] == torch.tensor(SLD_FILL)[:, None]).all()


def test_cutout_keeps_its_side_at_top_left_and_clips_at_bottom_right():
    """SLD clamps the corner at 0 before adding the side: only the bottom and right borders clip the hole."""
    side = round(0.3 * UNIT)  # 9.6 pixels at 32: PIL fills int(v) + 1 = 10
    assert Cutout.box({"cy": 0, "cx": 0, "side": side}, (32, 32)) == (0, 0, 10, 10)
    assert Cutout.box({"cy": UNIT, "cx": UNIT, "side": side}, (32, 32)) == (27, 27, 5, 5)
    assert Cutout.box({"cy": UNIT // 2, "cx": UNIT // 2, "side": 0}, (32, 32))[2] == 0  # no hole
    image = _images(1)[0]
    assert torch.equal(Cutout().transform(image, {"cy": 5, "cx": 5, "side": 0}, (32, 32)), image)


def test_cutout_sizes_and_centres_in_range():
    draws = Cutout(0.4).sample(np.random.default_rng(3), (4, 5000), np.ones(2))
    p = {k: v.astype(np.float64) / UNIT for k, v in draws.items()}
    assert p["side"].min() >= 0 and p["side"].max() <= 0.4
    assert abs(p["side"].mean() - 0.2) < 0.005 and abs(np.median(p["side"]) - 0.2) < 0.01  # U[0, 0.4)
    for centre in (p["cy"], p["cx"]):
        assert centre.min() >= 0 and centre.max() <= 1 and abs(centre.mean() - 0.5) < 0.01
        assert np.histogram(centre, bins=4, range=(0, 1))[0].min() > 4000  # uniform


@pytest.mark.parametrize("spec, hole", [("crop-flip | cutout:0.5", {"side": 0}),
                                         ("crop-flip | random-erasing:p=1,value=77", {"erase": 0})])
def test_hole_at_the_same_relative_place_at_two_sizes(spec, hole):
    policy = policy_from_spec(spec)
    image = torch.full((3, 32, 32), 255, dtype=torch.uint8)
    params = policy.sample(30, 1, (32, 32), seed=5)
    op_prefix = f"1-{policy.ops[1].name}."
    seen = 0
    for view in range(30):
        p = _row(params, view, 0)
        without = p | {op_prefix + k: v for k, v in hole.items()}
        if p == without:
            continue
        boxes = [np.array(_changed(policy.apply(image, p, size), policy.apply(image, without, size))) / size[0]
                 for size in ((32, 32), (64, 64))]
        assert np.abs(boxes[0] - boxes[1]).max() <= 2 / 32
        seen += 1
    assert seen > 20


# ---------------------------------------------------------------------------------------------------- erasing
@pytest.mark.parametrize("value", [77, "random"])
def test_random_erasing_fills_exactly_the_stored_box(value):
    op = _op(f"random-erasing:p=1,value={value}")
    hw = (24, 40)
    images = _images(30, *hw)
    params = op.sample(np.random.default_rng(0), (1, 30), np.array(hw, dtype=float))
    assert params["erase"].all()
    noise = []
    for row, image in enumerate(images):
        p = _row(params, 0, row)
        out = op.transform(image, p, hw)
        top, left, h, w = fraction_box(p, hw)
        inside = torch.zeros(hw, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert torch.equal(out[:, ~inside], image[:, ~inside])
        if value == "random":
            noise.append(out[:, inside].double().flatten())
            assert not torch.equal(out[:, inside], image[:, inside])
        else:
            assert (out[:, inside] == value).all()
        assert torch.equal(op.transform(image, p | {"erase": 0}, hw), image)
    if value == "random":
        noise = torch.cat(noise)
        assert abs(noise.mean() - NOISE_MEAN) < 3 and abs(noise.std() - NOISE_STD) < 3


def _torchvision_boxes(h, w, n, scale, ratio):
    """(erased, area fraction, aspect h / w, relative top) of n calls of torchvision v2 RandomErasing's draws."""
    torch.manual_seed(0)
    erasing = v2.RandomErasing(p=1.0, scale=scale, ratio=ratio)
    image = torch.empty(3, h, w)
    rows = []
    for _ in range(n):
        box = erasing.make_params([image])
        erased = box["v"] is not None
        rows.append((erased, box["h"] * box["w"] / (h * w), box["h"] / box["w"],
                     box["i"] / max(1, h - box["h"]) if erased else 0.5))
    return np.array(rows, dtype=np.float64).T


@pytest.mark.parametrize("scale, ratio", [((0.02, 0.33), (0.3, 3.3)), ((0.3, 0.9), (0.5, 3.0))])
def test_random_erasing_matches_torchvision_distribution(scale, ratio):
    h, w, n = 300, 420, 3000
    op = _op(f"random-erasing:p=0.7,scale={scale[0]}..{scale[1]},ratio={ratio[0]}..{ratio[1]}")
    p = {k: v[0].astype(np.float64) / UNIT for k, v in op.sample(np.random.default_rng(0), (1, n), (h, w)).items()}
    erased = p["erase"] > 0
    tv_erased, tv_area, tv_aspect, tv_top = _torchvision_boxes(h, w, n, scale, ratio)
    # erase rate: p times the chance a try fits (torchvision's make_params runs once p has fired)
    assert abs(erased.mean() - 0.7 * tv_erased.mean()) < 0.03
    box_h, box_w, top = p["height"][erased], p["width"][erased], p["top"][erased]
    area, aspect, top = box_h * box_w, box_h * h / (box_w * w), top / np.maximum(1 - box_h, 1e-9)
    tv = tv_erased > 0
    assert area.min() >= scale[0] * 0.99 and area.max() <= scale[1] * 1.01
    assert aspect.min() >= ratio[0] * 0.99 and aspect.max() <= ratio[1] * 1.01
    for ours, theirs in ((area, tv_area[tv]), (np.log(aspect), np.log(tv_aspect[tv])), (top, tv_top[tv])):
        spread = theirs.max() - theirs.min()
        quantiles = np.linspace(0.1, 0.9, 9)
        assert np.abs(np.quantile(ours, quantiles) - np.quantile(theirs, quantiles)).max() < 0.05 * spread


# ---------------------------------------------------------------------------------------------------- mixing
def _pre_view(image, params, size, partner=False):
    """The crop-flip view before any mix, rendered by a one-op policy from the stored (or partner's) params."""
    prefix = "partner.0-crop-flip." if partner else "0-crop-flip."
    crop = policy_from_spec("crop-flip")
    return crop.apply(image, {k: params[prefix + k] for k in ("dy", "dx", "flip")}, size)


def test_mixing_policy_samples_partners_and_switches_ops():
    policy = policy_from_spec(MIXING)
    params = policy.sample(4, 500, (32, 32), seed=0)
    crop = {f"{who}0-crop-flip.{k}" for who in ("", "partner.") for k in ("dy", "dx", "flip")}
    assert crop | {"mix", "partner", "1-cutmix.cy", "1-cutmix.cx", "1-cutmix.cut", "2-mixup.lam"} == set(params)
    assert (params["partner"] != np.arange(500)).all() and params["partner"].max() < 500
    assert set(np.unique(params["mix"])) == {1, 2}  # mixup (p=1) takes every view cutmix leaves
    assert abs((params["mix"] == 1).mean() - 0.5) < 0.03
    assert not np.array_equal(params["partner.0-crop-flip.dy"], params["0-crop-flip.dy"])


@pytest.mark.parametrize("size", [(32, 32), (40, 24)])
def test_mixed_views_equal_their_definitions(size):
    policy = policy_from_spec(MIXING)
    images = _images(8)
    params = policy.sample(3, len(images), (32, 32), seed=2)
    flat = {k: v.reshape(-1) for k, v in params.items()}
    weights = policy.mix_weights(flat, size)
    fired = {1: 0, 2: 0}
    for view in range(3):
        for row in range(len(images)):
            p = _row(params, view, row)
            partner = images[p["partner"]]
            out = policy.apply(images[row], p, size, partner=partner)
            own, theirs = _pre_view(images[row], p, size), _pre_view(partner, p, size, partner=True)
            weight = weights[view * len(images) + row]
            if p["mix"] == 2:
                lam = p["2-mixup.lam"] / UNIT
                expected = lam * own.double() + (1 - lam) * theirs.double()
                assert (out.double() - expected).abs().max() < 1e-6
                assert weight == lam
            else:
                y0, y1, x0, x1 = CutMix.box({k: p["1-cutmix." + k] for k in ("cy", "cx", "cut")}, size)
                inside = torch.zeros(size, dtype=torch.bool)
                inside[y0:y1, x0:x1] = True
                assert torch.equal(out[:, inside], theirs[:, inside])
                assert torch.equal(out[:, ~inside], own[:, ~inside])
                assert weight == pytest.approx(1 - inside.sum().item() / (size[0] * size[1]), abs=1e-12)
            fired[p["mix"]] += 1
    assert min(fired.values()) > 0


@pytest.mark.parametrize("alpha", [0.2, 0.8, 2.0])
def test_lambda_is_beta(alpha):
    variance = 1 / (4 * (2 * alpha + 1))  # Beta(alpha, alpha): mean 1/2
    lam = _op(f"mixup:{alpha}").sample(np.random.default_rng(0), (4, 5000), np.ones(2))["lam"] / UNIT
    cut = _op(f"cutmix:{alpha}").sample(np.random.default_rng(0), (4, 5000), np.ones(2))["cut"] / UNIT
    for draws in (lam, 1 - cut**2):  # CutMix's side is sqrt(1 - lambda)
        assert abs(draws.mean() - 0.5) < 0.01
        assert abs(draws.var() - variance) < 0.1 * variance


def test_cutmix_weights_match_timm():
    """The label weight of a CutMix view at 32 x 32 is distributed as timm's corrected lambda."""
    mixup = pytest.importorskip("timm.data.mixup")
    np.random.seed(0)
    theirs = [mixup.cutmix_bbox_and_lam((3, 32, 32), np.random.beta(1.0, 1.0))[1] for _ in range(4000)]
    params = _op("cutmix").sample(np.random.default_rng(0), (1, 4000), np.ones(2))
    ours = [CutMix().weight({k: v[0, i] for k, v in params.items()}, (32, 32)) for i in range(4000)]
    quantiles = np.linspace(0.05, 0.95, 19)
    assert np.abs(np.quantile(ours, quantiles) - np.quantile(theirs, quantiles)).max() < 0.03
    assert abs(np.mean(ours) - np.mean(theirs)) < 0.015


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 4000), w=st.integers(1, 4000), cy=st.integers(0, UNIT), cx=st.integers(0, UNIT),
       cut=st.integers(0, UNIT))
def test_cutmix_box_inside_any_image(h, w, cy, cx, cut):
    params = {"cy": cy, "cx": cx, "cut": cut}
    y0, y1, x0, x1 = CutMix.box(params, (h, w))
    assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
    weight = CutMix().weight(params, (h, w))
    assert 0 <= weight <= 1 and weight == 1 - (y1 - y0) * (x1 - x0) / (h * w)
    if cut == 0:
        assert weight == 1


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("spec, match", [
    ("mixup:alpha=0", r"'mixup': alpha must be a number in \(0, inf\]; got 0"),
    ("cutmix:alpha=-1", r"'cutmix': alpha must be a number in \(0, inf\]"),
    ("mixup:p=0", r"'mixup': p must be a number in \(0, 1\]; got 0"),
    ("cutmix:p=1.5", r"'cutmix': p must be a number in \(0, 1\]; got 1.5"),
    ("cutout:0", r"'cutout': size must be a number in \(0, 1\]; got 0"),
    ("cutout:size=1.5", r"'cutout': size must be a number in \(0, 1\]"),
    ("cutout:fill=300", r"'cutout': fill must be an integer in \[0, 255\]; got 300"),
    ("random-erasing:scale=0.5..0.1", r"'random-erasing': scale must be min..max with min <= max; got 0.5..0.1"),
    ("random-erasing:ratio=3.3..0.3", r"'random-erasing': ratio must be min..max with min <= max"),
    ("random-erasing:scale=0.5", r"'random-erasing': scale must be a range min..max; got 0.5"),
    ("random-erasing:value=300", r"'random-erasing': value must be an integer in \[0, 255\] or 'random'; got 300"),
    ("random-erasing:value=nosuch", r"'random-erasing': value must be an integer .* or 'random'; got 'nosuch'"),
])
def test_bad_arguments_are_one_line_spec_errors(spec, match):
    with pytest.raises(SpecError, match=match) as err:
        policy_from_spec(f"crop-flip | {spec}")
    assert "\n" not in str(err.value)
