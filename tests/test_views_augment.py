"""The auto-augment view ops (randaugment, trivialaugment, autoaugment): torchvision's own op code and magnitudes
bit for bit, sampling that is deterministic and rightly distributed, exact replay, one-line errors."""

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcache.stores.errors import SpecError
from kdcache.views import policy_from_spec
from kdcache.views._augment_ops import (
    AUTOAUGMENT_SPACE,
    OP_INDEX,
    OP_NAMES,
    RANDAUGMENT_SPACE,
    TRIVIALAUGMENT_WIDE_SPACE,
    apply_op,
    is_signed,
)
from kdcache.views.autoaugment import POLICIES, AutoAugment
from kdcache.views.base import UNIT
from kdcache.views.randaugment import SLD_SPACE, RandAugment
from kdcache.views.trivialaugment import TrivialAugment

TORCHVISION = T.RandAugment()  # its _apply_image_or_video_transform is the reference for every op


def _random_image(h=19, w=26, seed=0):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _smooth_image(h=22, w=30):
    y, x = torch.meshgrid(torch.linspace(0, 3, h), torch.linspace(0, 3, w), indexing="ij")
    channels = [torch.sin(x + y), torch.cos(2 * x - y), torch.sin(x * y / 3)]
    return ((torch.stack(channels) + 1) * 127.5).round().to(torch.uint8)


IMAGES = [_random_image(), _smooth_image()]  # non-square, so widths and heights cannot be swapped unnoticed
VARIANTS = [RandAugment(), RandAugment(n=3, magnitude="uniform"), RandAugment(magnitude="uniform", space="sld"),
            TrivialAugment(), TrivialAugment(num_bins=8), AutoAugment(), AutoAugment("cifar10"), AutoAugment("svhn")]


def _reference_op(image, name, magnitude):
    return TORCHVISION._apply_image_or_video_transform(image, name, magnitude, interpolation=TORCHVISION.interpolation,
                                                      fill=TORCHVISION._fill)


def _reference_magnitude(space, name, num_bins, index, negate, height, width):
    """torchvision's magnitude, as its forward computes it from its own _AUGMENTATION_SPACE."""
    magnitudes_fn, signed = space[name]
    magnitudes = magnitudes_fn(num_bins, height, width)
    if magnitudes is None:
        return 0.0
    magnitude = float(magnitudes[index])
    return -magnitude if signed and negate else magnitude


def _row(params, view, row):
    return {k: v[view, row].item() for k, v in params.items()}


# ------------------------------------------------------------------ torchvision, bit for bit
@pytest.mark.parametrize("magnitude", [0, 9, 30])
def test_randaugment_bins_equal_torchvision(magnitude):
    op, space = RandAugment(n=1, magnitude=magnitude), T.RandAugment._AUGMENTATION_SPACE
    for image in IMAGES:
        h, w = image.shape[-2:]
        for name in space:
            for sign in (0, 1):
                ours = op.transform(image, {"op0": OP_INDEX[name], "mag0": magnitude, "sign0": sign}, (h, w))
                expected = _reference_op(image, name, _reference_magnitude(space, name, 31, magnitude, sign, h, w))
                assert torch.equal(ours, expected), (name, sign)


@pytest.mark.parametrize("num_bins, bins", [(31, (0, 7, 15, 30)), (5, (1, 4))])
def test_trivialaugment_bins_equal_torchvision(num_bins, bins):
    op, space = TrivialAugment(num_bins), T.TrivialAugmentWide._AUGMENTATION_SPACE
    for image in IMAGES:
        h, w = image.shape[-2:]
        for name in space:
            for mag in bins:
                for sign in (0, 1):
                    ours = op.transform(image, {"op": OP_INDEX[name], "mag": mag, "sign": sign}, (h, w))
                    expected = _reference_op(image, name, _reference_magnitude(space, name, num_bins, mag, sign, h, w))
                    assert torch.equal(ours, expected), (name, mag, sign)


@pytest.mark.parametrize("policy", list(T.AutoAugmentPolicy))
def test_autoaugment_equals_torchvision(policy):
    reference = T.AutoAugment(policy)
    op = AutoAugment(policy.value)
    assert POLICIES[policy.value] == tuple(reference._get_policies(policy))
    for image in IMAGES:
        h, w = image.shape[-2:]
        for sub, sub_policy in enumerate(reference._policies):
            for fires, negates in (((1, 1), (0, 0)), ((1, 1), (1, 1)), ((1, 0), (1, 0)), ((0, 1), (0, 1))):
                expected = image
                for (name, _, index), fire, negate in zip(sub_policy, fires, negates, strict=True):
                    if fire:
                        magnitude = _reference_magnitude(reference._AUGMENTATION_SPACE, name, 10, index, negate, h, w)
                        expected = _reference_op(expected, name, magnitude)
                params = {"sub": sub, "apply0": fires[0], "apply1": fires[1], "sign0": negates[0], "sign1": negates[1]}
                assert torch.equal(op.transform(image, params, (h, w)), expected), (sub, fires, negates)


