"""`kdcache list KIND [PATTERN]` against the real registries, and `kdcache --version`."""

import importlib.util

import pytest
from typer.testing import CliRunner

from kdcache._version import __version__
from kdcache.cli.main import app
from kdcache.corrections import CORRECTIONS
from kdcache.data import SPEC_FORMS
from kdcache.losses import LOSSES
from kdcache.models import list_models
from kdcache.views import VIEW_OPS

runner = CliRunner()


def listed(*args: str) -> list[str]:
    res = runner.invoke(app, ["list", *args])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), res.output
    return lines


def names(lines: list[str]) -> list[str]:
    """The first column: entry names start at column 0, wrapped summaries are indented."""
    return [line.split()[0] for line in lines if line and not line.startswith(" ")]


def test_models_lists_registered_torchvision_and_timm_names():
    everything = listed("models")
    assert set(list_models()) | {"resnet18", "mobilenet_v3_small", "vit_b_16"} <= set(everything)
    if importlib.util.find_spec("timm") is not None:
        assert {"timm:resnet10t", "timm:mobilenetv3_small_050"} <= set(everything)
    resnets = listed("models", "resnet*")
    assert {"resnet8x4", "resnet18"} <= set(resnets) and "small_cnn" not in resnets
    assert all(name.removeprefix("timm:").startswith("resnet") for name in resnets)


@pytest.mark.parametrize(("kind", "registry"), [("losses", LOSSES), ("corrections", CORRECTIONS),
                                                ("policies", VIEW_OPS)])
def test_registries_list_every_member_with_a_summary(kind, registry):
    lines = listed(kind)
    assert names(lines) == list(registry)
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines if not line.startswith(" ")), "a summary each"


def test_summaries_come_from_the_registry():
    kd = " ".join(line.strip() for line in listed("losses", "kd"))
    assert kd.startswith("kd ") and "Hinton KD" in kd and "T=4" in kd
    loca = " ".join(listed("corrections", "loca"))
    assert "alpha=0.9" in loca


def test_datasets_list_the_spec_forms_of_pipeline_data():
    forms = names(listed("datasets"))
    for form in SPEC_FORMS.split(", "):
        stem = form.split("<")[0].split(":")[0]
        assert any(f.startswith(stem) for f in forms), (form, forms)
    assert names(listed("datasets", "mnist*")) == [f for f in forms if f.startswith("mnist")]


def test_a_pattern_filters():
    assert names(listed("losses", "*kd")) == [n for n in LOSSES if n.endswith("kd")]
    assert names(listed("policies", "*-flip")) == ["crop-flip", "rrc-flip"]


@pytest.mark.parametrize(("args", "needle"), [(["bogus"], "unknown kind 'bogus'"),
                                              (["losses", "zz*"], "no losses match 'zz*'")])
def test_list_errors_are_one_line_exit_2(args, needle):
    res = runner.invoke(app, ["list", *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.output


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"kdcache {__version__}"
