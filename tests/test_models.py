"""Model registry, seeded construction, teacher specs and weight provenance."""

import importlib.util
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.models import (
    WeightsDownloadError,
    build_model,
    build_teacher,
    list_model_specs,
    list_models,
    register_model,
    state_dict_sha256,
)
from kdcache.stores.errors import SpecError
from kdcache.stores.logit_store import LogitStore

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


# ------------------------------------------------------------------------------------------ timm extra

needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="the timm extra is not installed")
TIMM_TEACHER = "timm:test_resnet"  # timm's own test net: tiny, runs at 8x8
TIMM_STUDENT = "timm:mobilenetv3_small_050"


def error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


@needs_timm
def test_timm_models_build_seeded_with_the_dataset_head():
    sha = lambda m: state_dict_sha256(m.state_dict())  # noqa: E731
    model = build_model(TIMM_STUDENT, 7, seed=1)
    assert model.eval()(torch.randn(2, 3, 8, 8)).shape == (2, 7)
    assert sha(model) == sha(build_model(TIMM_STUDENT, 7, seed=1)) != sha(build_model(TIMM_STUDENT, 7, seed=2))
    teacher, prov = build_teacher(TIMM_TEACHER, 5, seed=3)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert prov == {"spec": TIMM_TEACHER, "weights": "none", "seed": 3,
                    "weights_sha256": sha(build_model(TIMM_TEACHER, 5, seed=3))}


@needs_timm
def test_timm_checkpoint_teacher(tmp_path):
    model = build_model(TIMM_TEACHER, 10, seed=4)
    torch.save(model.state_dict(), tmp_path / "t.pt")
    teacher, prov = build_teacher(f"{TIMM_TEACHER}@{tmp_path / 't.pt'}", 10, seed=0)  # another seed: the file wins
    assert prov["weights_sha256"] == state_dict_sha256(model.state_dict())


@needs_timm
def test_timm_pretrained_without_network_is_one_line(tmp_path, monkeypatch):
    """timm's real download path, kept offline: no network and an empty Hugging Face cache."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsDownloadError, match=r"timm:test_resnet .*network.*local checkpoint"):
        build_teacher(f"{TIMM_TEACHER}:pretrained", 10)
    res = CliRunner().invoke(app, ["teach", "digits", "--teacher", f"{TIMM_TEACHER}:pretrained",
                                   "--out", str(tmp_path / "s.kdc")])
    assert "could not download pretrained weights for timm:test_resnet" in error_line(res)
    assert not (tmp_path / "s.kdc").exists()


@needs_timm
def test_timm_spec_errors():
    import timm

    with pytest.raises(SpecError, match=r"unknown timm model 'resnet10x' \(did you mean timm:resnet10t"):
        build_model("timm:resnet10x", 10)
    with pytest.raises(SpecError, match="only weights option is ':pretrained'"):
        build_teacher(f"{TIMM_TEACHER}:IMAGENET1K_V1", 10)
    no_weights = sorted(set(timm.list_models()) - {n.partition(".")[0] for n in timm.list_pretrained()})[0]
    with pytest.raises(SpecError, match=f"'{no_weights}' has no pretrained weights"):
        build_teacher(f"timm:{no_weights}:pretrained", 10)
    bare, prefixed = list_model_specs("resnet10*"), list_model_specs("timm:resnet10*")
    assert {"resnet101", "timm:resnet10t", "timm:resnet101"} <= set(bare)  # torchvision's and timm's
    assert "timm:resnet10t" in prefixed and "resnet101" not in prefixed


def test_timm_spec_without_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if the extra were not installed
    with pytest.raises(SpecError, match=r"^timm:resnet10t needs `pip install kdcache\[timm\]`$"):
        build_model("timm:resnet10t", 10)
    assert list_model_specs("resnet1*") and not any(n.startswith("timm:") for n in list_model_specs("resnet1*"))


@needs_timm
def test_timm_teacher_caches_and_timm_student_trains(tmp_path):
    runner = CliRunner()
    store = tmp_path / "timm.kdc"
    res = runner.invoke(app, ["teach", "digits", "--teacher", TIMM_TEACHER, "--k", "4", "--out", str(store),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    st = LogitStore.open(str(store))
    assert st.teachers == ["test_resnet"]
    attrs = st.teacher_attrs("test_resnet")
    assert attrs["weights_sha256"] == state_dict_sha256(build_model(TIMM_TEACHER, 10, seed=0).state_dict())
    res = runner.invoke(app, ["verify", str(store), "--teacher", TIMM_TEACHER, "--samples", "16", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(store), "--student", TIMM_STUDENT, "--loss", "kd", "--epochs", "1",
                              "--max-steps-per-epoch", "2", "--batch-size", "32", "--device", "cpu",
                              "--out", str(run)])
    assert res.exit_code == 0, res.output
    trained = torch.load(run / "student.pt", weights_only=True)
    init = build_model(TIMM_STUDENT, 10, seed=0).state_dict()
    assert trained.keys() == init.keys()
    assert any(not torch.equal(trained[k], init[k]) for k in init if init[k].is_floating_point())