@pytest.mark.parametrize("strength", [0, 4097, 30000, UNIT])
def test_uniform_magnitudes_apply_as_torchvision(strength):
    """Between torchvision's bins the op code is still torchvision's: the same image at the same magnitude."""
    op = RandAugment(n=1, magnitude="uniform")
    for image in IMAGES:
        h, w = image.shape[-2:]
        for name in RANDAUGMENT_SPACE:
            for sign in (0, 1):
                ours = op.transform(image, {"op0": OP_INDEX[name], "mag0": strength, "sign0": sign}, (h, w))
                expected = _reference_op(image, name, op.magnitude_of(name, strength, bool(sign), h, w))
                assert torch.equal(ours, expected), (name, sign)


def test_solarize_above_the_brightest_value_inverts_nothing():
    image = _random_image()
    assert torch.equal(apply_op(image, "Solarize", 256 / 255), image)
    assert torch.equal(apply_op(image, "Solarize", 1.0), _reference_op(image, "Solarize", 1.0))  # only 255s flip


def test_op_spaces_are_torchvisions_in_its_order():
    """Ops are drawn uniformly from the same 14, and stored indices name the ops torchvision's spaces list."""
    assert [OP_NAMES[i] for i in RandAugment().space_ops] == list(T.RandAugment._AUGMENTATION_SPACE)
    assert [OP_NAMES[i] for i in TrivialAugment().space_ops] == list(T.TrivialAugmentWide._AUGMENTATION_SPACE)
    assert set(SLD_SPACE) == set(RANDAUGMENT_SPACE)
    for space, reference in ((RANDAUGMENT_SPACE, T.RandAugment), (TRIVIALAUGMENT_WIDE_SPACE, T.TrivialAugmentWide)):
        assert {k: r is not None and r.signed for k, r in space.items()} == {
            k: signed for k, (_, signed) in reference._AUGMENTATION_SPACE.items()}


# ------------------------------------------------------------------ sampling
@pytest.mark.parametrize("op", VARIANTS, ids=repr)
def test_sample_dtypes_shapes_and_seeds(op):
    hw = np.array([[[20.0, 24.0]]])
    a = op.sample(np.random.default_rng(5), (4, 50), hw)
    b = op.sample(np.random.default_rng(5), (4, 50), hw)
    c = op.sample(np.random.default_rng(6), (4, 50), hw)
    assert list(a) and set(a) == set(op.param_dtypes)
    for k, v in a.items():
        assert v.shape == (4, 50) and v.dtype == op.param_dtypes[k], k
        assert np.array_equal(v, b[k]), k
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def _draws(op, seed=0):
    return op.sample(np.random.default_rng(seed), (200, 100), np.ones((1, 1, 2)))  # 20k draws


def _assert_signs_halve_signed_ops(ops, signs, space):
    signed = np.isin(ops, [OP_INDEX[name] for name, r in space.items() if r is not None and r.signed])
    assert abs(signs[signed].mean() - 0.5) < 0.02 and not signs[~signed].any()
    for name in space:
        chosen = ops == OP_INDEX[name]
        if signed[chosen].any():
            assert abs(signs[chosen].mean() - 0.5) < 0.07, name  # ~1400 draws each


@pytest.mark.parametrize("op", [RandAugment(magnitude=7), RandAugment(magnitude="uniform"), TrivialAugment()], ids=repr)
def test_ops_uniform_and_signs_half(op):
    params = _draws(op)
    slots = [""] if isinstance(op, TrivialAugment) else ["0", "1"]
    space = TRIVIALAUGMENT_WIDE_SPACE if isinstance(op, TrivialAugment) else RANDAUGMENT_SPACE
    for slot in slots:
        ops, signs = params["op" + slot], params["sign" + slot]
        frequencies = np.bincount(ops.ravel(), minlength=len(OP_NAMES)) / ops.size
        assert np.all(np.abs(frequencies[:14] - 1 / 14) < 0.01) and frequencies[OP_INDEX["Invert"]] == 0
        _assert_signs_halve_signed_ops(ops, signs, space)
    if len(slots) == 2:
        assert abs(np.mean(params["op0"] == params["op1"]) - 1 / 14) < 0.01  # drawn independently


