"""Model registry, seeded construction, teacher specs and weight provenance."""

import pytest
import torch
from torch import nn

from kdcache.models import build_model, build_teacher, list_models, register_model, state_dict_sha256
from kdcache.stores.errors import SpecError

CIFAR_NETS = ["resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2"]


def test_registry():
    names = list_models()
    assert set(CIFAR_NETS + ["small_cnn", "resnet20", "resnet110", "wrn_40_1"]) <= set(names)
    assert list_models("resnet*x4") == ["resnet32x4", "resnet8x4"]
    assert "resnet18" in list_models("resnet1*", torchvision_models=True)
    with pytest.raises(ValueError, match="already registered"):
        register_model("small_cnn")(lambda num_classes: nn.Linear(1, num_classes))


@pytest.mark.parametrize("name", list_models())
def test_registered_nets_forward_small_and_cifar_sizes(name):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        for hw in ((8, 8), (32, 32)):
            assert model(torch.randn(2, 3, *hw)).shape == (2, 7)


def test_small_cnn_on_mnist_pairs_shape():
    model = build_model("small_cnn", 100)
    assert model(torch.randn(4, 3, 28, 56)).shape == (4, 100)
    assert sum(p.numel() for p in model.parameters()) < 500_000  # stays fast on CPU


def test_cifar_state_dict_names_match_reference():
    """Key names follow mdistiller, so its released checkpoints load."""
    keys = build_model("resnet8x4", 100).state_dict().keys()
    assert {"conv1.weight", "layer2.0.downsample.0.weight", "layer3.0.bn2.running_var", "fc.bias"} <= set(keys)
    keys = build_model("wrn_16_2", 100).state_dict().keys()
    assert {"block1.layer.0.convShortcut.weight", "block2.layer.1.bn1.weight", "bn1.weight", "fc.weight"} <= set(keys)
    assert "block1.layer.1.convShortcut.weight" not in keys


def test_build_model_seeded_and_leaves_global_rng_alone():
    sha = lambda m: state_dict_sha256(m.state_dict())  # noqa: E731
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("resnet8", 10, seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    assert sha(a) == sha(build_model("resnet8", 10, seed=5)) != sha(build_model("resnet8", 10, seed=6))
    tv = build_model("mobilenet_v3_small", 5, seed=1)
    assert tv.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert sha(tv) == sha(build_model("mobilenet_v3_small", 5, seed=1))


def test_unknown_model():
    with pytest.raises(SpecError, match="did you mean resnet8x4"):
        build_model("resnet8x5", 10)


def test_torchvision_none_teacher_reproducible():
    model, prov = build_teacher("torchvision:resnet18:none", 10, seed=0)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert prov["spec"] == "torchvision:resnet18:none" and prov["weights"] == "none"
    again = build_teacher("torchvision:resnet18:none", 10, seed=0)[1]
    other = build_teacher("torchvision:resnet18:none", 10, seed=1)[1]
    assert len(prov["weights_sha256"]) == 64
    assert again["weights_sha256"] == prov["weights_sha256"] != other["weights_sha256"]


def test_state_dict_round_trip(tmp_path):
    model = build_model("small_cnn", 10, seed=3)
    with torch.no_grad():  # make the BN buffers non-default so they must travel too
        model.train()(torch.randn(8, 3, 28, 28))
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    teacher, prov = build_teacher(f"small_cnn@{path}", 10)
    assert prov["weights"] == str(path)
    assert prov["weights_sha256"] == state_dict_sha256(model.state_dict())
    x = torch.randn(3, 3, 28, 28)
    assert torch.equal(teacher(x), model.eval()(x))
    # common checkpoint wrappers: {"model": state_dict} and DataParallel "module." prefixes
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 240}, wrapped)
    assert build_teacher(f"small_cnn@{wrapped}", 10)[1]["weights_sha256"] == prov["weights_sha256"]


def test_factory_teacher():
    model, prov = build_teacher("kdcache.models:small_cnn", 12, seed=2)
    assert model(torch.randn(1, 3, 8, 8)).shape == (1, 12) and prov["weights"] == "factory"
    assert prov["weights_sha256"] == build_teacher("kdcache.models:small_cnn", 12, seed=2)[1]["weights_sha256"]
    # **kwargs does not count as accepting num_classes: torchvision's resnet18() keeps its 1000 classes
    model, _ = build_teacher("torchvision.models:resnet18", 12)
    assert model.fc.out_features == 1000


class _NotAStateDict:
    pass


def test_bad_teacher_specs(tmp_path):
    missing = tmp_path / "nope.pt"
    cases = [
        ("resnet8", "unknown teacher spec 'resnet8'; expected one of: torchvision:<arch>"),
        ("", "empty teacher spec"),
        ("torchvision:no_such_net:none", "unknown model 'no_such_net'"),
        ("torchvision:resnet18:NOPE", "unknown weights 'NOPE'.*IMAGENET1K_V1"),
        (f"small_cnn@{missing}", f"'{missing}' does not exist"),
        (f"no_such_arch@{missing}", "unknown model 'no_such_arch'"),
        ("no_such_module_xyz:make", "cannot import teacher factory"),
        ("math:pi", "not callable"),
        ("builtins:dict", "not a torch nn.Module"),
    ]
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases.append((f"small_cnn@{tmp_path / 'list.pt'}", "does not hold a state dict"))
    torch.save(_NotAStateDict(), tmp_path / "pickle.pt")
    cases.append((f"small_cnn@{tmp_path / 'pickle.pt'}", "not a weights-only state dict"))
    torch.save(build_model("resnet8", 10).state_dict(), tmp_path / "resnet8.pt")
    cases.append((f"small_cnn@{tmp_path / 'resnet8.pt'}", "does not fit small_cnn"))
    cases.append((f"resnet8@{tmp_path / 'resnet8.pt'}", "does not fit resnet8 with 100 classes"))
    for spec, match in cases:
        with pytest.raises(SpecError, match=match):
            build_teacher(spec, 100 if "resnet8.pt" in spec else 10)


def test_state_dict_sha256_sensitive():
    state = build_model("small_cnn", 10).state_dict()
    base = state_dict_sha256(state)
    assert state_dict_sha256(dict(reversed(list(state.items())))) == base  # order independent
    changed = {k: v.clone() for k, v in state.items()}
    changed["head.3.bias"][0] += 1e-3
    assert state_dict_sha256(changed) != base
    renamed = {("x" + k if k == "head.3.bias" else k): v for k, v in state.items()}
    assert state_dict_sha256(renamed) != base
