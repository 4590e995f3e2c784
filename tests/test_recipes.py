"""Recipes (``kdcache.recipes``, ``kdcache recipes``, ``kdcache train --recipe``): the papers' settings as data.

Every entry is well-formed and loads into kdcache's own registries; the values a reader would check
first are pinned against the official configs they cite (transcribed here by hand, from the files at
``kdcache.recipes.COMMITS``); flags win over a recipe; epoch-counted settings follow ``--epochs``; and
a recipe that does not exist or does not fit the store is one line, exit 2, through the real CLI.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import manifest_for, runner

import kdcache
import kdcache.train
from kdcache.cli.main import app
from kdcache.corrections import CORRECTIONS
from kdcache.losses import resolve_hparams
from kdcache.recipes import (
    COMMITS,
    FAMILIES,
    RECIPES,
    DatasetFamily,
    RecipeScaledWarning,
    RecipeViewsWarning,
    check_fits,
    check_views,
    family_of,
    get_recipe,
    markdown_table,
    recipe_teach_flags,
    resolve_recipe,
    scale_milestones,
    select,
    set_fields,
    with_recipe,
)
from kdcache.stores.errors import SpecError
from kdcache.stores.logit_store import LogitStore
from kdcache.train import TrainConfig
from kdcache.views import policy_from_spec, view_groups

ROOT = Path(__file__).resolve().parents[1]
STRONG = "crop-flip | randaugment:n=2,magnitude=uniform,space=sld | cutout:0.5"


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(res) -> str:
    """The single `error: ...` line of a refused command (exit 2)."""
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


def cifar_attrs(view_policy: dict | None = None, spec: str = "torchvision:CIFAR100", classes: int = 100) -> dict:
    """Root attrs as `kdcache teach` records them (pipeline/teach.py store_attrs), for a CIFAR-100 store."""
    return {"identity": {"dataset": spec}, "num_classes": classes,
            "dataset": {"spec": spec, "split": "train", "fingerprint": "x", "num_classes": classes},
            "view_policy": view_policy or {"name": "crop-flip", "args": {"pad": 4}}}


# ------------------------------------------------------------------------------------ well-formed
@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_is_well_formed_and_loads_into_kdcache(name):
    r = RECIPES[name]
    method, dataset, pair = r.name.split("/")
    assert (method, dataset) == (r.method, r.dataset) and "-" in pair
    assert r.loss == r.method.removesuffix("+sort") and r.correction in CORRECTIONS
    assert (r.correction == "sort") == r.method.endswith("+sort")
    assert r.dataset in FAMILIES and r.num_classes == FAMILIES[r.dataset].num_classes
    assert r.lr > 0 and r.epochs >= 1 and r.batch_size >= 1 and r.weight_decay >= 0 and 0 <= r.momentum < 1
    assert r.schedule == "step" and 0 < r.lr_decay < 1
    ms = r.milestones
    assert all(isinstance(m, int) and 1 <= m < r.epochs for m in ms) and list(ms) == sorted(set(ms)) and ms
    resolve_hparams(r.loss, dict(r.loss_args))  # every key is the loss's, every value valid
    assert set(r.loss_args) == set(resolve_hparams(r.loss, {}))  # every hyperparameter written out
    assert r.source and all(re.fullmatch(r"[\w.-]+/[\w.-]+:[\w./-]+", s) for s in r.source), r.source
    assert all(s.partition(":")[0] in COMMITS for s in r.source)
    assert r.view_policy == {"cifar100": "crop-flip", "imagenet": "rrc-flip"}[r.dataset]
    assert json.loads(json.dumps(r.as_dict()))["name"] == r.name


POLICY_SPECS = sorted({r.view_policy for r in RECIPES.values()}
                      | {spec for r in RECIPES.values() for _, spec in r.view_groups})


@pytest.mark.parametrize("spec", POLICY_SPECS)
def test_every_view_policy_and_group_parses(spec):
    """The strong SLD view needs the randaugment and cutout ops (kdcache.views.VIEW_OPS)."""
    policy_from_spec(spec)


def test_sld_view_groups_build():
    for r in select(method="sld"):
        assert [g for g, _ in r.view_groups] == ["weak", "strong"]
        view_groups(list(r.view_groups))


def test_one_entry_per_official_config():
    cifar_pairs = {"res32x4-res8x4", "res32x4-shuv1", "res32x4-shuv2", "res50-mv2", "res56-res20", "res110-res32",
                   "vgg13-mv2", "vgg13-vgg8", "wrn40_2-shuv1", "wrn40_2-wrn16_2", "wrn40_2-wrn40_1"}
    pairs = {m: {r.name.split("/")[2] for r in select(dataset="cifar100", method=m)} for m in ("dkd", "dkd+sort")}
    assert pairs == {"dkd": cifar_pairs, "dkd+sort": cifar_pairs}
    assert {r.name.split("/")[2] for r in select("cifar100", "sld")} == cifar_pairs | {"wrn40_2-vgg8"}
    assert [r.name for r in select("cifar100", "kd")] == ["kd/cifar100/res32x4-res8x4"]
    assert [r.name for r in select(method="ttm")] == ["ttm/cifar100/vgg13-vgg8"]
    for method in ("kd", "dkd", "sld", "kd+sort", "dkd+sort"):
        assert {r.name for r in select("imagenet", method)} == {f"{method}/imagenet/r34-r18",
                                                                f"{method}/imagenet/r50-mv1"}
    assert len(RECIPES) == 47


# ------------------------------------------------------------------------------ pinned values
DKD_BETA = {"res56-res20": 2.0, "res110-res32": 2.0, "vgg13-vgg8": 6.0, "wrn40_2-wrn16_2": 6.0,
            "wrn40_2-wrn40_1": 6.0, "vgg13-mv2": 6.0, "res32x4-res8x4": 8.0, "res32x4-shuv1": 8.0,
            "res32x4-shuv2": 8.0, "res50-mv2": 8.0, "wrn40_2-shuv1": 8.0}  # configs/cifar100/dkd/*.yaml, cfg.py
SLD_LR = {"res32x4-res8x4": 0.025, "res32x4-shuv1": 0.009, "res32x4-shuv2": 0.008, "res50-mv2": 0.008,
          "res56-res20": 0.025, "res110-res32": 0.025, "vgg13-mv2": 0.008, "vgg13-vgg8": 0.025,
          "wrn40_2-shuv1": 0.01, "wrn40_2-vgg8": 0.025, "wrn40_2-wrn16_2": 0.025,
          "wrn40_2-wrn40_1": 0.025}  # configs/cifar100/sld/*.yaml SOLVER.LR


@pytest.mark.parametrize("method", ["dkd", "dkd+sort"])
def test_dkd_cifar_beta_and_lr_per_pair(method):
    for pair, beta in DKD_BETA.items():
        r = get_recipe(f"{method}/cifar100/{pair}")
        assert dict(r.loss_args) == {"w_ce": 1.0, "alpha": 1.0, "beta": beta, "T": 4.0, "warmup": 20}
        small = r.student in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
        assert r.lr == (0.01 if small else 0.05), pair
        assert (r.epochs, r.milestones, r.batch_size, r.weight_decay, r.momentum) == (240, (150, 180, 210), 64,
                                                                                       5e-4, 0.9)
        stem = {"wrn40_2-wrn16_2": "wrn40_2_wrn_16_2", "wrn40_2-wrn40_1": "wrn40_2_wrn_40_1"}.get(pair,
                                                                                                pair.replace("-", "_"))
        repo = "megvii-research/mdistiller" if method == "dkd" else "StephenEkaputra/SortKD"
        assert r.source[0] == f"{repo}:configs/cifar100/dkd/{stem}.yaml"


def test_sld_cifar_lrs_loss_args_and_view_groups():
    for pair, lr in SLD_LR.items():
        r = get_recipe(f"sld/cifar100/{pair}")
        assert r.lr == lr
        assert dict(r.loss_args) == {"w_ce": 0.1, "w_kd": 0.9, "temperatures": (1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
                                     "sld_start_epoch": 150, "views": 2}
        assert r.view_groups == (("weak", "crop-flip"), ("strong", STRONG))
        stem = pair.replace("wrn16_2", "wrn_16_2").replace("wrn40_1", "wrn_40_1").replace("-", "_")
        assert r.source[0] == f"StephenEkaputra/Swapped-Logit-Distillation:configs/cifar100/sld/{stem}.yaml"


def test_imagenet_and_other_pinned_values():
    for method in ("kd", "dkd", "sld", "kd+sort", "dkd+sort"):
        for r in select("imagenet", method):
            assert (r.lr, r.epochs, r.milestones, r.batch_size, r.weight_decay) == (0.2, 100, (30, 60, 90), 512,
                                                                                    1e-4)
    assert dict(get_recipe("dkd/imagenet/r34-r18").loss_args) == {"w_ce": 1.0, "alpha": 1.0, "T": 1.0, "warmup": 1,
                                                                  "beta": 0.5}
    assert get_recipe("dkd/imagenet/r50-mv1").loss_args["beta"] == 2.0
    assert dict(get_recipe("kd/imagenet/r50-mv1").loss_args) == {"T": 1.0, "w_ce": 0.5, "w_kd": 0.5}
    sld_mv1 = get_recipe("sld/imagenet/r50-mv1").loss_args
    assert (sld_mv1["w_ce"], sld_mv1["w_kd"]) == (1.0, 0.5)
    assert get_recipe("sld/imagenet/r50-mv1").source[0].endswith("configs/imagenet/r50_mv2/sld.yaml")
    assert get_recipe("sld/imagenet/r34-r18").view_groups[1] == ("strong", STRONG.replace("crop-flip", "rrc-flip"))
    assert dict(get_recipe("kd/cifar100/res32x4-res8x4").loss_args) == {"T": 4.0, "w_ce": 0.1, "w_kd": 0.9}
    ttm = get_recipe("ttm/cifar100/vgg13-vgg8")
    assert dict(ttm.loss_args) == {"w_ce": 1.0, "gamma": 0.1, "beta": 45.0} and ttm.lr == 0.05
    assert "README" in ttm.notes and ttm.source[0] == "zkxufo/TTM:README.md"
    assert get_recipe("kd+sort/imagenet/r34-r18").correction == "sort"


# ---------------------------------------------------------------------------------- resolution
def test_flags_win_and_loss_args_merge_key_by_key():
    r = get_recipe("dkd/cifar100/vgg13-mv2")
    out = resolve_recipe(r, {"lr": 0.1, "batch_size": 128, "loss_args": {"beta": 3.0}, "weight_decay": 1e-4})
    assert (out["lr"], out["batch_size"], out["weight_decay"]) == (0.1, 128, 1e-4)
    assert out["loss_args"] == {"w_ce": 1.0, "alpha": 1.0, "beta": 3.0, "T": 4.0, "warmup": 20}
    assert (out["loss"], out["epochs"], out["milestones"], out["momentum"]) == ("dkd", 240, (150, 180, 210), 0.9)
    assert out["view_policy"] == "crop-flip" and "view_policy" not in resolve_recipe(get_recipe("sld/cifar100/"
                                                                                                "vgg13-vgg8"), {})
    with pytest.raises(SpecError, match=r"^--loss kd does not go with recipe dkd/cifar100/vgg13-mv2 \(loss dkd\)"):
        resolve_recipe(r, {"loss": "kd"})


def test_120_epochs_scale_milestones_warmup_and_the_sld_start_epoch():
    with pytest.warns(RecipeScaledWarning, match=r"is for 240 epochs; for 120 it scales milestones 150,180,210 -> "
                                                 r"75,90,105, warmup 20 -> 10"):
        dkd = resolve_recipe(get_recipe("dkd/cifar100/res32x4-res8x4"), {"epochs": 120})
    assert dkd["milestones"] == (75, 90, 105) and dkd["loss_args"]["warmup"] == 10 and dkd["epochs"] == 120
    with pytest.warns(RecipeScaledWarning, match="sld_start_epoch 150 -> 75"):
        sld = resolve_recipe(get_recipe("sld/cifar100/res32x4-res8x4"), {"epochs": 120})
    assert sld["loss_args"]["sld_start_epoch"] == 75 and sld["milestones"] == (75, 90, 105)
    # what you pass is not scaled, and the same epochs scale nothing (no warning)
    with pytest.warns(RecipeScaledWarning, match="warmup 20 -> 10") as caught:
        mine = resolve_recipe(get_recipe("dkd/cifar100/res32x4-res8x4"), {"epochs": 120, "milestones": (60, 100)})
    assert mine["milestones"] == (60, 100) and "milestones" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = resolve_recipe(get_recipe("sld/cifar100/res32x4-res8x4"), {"epochs": 240})
        kept = resolve_recipe(get_recipe("dkd/cifar100/res32x4-res8x4"),
                              {"epochs": 120, "milestones": (60,), "loss_args": {"warmup": 20}})
    assert same["loss_args"]["sld_start_epoch"] == 150 and kept["loss_args"]["warmup"] == 20
    assert scale_milestones((150, 180, 210), 2 / 240) == (1, 2, 3)  # a tiny run: still strictly ascending
    with pytest.warns(RecipeScaledWarning, match="warmup 1 -> 1|milestones 30,60,90 -> 15,30,45"):
        half = resolve_recipe(get_recipe("dkd/imagenet/r34-r18"), {"epochs": 50})
    assert half["loss_args"]["warmup"] == 1 and half["milestones"] == (15, 30, 45)


def test_a_library_config_counts_the_fields_that_differ_from_their_defaults():
    cfg = TrainConfig(source="s.kdc", student="resnet8x4", out="run", recipe="dkd/cifar100/vgg13-vgg8", lr=0.02)
    assert set_fields(cfg) == {"source", "student", "out", "recipe", "lr"}
    resolved = with_recipe(cfg)
    assert (resolved.loss, resolved.lr, resolved.epochs, resolved.milestones) == ("dkd", 0.02, 240, (150, 180, 210))
    assert resolved.loss_args["beta"] == 6.0 and resolved.recipe == "dkd/cifar100/vgg13-vgg8"
    assert with_recipe(TrainConfig(source="s", student="x", out="o")) == TrainConfig(source="s", student="x", out="o")
    # epochs=240 is the default: against a 100-epoch recipe it only wins when named in `explicit`
    imagenet = TrainConfig(source="s.kdc", student="resnet18", out="run", recipe="kd/imagenet/r34-r18")
    assert with_recipe(imagenet).epochs == 100
    with pytest.warns(RecipeScaledWarning):
        kept = with_recipe(imagenet, explicit=set_fields(imagenet) | {"epochs"})
    assert kept.epochs == 240 and kept.milestones == (72, 144, 216) and kept.batch_size == 512


def test_resolving_a_resolved_config_changes_and_says_nothing():
    cfg = TrainConfig(source="s.kdc", student="x", out="o", recipe="sld/cifar100/res56-res20", epochs=120)
    with pytest.warns(RecipeScaledWarning):
        once = with_recipe(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert with_recipe(once) == once
        assert with_recipe(once, explicit=set_fields(cfg)) == once


# ---------------------------------------------------------------------------------- fit checks
def test_a_recipe_fits_its_dataset_family_only():
    dkd = get_recipe("dkd/cifar100/res32x4-res8x4")
    check_fits(dkd, cifar_attrs())
    check_fits(dkd, cifar_attrs(spec="cifar100?root=/data"))
    check_fits(dkd, cifar_attrs(spec="python:MyCifar"))  # a user's dataset object: its class count decides
    check_fits(get_recipe("kd/imagenet/r34-r18"), cifar_attrs(spec="imagefolder:/data/train", classes=1000))
    check_fits(dkd, "torchvision:CIFAR100")
    assert family_of("torchvision:cifar100?download=1") is FAMILIES["cifar100"] and family_of("digits") is None
    with pytest.raises(SpecError) as err:
        check_fits(dkd, cifar_attrs(spec="digits", classes=10))
    assert str(err.value) == ("recipe dkd/cifar100/res32x4-res8x4 is for cifar100 (100 classes) but the store holds "
                              "digits (10 classes); no recipe is for that dataset: drop --recipe (recipes are for "
                              "cifar100, imagenet)")
    with pytest.raises(SpecError, match=r"pick a recipe for imagenet \(`kdcache recipes --dataset imagenet`\) or "
                                        r"drop --recipe"):
        check_fits(dkd, cifar_attrs(spec="imagefolder:/data/train", classes=1000))
    with pytest.raises(SpecError, match=r"torchvision:CIFAR100 \(10 classes\)"):
        check_fits(dkd, cifar_attrs(classes=10))
    with pytest.raises(SpecError, match="the data is torchvision:MNIST"):
        check_fits(dkd, "torchvision:MNIST")


def test_a_two_view_recipe_needs_the_stores_view_groups():
    sld = get_recipe("sld/cifar100/res32x4-res8x4")
    with pytest.raises(SpecError) as err:
        check_views(sld, {"name": "crop-flip", "args": {"pad": 4}})
    message = str(err.value)
    assert "\n" not in message and message.startswith("recipe sld/cifar100/res32x4-res8x4 trains 2 linked views "
                                                      "(weak, strong) but the store has one view group; cache it")
    assert f"--view-group weak=crop-flip --view-group 'strong={STRONG}'" in message
    with pytest.raises(SpecError, match="the store's view groups are a, b"):
        check_views(sld, {"name": "groups", "args": {"groups": [["a", "crop-flip"], ["b", STRONG]], "views": 1}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_views(sld, {"name": "groups", "args": {"groups": [["weak", "crop-flip"], ["strong", STRONG]]}})
        check_views(get_recipe("kd/cifar100/res32x4-res8x4"), {"name": "crop-flip", "args": {"pad": 4}})
    with pytest.warns(RecipeViewsWarning, match="trains on crop-flip views but the store's are identity"):
        check_views(get_recipe("kd/cifar100/res32x4-res8x4"), {"name": "identity", "args": {}})
    with pytest.warns(RecipeViewsWarning, match="trains one view policy"):
        check_views(get_recipe("kd/cifar100/res32x4-res8x4"), {"name": "groups", "args": {"groups": [["w", "x"]]}})


def test_teach_flags_make_a_store_that_fits():
    assert recipe_teach_flags(get_recipe("dkd/cifar100/res32x4-res8x4")) == [
        "--view-policy", "crop-flip", "--views", "all", "--temperatures", "1,4"]
    assert recipe_teach_flags(get_recipe("sld/cifar100/vgg13-vgg8")) == [
        "--view-group", "weak=crop-flip", "--view-group", f"strong={STRONG}", "--temperatures", "1,2,3,4,5,6"]
    assert recipe_teach_flags(get_recipe("ttm/cifar100/vgg13-vgg8"))[-2:] == ["--temperatures", "1,10"]
    assert recipe_teach_flags(get_recipe("kd/imagenet/r34-r18")) == ["--view-policy", "rrc-flip", "--temperatures",
                                                                    "1"]


# ------------------------------------------------------------------------------------------- CLI
def test_recipes_lists_every_recipe_within_80_columns():
    res = cli("recipes")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    listed = [line.split()[0] for line in lines[2:] if line and not line.startswith(" ")]
    assert listed == list(RECIPES)
    assert ["dkd/cifar100/vgg13-vgg8", "0.05", "240", "beta=6", "T=4", "warmup=20"] in [line.split() for line in lines]
    assert "  mdistiller:configs/cifar100/dkd/vgg13_vgg8.yaml" in lines


def test_recipes_filters_and_json():
    res = cli("recipes", "--dataset", "imagenet", "--method", "dkd")
    assert res.exit_code == 0, res.output
    assert [line.split()[0] for line in res.output.splitlines()[2:] if not line.startswith(" ")] == [
        "dkd/imagenet/r34-r18", "dkd/imagenet/r50-mv1"]
    res = cli("recipes", "--json")
    assert res.exit_code == 0
    entries = json.loads(res.output)
    assert [e["name"] for e in entries] == list(RECIPES)
    one = json.loads(cli("recipes", "sld/cifar100/res50-mv2", "--json").output)
    assert one["lr"] == 0.008 and one["view_groups"][1] == ["strong", STRONG]
    assert one["teach_flags"][0] == "--view-group"
    assert "unknown --dataset 'cifar10'; recipes are for cifar100, imagenet" in one_error_line(
        cli("recipes", "--dataset", "cifar10"))
    assert "no recipe is for --method ttm on --dataset imagenet" in one_error_line(
        cli("recipes", "--dataset", "imagenet", "--method", "ttm"))


def test_recipes_name_shows_the_entry_and_its_teach_flags():
    res = cli("recipes", "sld/cifar100/res32x4-shuv2")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    text = " ".join(line.strip().removesuffix("\\").strip() for line in lines)
    assert "kdcache teach torchvision:CIFAR100 --teacher TEACHER --out STORE --view-group weak=crop-flip" in text
    assert f"  STRONG='{STRONG}'" in lines  # a long policy goes into a shell variable, so lines fit 80 columns
    assert '--view-group "strong=$STRONG" --temperatures 1,2,3,4,5,6' in text
    assert "--recipe sld/cifar100/res32x4-shuv2" in text and "lr 0.008" in text
    assert "configs/cifar100/sld/res32x4_shuv2.yaml" in text and "@ f035ede" in text
    dkd = " ".join(cli("recipes", "dkd/cifar100/wrn40_2-wrn16_2").output.split())
    assert "--view-policy crop-flip --views all --temperatures 1,4" in dkd and "--student wrn_16_2" in dkd


def test_an_unknown_recipe_is_one_line():
    line = one_error_line(cli("recipes", "dkd/cifar100/res32x4-res8x"))
    assert "unknown recipe 'dkd/cifar100/res32x4-res8x'; did you mean dkd/cifar100/res32x4-res8x4" in line
    line = one_error_line(cli("train", "somewhere.kdc", "--student", "tiny_cnn", "--out", "run", "--recipe", "dkd"))
    assert "unknown recipe 'dkd'" in line and "`kdcache recipes` lists them" in line


def test_train_passes_typed_flags_as_explicit_even_at_their_defaults(monkeypatch, tmp_path):
    seen = {}

    def fake_run_train(cfg, on_epoch=None, on_step=None, *, explicit=None):
        seen["cfg"], seen["explicit"] = cfg, explicit
        return []

    monkeypatch.setattr(kdcache.train, "run_train", fake_run_train)
    res = cli("train", "s.kdc", "--student", "resnet18", "--out", str(tmp_path / "run"),
              "--recipe", "dkd/imagenet/r34-r18", "--epochs", "240", "--batch-size", "64", "--loss-arg", "beta=1")
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.milestones) == (240, 64, 0.2, 1e-4,
                                                                                      (72, 144, 216))
    assert cfg.loss == "dkd" and cfg.loss_args == {"w_ce": 1.0, "alpha": 1.0, "T": 1.0, "warmup": 2, "beta": 1.0}
    assert {"epochs", "batch_size", "loss_args", "recipe"} <= seen["explicit"]
    assert "lr" not in seen["explicit"] and "weight_decay" not in seen["explicit"]
    assert "warning: recipe dkd/imagenet/r34-r18 is for 100 epochs; for 240 it scales milestones 30,60,90 -> " \
           "72,144,216, warmup 1 -> 2" in res.output
    # a --config file's keys are set on purpose too
    (tmp_path / "c.toml").write_text('[train]\nrecipe = "kd/cifar100/res32x4-res8x4"\nepochs = 24\n')
    res = cli("train", "s.kdc", "--student", "resnet8x4", "--out", str(tmp_path / "run2"), "--config",
              str(tmp_path / "c.toml"))
    assert res.exit_code == 0, res.output
    assert (seen["cfg"].epochs, seen["cfg"].milestones, seen["cfg"].lr) == (24, (15, 18, 21), 0.05)
    # a run's config.json holds the resolved loss args, lists included; they read back as the same values
    (tmp_path / "config.json").write_text(json.dumps({"recipe": "sld/cifar100/vgg13-vgg8", "epochs": 240,
                                                      "loss_args": {"temperatures": [1.0, 2.0], "w_kd": 0.9}}))
    res = cli("train", "s.kdc", "--student", "vgg8", "--out", str(tmp_path / "run3"), "--config",
              str(tmp_path / "config.json"))
    assert res.exit_code == 0, res.output
    assert seen["cfg"].loss_args == {"w_ce": 0.1, "w_kd": 0.9, "temperatures": (1.0, 2.0), "sld_start_epoch": 150,
                                     "views": 2}


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory) -> Path:
    """A real store: digits test split, 1 crop-flip view, top-4 of the small CNN (seconds on a CPU)."""
    out = tmp_path_factory.mktemp("recipes") / "digits.kdc"
    kdcache.teach("digits", "kdcache.models:small_cnn", out, split="test", k=4, views=1, view_policy="crop-flip",
                  progress=False)
    return out


def test_train_refuses_a_recipe_for_another_dataset_on_a_real_store(digits_store, tmp_path):
    run = tmp_path / "run"
    line = one_error_line(cli("train", digits_store, "--student", "tiny_cnn", "--out", run, "--device", "cpu",
                              "--recipe", "dkd/cifar100/res32x4-res8x4"))
    assert line == ("error: recipe dkd/cifar100/res32x4-res8x4 is for cifar100 (100 classes) but the store holds "
                    "digits (10 classes); no recipe is for that dataset: drop --recipe (recipes are for cifar100, "
                    "imagenet)")
    assert not run.exists()


def test_train_with_a_recipe_end_to_end_when_its_dataset_fits(digits_store, tmp_path, monkeypatch):
    """The whole path on a real store: CIFAR-100's family is pointed at digits for this test only."""
    monkeypatch.setitem(FAMILIES, "cifar100", DatasetFamily("cifar100", 10, ("digits",), "digits"))
    run = tmp_path / "run"
    res = cli("train", digits_store, "--student", "tiny_cnn", "--out", run, "--device", "cpu", "--epochs", "2",
              "--max-steps-per-epoch", "2", "--recipe", "dkd/cifar100/vgg13-vgg8", "--loss-arg", "T=4")
    assert res.exit_code == 0, res.output
    assert "warning: recipe dkd/cifar100/vgg13-vgg8 is for 240 epochs; for 2 it scales milestones 150,180,210 " \
           "-> 1,2,3, warmup 20 -> 1" in res.output
    assert res.output.count("warning: recipe") == 1  # resolved by the CLI, then again (silently) by run_train
    config = json.loads((run / "config.json").read_text())
    assert (config["recipe"], config["loss"], config["lr"], config["epochs"], config["milestones"]) == (
        "dkd/cifar100/vgg13-vgg8", "dkd", 0.05, 2, [1, 2, 3])
    assert config["loss_args"] == {"w_ce": 1.0, "alpha": 1.0, "beta": 6.0, "T": 4.0, "warmup": 1}
    assert (run / "student.pt").is_file()
    # the run's config.json continues it: same resolved settings, so --resume accepts the checkpoint
    res = cli("train", digits_store, "--config", run / "config.json", "--resume", "--epochs", "3")
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["epochs"] == 3