def test_magnitude_draws():
    assert (_draws(RandAugment(magnitude=7))["mag1"] == 7).all()
    uniform = _draws(RandAugment(magnitude="uniform"))["mag0"] / UNIT
    assert np.all(np.abs(np.histogram(uniform, bins=10, range=(0, 1))[0] / uniform.size - 0.1) < 0.01)
    trivial = _draws(TrivialAugment(num_bins=31))["mag"]
    assert trivial.max() == 30 and np.all(np.abs(np.bincount(trivial.ravel()) / trivial.size - 1 / 31) < 0.008)
    sld = _draws(RandAugment(magnitude="uniform", space="sld"))
    assert not sld["sign0"].any() and not sld["sign1"].any()  # SLD's ranges are already signed


@pytest.mark.parametrize("policy", list(POLICIES))
def test_autoaugment_draws_follow_the_policy(policy):
    op = AutoAugment(policy)
    params = _draws(op)
    sub = params["sub"]
    counts = np.bincount(sub.ravel(), minlength=25)
    assert len(counts) == 25 and np.all(np.abs(counts / sub.size - 1 / 25) < 0.008)
    for k in (0, 1):
        fires, signs = params[f"apply{k}"], params[f"sign{k}"]
        for s, sub_policy in enumerate(POLICIES[policy]):
            name, probability, _ = sub_policy[k]
            chosen = sub == s
            assert abs(fires[chosen].mean() - probability) < 0.08, (s, k)
            if probability in (0.0, 1.0):
                assert (fires[chosen] == probability).all(), (s, k)
            fired_signs = signs[chosen & (fires == 1)]
            if not is_signed(AUTOAUGMENT_SPACE, name):
                assert not fired_signs.any(), (s, k)
            elif fired_signs.size > 100:
                assert abs(fired_signs.mean() - 0.5) < 0.12, (s, k)
        assert not signs[fires == 0].any()


# ------------------------------------------------------------------ storing and replaying
@pytest.mark.parametrize("op", VARIANTS, ids=repr)
def test_stored_params_replay_and_spec_round_trips(op, tmp_path):
    parsed = policy_from_spec(op.spec()).ops[0]
    assert type(parsed) is type(op) and parsed.args == op.args and parsed.param_dtypes == op.param_dtypes
    policy = policy_from_spec(op.spec())
    images = [_random_image(20, 24, seed) for seed in range(3)] + [_smooth_image(20, 24)]
    params = policy.sample(3, len(images), (20, 24), seed=11)
    np.savez(tmp_path / "p.npz", **params)
    with np.load(tmp_path / "p.npz") as stored:
        loaded = {k: stored[k] for k in stored.files}
    assert {k: v.dtype for k, v in loaded.items()} == policy.param_dtypes
    for view in range(3):
        for row, image in enumerate(images):
            out = policy.apply(image, _row(loaded, view, row), (20, 24))
            assert torch.equal(out, policy.apply(image, _row(params, view, row), (20, 24)))


@pytest.mark.parametrize("size", [(20, 24), (16, 16)])
def test_crop_flip_then_randaugment_pipeline(size):
    policy = policy_from_spec("crop-flip | randaugment:n=2,magnitude=uniform")
    images = torch.stack([_random_image(20, 24, seed) for seed in range(5)] + [_smooth_image(20, 24)])
    params = policy.sample(2, len(images), (20, 24), seed=3)
    assert {k.split(".")[0] for k in params} == {"0-crop-flip", "1-randaugment"}
    view = {k: v[1] for k, v in params.items()}
    batch = policy.apply_batch(images, view, size)
    one_by_one = torch.stack([policy.apply(img, _row(params, 1, b), size) for b, img in enumerate(images)])
    assert batch.dtype == torch.float32 and batch.shape == (len(images), 3, *size)
    assert batch.min() >= 0 and batch.max() <= 1
    assert torch.equal(batch, one_by_one)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("spec, match", [
    ("autoaugment:policy=coco", r"'autoaugment': policy must be one of imagenet, cifar10, svhn; got 'coco'"),
    ("randaugment:n=0", r"'randaugment': n must be an integer in \[1, 16\]; got 0"),
    ("randaugment:n=two", r"'randaugment': n must be an integer in \[1, 16\]; got 'two'"),
    ("randaugment:magnitude=31", r"'randaugment': magnitude must be an integer bin in \[0, 30\] \(num_bins=31\) or "
                                 r"'uniform'; got 31"),
    ("randaugment:magnitude=-1", r"magnitude must be an integer bin in \[0, 30\].*; got -1"),
    ("randaugment:magnitude=9,num_bins=5", r"magnitude must be an integer bin in \[0, 4\].*; got 9"),
    ("randaugment:magnitude=strong", r"magnitude must be .* or 'uniform'; got 'strong'"),
    ("randaugment:num_bins=1", r"'randaugment': num_bins must be an integer in \[2, 256\]; got 1"),
    ("trivialaugment:num_bins=1", r"'trivialaugment': num_bins must be an integer in \[2, 256\]; got 1"),
    ("trivialaugment:num_bins=many", r"'trivialaugment': num_bins must be an integer in \[2, 256\]; got 'many'"),
    ("randaugment:magnitude=uniform,space=timm", r"'randaugment': space must be one of torchvision, sld; got 'timm'"),
    ("randaugment:space=sld", r"'randaugment': space=sld draws every magnitude uniformly.*pass magnitude=uniform"),
])
def test_bad_arguments_are_one_line_spec_errors(spec, match):
    with pytest.raises(SpecError, match=match) as err:
        policy_from_spec(spec)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ magnitude mappings