def test_train_refuses_a_two_view_recipe_on_a_store_with_one_view_group(tmp_path):
    """A store that records CIFAR-100 and one crop-flip view policy (written directly; no CIFAR download)."""
    labels = np.zeros(4, dtype=np.int32)
    store = tmp_path / "cifar.kdc"
    LogitStore.create(store, labels=labels, views={}, num_views=1, manifest=manifest_for(labels),
                      attrs=cifar_attrs())
    line = one_error_line(cli("train", store, "--student", "resnet8x4", "--out", tmp_path / "run", "--device", "cpu",
                              "--recipe", "sld/cifar100/res32x4-res8x4"))
    assert "trains 2 linked views (weak, strong) but the store has one view group; cache it with `kdcache teach " \
           "... --view-group weak=crop-flip --view-group 'strong=" in line


def test_train_help_teaches_the_recipe_option():
    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "80"})
    text = " ".join(res.output.replace("│", " ").split())
    assert "--recipe" in text and "Paper settings (loss args, LR, epochs, milestones, ...) from `kdcache recipes`; " \
                                  "flags you pass win." in text


# ------------------------------------------------------------------------------------------- docs
def test_docs_hold_the_generated_table_of_every_recipe():
    doc = (ROOT / "docs" / "recipes.md").read_text()
    assert markdown_table() in doc, "docs/recipes.md is stale: regenerate it with `python -m kdcache.recipes`"
    assert all(f"`{name}`" in doc for name in RECIPES)