SIDES = st.integers(1, 600)


@settings(max_examples=60, deadline=None)
@given(num_bins=st.integers(2, 256), height=SIDES, width=SIDES)
def test_bins_are_torchvisions_linspace(num_bins, height, width):
    for space, reference in ((RANDAUGMENT_SPACE, T.RandAugment), (TRIVIALAUGMENT_WIDE_SPACE, T.TrivialAugmentWide)):
        for name, magnitudes in space.items():
            expected = reference._AUGMENTATION_SPACE[name][0](num_bins, height, width)
            if magnitudes is None:
                assert expected is None, name
            else:
                assert torch.equal(magnitudes.bins(num_bins, height, width), expected), name


@settings(max_examples=200, deadline=None)
@given(strength=st.integers(0, UNIT), negate=st.booleans(), height=SIDES, width=SIDES)
def test_uniform_strength_maps_onto_torchvisions_full_range(strength, negate, height, width):
    op = RandAugment(magnitude="uniform")
    for name, (magnitudes_fn, signed) in T.RandAugment._AUGMENTATION_SPACE.items():
        value = op.magnitude_of(name, strength, negate, height, width)
        ends = magnitudes_fn(2, height, width)  # torchvision's weakest and strongest magnitudes
        if ends is None:
            assert value == 0.0, name
            continue
        weakest, strongest = float(ends[0]), float(ends[1])
        expected = weakest + (strongest - weakest) * strength / UNIT
        tolerance = 0.5 if name == "Posterize" else 1e-6 * max(1.0, abs(strongest))  # bits round; float32 ends
        sign = -1 if signed and negate else 1
        assert abs(value - sign * expected) <= tolerance, name
        assert min(weakest, strongest) - tolerance <= sign * value <= max(weakest, strongest) + tolerance, name


@settings(max_examples=200, deadline=None)
@given(strength=st.integers(0, UNIT), width=SIDES, height=SIDES)
def test_sld_strength_maps_onto_slds_ranges(strength, width, height):
    """SLD's augment_list() ranges (mdistiller/dataset/cifar100.py), in the units apply_op takes."""
    op, u = RandAugment(magnitude="uniform", space="sld"), strength / UNIT
    value = {name: op.magnitude_of(name, strength, True, height, width) for name in SLD_SPACE}  # SLD never negates
    assert value["Posterize"] == int(4 + 4 * u)  # SLD: int(uniform(4, 8)) bits
    for name in ("Brightness", "Color", "Contrast", "Sharpness"):
        assert math.isclose(1 + value[name], 0.05 + 0.9 * u, abs_tol=1e-12)  # enhance factor in [0.05, 0.95]
    assert math.isclose(value["Rotate"], -30 + 60 * u, abs_tol=1e-9)
    assert math.isclose(value["ShearX"], -0.3 + 0.6 * u, abs_tol=1e-12)
    assert math.isclose(255 * value["Solarize"], 256 * u, abs_tol=1e-9)  # threshold in [0, 256]
    shift = value["TranslateX"]  # PIL moves the picture by -v * W, v in [-0.3, 0.3], to a whole pixel
    assert shift == round(shift) and abs(shift + (-0.3 + 0.6 * u) * width) <= 0.5 + 1e-9
    assert value["Identity"] == value["AutoContrast"] == value["Equalize"] == 0.0
