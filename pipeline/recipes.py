"""Paper settings as data: ``kdcache recipes`` lists them, ``kdcache train --recipe NAME`` trains with one.

Why: a loss's keyword defaults (``kdcache.losses``) are ONE setting, the CIFAR-100 res32x4->res8x4 one,
but the papers tune per teacher-student pair and dataset. DKD's beta is 2, 6 or 8 depending on the pair;
MobileNetV2/ShuffleNet students train at LR 0.01 (SLD: 0.008-0.01) where ResNets take 0.05 (SLD: 0.025);
ImageNet runs 100 epochs at batch 512. A ``Recipe`` is one official config file turned into data: the
loss hyperparameters, optimiser and schedule, the views stage one must cache, and the file(s) every
number comes from (``source``, ``owner/repo:path``, read at the commits in ``COMMITS``). Nothing here is
tuned or guessed: a value that is in no retrievable official file is left out (docs/recipes.md lists
what is missing and why).

Three rules (docs/recipes.md):

- Settings passed on purpose win. The CLI knows which flags were typed (click's parameter source);
  for a library ``TrainConfig`` a field counts as set when it differs from the field's default, and a
  ``loss_args`` key when it is present (``with_recipe``).
- Epoch counts follow ``--epochs``. When a run's epochs differ from the recipe's, the LR milestones,
  DKD's ``warmup`` and SLD's ``sld_start_epoch`` are multiplied by epochs / recipe.epochs (rounded half
  up, at least 1, milestones kept strictly ascending) and a ``RecipeScaledWarning`` says what moved.
  Left fixed, a 120-epoch SLD run would never turn its second target on (it starts after epoch 150).
- The data must fit (``check_recipe``). A CIFAR-100 recipe on a store of another dataset or class count
  is refused, and so is a two-view recipe (SLD: weak + strong) on a store with one view group; the
  refusal names the ``kdcache teach`` flags that make a fitting store (``recipe_teach_flags``).

Stage one's view policy is the one the official data loaders apply (mdistiller/dataset/cifar100.py:
RandomCrop(32, padding=4) + flip = ``crop-flip``; mdistiller/dataset/imagenet.py: RandomResizedCrop(224)
+ flip = ``rrc-flip``; SLD's ``*_strong`` loaders add RandAugment(2) with uniform random magnitudes and a
Cutout of up to half the side to a second, independent view).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import shlex
import textwrap
import warnings
from collections.abc import Collection, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from kdcache.losses import loss_temperatures, resolve_hparams
from kdcache.stores.errors import SpecError

if TYPE_CHECKING:
    from kdcache.train import TrainConfig


class RecipeScaledWarning(UserWarning):
    """A recipe's epoch-counted settings (milestones, warm-up, SLD start epoch) were scaled to --epochs."""


class RecipeViewsWarning(UserWarning):
    """The store's views are not the ones the recipe's paper trained on (the run is not the paper's)."""


# --------------------------------------------------------------------------------------------- datasets
@dataclass(frozen=True)
class DatasetFamily:
    """What a recipe's ``dataset`` accepts: dataset specs by name (a trailing ':' matches any suffix, e.g.
    every ``imagefolder:PATH``) and the class count the store must have."""

    name: str
    num_classes: int
    datasets: tuple[str, ...]
    teach_spec: str  # the DATASET of the printed `kdcache teach` example


FAMILIES: dict[str, DatasetFamily] = {
    "cifar100": DatasetFamily("cifar100", 100, ("torchvision:CIFAR100", "cifar100"), "torchvision:CIFAR100"),
    "imagenet": DatasetFamily("imagenet", 1000, ("imagenet", "torchvision:ImageNet", "imagefolder:"),
                              "imagefolder:TRAIN_DIR?val=VAL_DIR"),
}


def family_of(spec: str) -> DatasetFamily | None:
    """The family whose accepted specs name ``spec`` (case-insensitive, ``?args`` ignored), else None."""
    name = str(spec).partition("?")[0].strip().lower()
    for family in FAMILIES.values():
        for accepted in (a.lower() for a in family.datasets):
            if name == accepted or (accepted.endswith(":") and name.startswith(accepted)):
                return family
    return None


# ---------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """One official config as data. ``teacher`` / ``student`` are the config's names; ``loss`` and
    ``loss_args`` are kdcache's (``kdcache.losses``); ``correction`` is applied to the teacher at train
    time (SortKD's ``sort``). ``view_policy`` / ``view_groups`` are what stage one must cache."""

    name: str
    method: str
    loss: str
    dataset: str
    teacher: str
    student: str
    loss_args: Mapping[str, Any] = field(hash=False)
    lr: float
    epochs: int
    milestones: tuple[int, ...]
    batch_size: int
    weight_decay: float
    momentum: float
    source: tuple[str, ...]
    correction: str = "none"
    lr_decay: float = 0.1
    schedule: str = "step"
    view_policy: str = "crop-flip"
    view_groups: tuple[tuple[str, str], ...] = ()
    notes: str = ""

    @property
    def datasets(self) -> tuple[str, ...]:
        """The dataset specs this recipe fits (``FAMILIES``)."""
        return FAMILIES[self.dataset].datasets

    @property
    def num_classes(self) -> int:
        return FAMILIES[self.dataset].num_classes

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples as lists, plus the `kdcache teach` flags of a fitting store."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        out["teach_flags"] = recipe_teach_flags(self)
        return out


MDISTILLER = "megvii-research/mdistiller"
SLD_REPO = "StephenEkaputra/Swapped-Logit-Distillation"
SORTKD = "StephenEkaputra/SortKD"
TTM_REPO = "zkxufo/TTM"
# The commits every cited file was read at.
COMMITS = {
    MDISTILLER: "a08d46f10d6102bd6e3f258ca5ac880b020ea259",
    SLD_REPO: "f035edeaad2e036192f0f5b2573ec363f7e56788",
    SORTKD: "923e97ab2e954547d11b77f81d8a3f331ae2e8e5",
    TTM_REPO: "fe457b33a71ba27536ec04fe3d32c5b04963522f",
}

# The SOLVER block every CIFAR-100 yaml cited below holds (BATCH_SIZE, EPOCHS, LR_DECAY_STAGES,
# LR_DECAY_RATE, WEIGHT_DECAY, MOMENTUM; SGD), and every ImageNet yaml's (plus its LR).
CIFAR_SOLVER = {"batch_size": 64, "epochs": 240, "milestones": (150, 180, 210), "lr_decay": 0.1,
                "weight_decay": 5e-4, "momentum": 0.9}
IMAGENET_SOLVER = {"batch_size": 512, "epochs": 100, "lr": 0.2, "milestones": (30, 60, 90), "lr_decay": 0.1,
                   "weight_decay": 1e-4, "momentum": 0.9, "view_policy": "rrc-flip"}

# mdistiller/engine/cfg.py: CFG.KD (TEMPERATURE 4, CE_WEIGHT 0.1, KD_WEIGHT 0.9) and CFG.DKD (CE_WEIGHT 1.0,
# ALPHA 1.0, BETA 8.0, T 4.0, WARMUP 20), the values a yaml without that section trains with.
MDISTILLER_CFG = f"{MDISTILLER}:mdistiller/engine/cfg.py"
KD_CFG_DEFAULTS = {"T": 4.0, "w_ce": 0.1, "w_kd": 0.9}
DKD_CFG_DEFAULTS = {"w_ce": 1.0, "alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup": 20}

# DKD CIFAR-100: (recipe pair, configs/cifar100/dkd/<stem>.yaml, DISTILLER.TEACHER, DISTILLER.STUDENT,
# SOLVER.LR, DKD.BETA; None where the yaml has no DKD section, so cfg.py's 8.0 applies).
DKD_CIFAR_PAIRS: tuple[tuple[str, str, str, str, float, float | None], ...] = (
    ("res32x4-res8x4", "res32x4_res8x4", "resnet32x4", "resnet8x4", 0.05, None),
    ("res32x4-shuv1", "res32x4_shuv1", "resnet32x4", "ShuffleV1", 0.01, None),
    ("res32x4-shuv2", "res32x4_shuv2", "resnet32x4", "ShuffleV2", 0.01, None),
    ("res50-mv2", "res50_mv2", "ResNet50", "MobileNetV2", 0.01, None),
    ("res56-res20", "res56_res20", "resnet56", "resnet20", 0.05, 2.0),
    ("res110-res32", "res110_res32", "resnet110", "resnet32", 0.05, 2.0),
    ("vgg13-mv2", "vgg13_mv2", "vgg13", "MobileNetV2", 0.01, 6.0),
    ("vgg13-vgg8", "vgg13_vgg8", "vgg13", "vgg8", 0.05, 6.0),
    ("wrn40_2-shuv1", "wrn40_2_shuv1", "wrn_40_2", "ShuffleV1", 0.01, None),
    ("wrn40_2-wrn16_2", "wrn40_2_wrn_16_2", "wrn_40_2", "wrn_16_2", 0.05, 6.0),
    ("wrn40_2-wrn40_1", "wrn40_2_wrn_40_1", "wrn_40_2", "wrn_40_1", 0.05, 6.0),
)

# SLD CIFAR-100: (recipe pair, configs/cifar100/sld/<stem>.yaml, TEACHER, STUDENT, SOLVER.LR).
SLD_CIFAR_PAIRS: tuple[tuple[str, str, str, str, float], ...] = (
    ("res32x4-res8x4", "res32x4_res8x4", "resnet32x4", "resnet8x4", 0.025),
    ("res32x4-shuv1", "res32x4_shuv1", "resnet32x4", "ShuffleV1", 0.009),
    ("res32x4-shuv2", "res32x4_shuv2", "resnet32x4", "ShuffleV2", 0.008),
    ("res50-mv2", "res50_mv2", "ResNet50", "MobileNetV2", 0.008),
    ("res56-res20", "res56_res20", "resnet56", "resnet20", 0.025),
    ("res110-res32", "res110_res32", "resnet110", "resnet32", 0.025),
    ("vgg13-mv2", "vgg13_mv2", "vgg13", "MobileNetV2", 0.008),
    ("vgg13-vgg8", "vgg13_vgg8", "vgg13", "vgg8", 0.025),
    ("wrn40_2-shuv1", "wrn40_2_shuv1", "wrn_40_2", "ShuffleV1", 0.01),
    ("wrn40_2-vgg8", "wrn40_2_vgg8", "wrn_40_2", "vgg8", 0.025),
    ("wrn40_2-wrn16_2", "wrn40_2_wrn_16_2", "wrn_40_2", "wrn_16_2", 0.025),
    ("wrn40_2-wrn40_1", "wrn40_2_wrn_40_1", "wrn_40_2", "wrn_40_1", 0.025),
)
SLD_CODE = f"{SLD_REPO}:mdistiller/distillers/SLD.py"  # temperatures 1..6 (summed), gamma = 150 hard-coded
# SLD.py's six kd_loss calls per view (T = 1.0 .. 6.0) and ``gamma = 150`` (the student swap after epoch 150)
# ... and forward_train's two views (weak, strong) of every row
SLD_SCHEDULE = {"temperatures": (1.0, 2.0, 3.0, 4.0, 5.0, 6.0), "sld_start_epoch": 150, "views": 2}
STRONG_CIFAR = "crop-flip | randaugment:n=2,magnitude=uniform,space=sld | cutout:0.5"
STRONG_IMAGENET = "rrc-flip | randaugment:n=2,magnitude=uniform,space=sld | cutout:0.5"
SLD_VIEWS_NOTE = ("Two independent views per row (MultipleApply in {path}): weak = {weak}, strong = {weak} then "
                  "RandAugment(2, 10), whose m is unused: 2 of 14 ops, each at a uniform random magnitude, then "
                  "Cutout of a random size up to 0.5 of the side; CE and KD are summed over both views.")
EPOCH960_NOTE = (" The yaml's wandb PROJECT is named cifar100_baselines_epoch960, but its SOLVER.EPOCHS is 240 "
                 "(used here).")
# ImageNet pairs: mdistiller renamed configs/imagenet/r50_mv2 to r50_mv1 (commit fae6658, "fix typo"): the
# student class is MobileNet V1 (depthwise conv_dw blocks). SLD forked mdistiller before the rename.
MV1_NOTE = ("The yaml (configs/imagenet/r50_mv2) names the student MobileNetV2, but the class it builds "
            "(mdistiller/models/imagenet/mobilenetv2.py) is MobileNet V1, depthwise conv_dw blocks; mdistiller "
            "renamed the same configs r50_mv1 in commit fae6658 ('fix typo').")
SORT_NOTE = ("SortKD's configs are byte-identical to mdistiller's; the method is the sort correction of the "
             "teacher's logits (mdistiller/distillers/{which}.py, sort()), applied at train time.")


def _cifar_dkd(method: str, repo: str, pair: tuple) -> Recipe:
    name, stem, teacher, student, lr, beta = pair
    args = dict(DKD_CFG_DEFAULTS) | ({"beta": beta} if beta is not None else {})
    sortkd = method == "dkd+sort"
    return Recipe(
        name=f"{method}/cifar100/{name}", method=method, loss="dkd", dataset="cifar100", teacher=teacher,
        student=student, loss_args=MappingProxyType(args), lr=lr, **CIFAR_SOLVER,
        correction="sort" if sortkd else "none",
        source=(f"{repo}:configs/cifar100/dkd/{stem}.yaml", f"{repo}:mdistiller/engine/cfg.py",
                *((f"{SORTKD}:mdistiller/distillers/DKD.py",) if sortkd else ())),
        notes=(SORT_NOTE.format(which="DKD") + " " if sortkd else "")
        + ("DKD.BETA is cfg.py's default (the yaml has no DKD section)." if beta is None
           else "DKD.BETA is the yaml's; the other DKD settings are cfg.py's defaults."))


def _cifar_kd(method: str, repo: str) -> Recipe:
    sortkd = method == "kd+sort"
    return Recipe(
        name=f"{method}/cifar100/res32x4-res8x4", method=method, loss="kd", dataset="cifar100",
        teacher="resnet32x4", student="resnet8x4", loss_args=MappingProxyType(dict(KD_CFG_DEFAULTS)), lr=0.05,
        **CIFAR_SOLVER, correction="sort" if sortkd else "none",
        source=(f"{repo}:configs/cifar100/kd.yaml", f"{repo}:mdistiller/engine/cfg.py",
                *((f"{SORTKD}:mdistiller/distillers/KD.py",) if sortkd else ())),
        notes=(SORT_NOTE.format(which="KD") + " " if sortkd else "")
        + "kd.yaml is this pair only (no KD section: cfg.py's T and weights). No official file gives KD's "
          "settings for the other pairs, so they have no recipe.")


def _imagenet(method: str, repo: str, pair: str, stem: str, student: str, args: dict[str, Any]) -> Recipe:
    loss = method.removesuffix("+sort")
    sortkd = method.endswith("+sort")
    teacher = "ResNet34" if pair == "r34-r18" else "ResNet50"
    yaml = f"{repo}:configs/imagenet/{stem}/{loss}.yaml"
    extra = (f"{repo}:mdistiller/engine/cfg.py",) if loss == "dkd" else ()  # DKD.ALPHA is cfg.py's
    notes = "DKD.ALPHA is cfg.py's default; the rest is the yaml's." if loss == "dkd" else ""
    if sortkd:
        extra += (f"{SORTKD}:mdistiller/distillers/{loss.upper()}.py",)
        notes = SORT_NOTE.format(which=loss.upper()) + (" " + notes if notes else "")
    return Recipe(
        name=f"{method}/imagenet/{pair}", method=method, loss=loss, dataset="imagenet", teacher=teacher,
        student=student, loss_args=MappingProxyType(args), **IMAGENET_SOLVER,
        correction="sort" if sortkd else "none", source=(yaml, *extra), notes=notes)


def _sld_cifar(pair: tuple) -> Recipe:
    name, stem, teacher, student, lr = pair
    notes = SLD_VIEWS_NOTE.format(path="mdistiller/dataset/cifar100.py", weak="RandomCrop(32, padding=4) + flip")
    return Recipe(
        name=f"sld/cifar100/{name}", method="sld", loss="sld", dataset="cifar100", teacher=teacher, student=student,
        loss_args=MappingProxyType({"w_ce": 0.1, "w_kd": 0.9, **SLD_SCHEDULE}), lr=lr, **CIFAR_SOLVER,
        view_groups=(("weak", "crop-flip"), ("strong", STRONG_CIFAR)),
        source=(f"{SLD_REPO}:configs/cifar100/sld/{stem}.yaml", f"{SLD_REPO}:mdistiller/engine/cfg.py", SLD_CODE,
                f"{SLD_REPO}:mdistiller/dataset/cifar100.py"),
        notes="w_ce, w_kd: cfg.py's CFG.KD.LOSS (the yaml has no KD section); temperatures and the start epoch "
              "(gamma = 150): SLD.py. " + notes + (EPOCH960_NOTE if "shuv" in name and "res32x4" in name else ""))


def _sld_imagenet(pair: str, stem: str, student: str, w_ce: float, w_kd: float, note: str = "") -> Recipe:
    views = SLD_VIEWS_NOTE.format(path="mdistiller/dataset/imagenet.py", weak="RandomResizedCrop(224) + flip")
    return Recipe(
        name=f"sld/imagenet/{pair}", method="sld", loss="sld", dataset="imagenet",
        teacher="ResNet34" if pair == "r34-r18" else "ResNet50", student=student,
        loss_args=MappingProxyType({"w_ce": w_ce, "w_kd": w_kd, **SLD_SCHEDULE}), **IMAGENET_SOLVER,
        view_groups=(("weak", "rrc-flip"), ("strong", STRONG_IMAGENET)),
        source=(f"{SLD_REPO}:configs/imagenet/{stem}/sld.yaml", SLD_CODE, f"{SLD_REPO}:mdistiller/dataset/imagenet.py"),
        notes=f"{note}w_ce, w_kd: the yaml's KD.LOSS (its KD.TEMPERATURE is unused by SLD.py). The hard-coded "
              "gamma = 150 is past the 100 epochs, so the student-swap term never turns on in these runs, as in "
              f"the official code (scaling keeps that). {views}")


def _ttm_vgg13_vgg8() -> Recipe:
    return Recipe(
        name="ttm/cifar100/vgg13-vgg8", method="ttm", loss="ttm", dataset="cifar100", teacher="vgg13",
        student="vgg8", loss_args=MappingProxyType({"w_ce": 1.0, "gamma": 0.1, "beta": 45.0}), lr=0.05,
        **CIFAR_SOLVER, source=(f"{TTM_REPO}:README.md", f"{TTM_REPO}:train_student.py"),
        notes="gamma = 0.1 (--ttm_l), beta = 45 (-b) and w_ce = 1 (-r) are the README's example command "
              "(--distill ttm -r 1 -b 45 -a 0), not a config file: the repository has no per-pair configs. "
              "The solver is train_student.py's defaults (LR 0.05; it forces 0.01 for MobileNetV2 and "
              "ShuffleV1/V2 students).")


def _build() -> dict[str, Recipe]:
    recipes = [
        *(_cifar_dkd("dkd", MDISTILLER, pair) for pair in DKD_CIFAR_PAIRS),
        _cifar_kd("kd", MDISTILLER),
        *(_sld_cifar(pair) for pair in SLD_CIFAR_PAIRS),
        _cifar_kd("kd+sort", SORTKD),
        *(_cifar_dkd("dkd+sort", SORTKD, pair) for pair in DKD_CIFAR_PAIRS),
        _ttm_vgg13_vgg8(),
    ]
    kd_in = {"T": 1.0, "w_ce": 0.5, "w_kd": 0.5}  # configs/imagenet/*/kd.yaml: KD.TEMPERATURE, KD.LOSS
    for method, repo in (("kd", MDISTILLER), ("dkd", MDISTILLER), ("kd+sort", SORTKD), ("dkd+sort", SORTKD)):
        dkd_args = {"w_ce": 1.0, "alpha": 1.0, "T": 1.0, "warmup": 1}  # the yamls' DKD section (+ cfg.py ALPHA)
        recipes += [
            _imagenet(method, repo, "r34-r18", "r34_r18", "ResNet18",
                      kd_in if method.startswith("kd") else dkd_args | {"beta": 0.5}),
            _imagenet(method, repo, "r50-mv1", "r50_mv1", "MobileNetV1",
                      kd_in if method.startswith("kd") else dkd_args | {"beta": 2.0}),
        ]
    recipes += [
        _sld_imagenet("r34-r18", "r34_r18", "ResNet18", 0.5, 0.5),
        _sld_imagenet("r50-mv1", "r50_mv2", "MobileNetV1", 1.0, 0.5, MV1_NOTE + " "),
    ]
    registry: dict[str, Recipe] = {}
    for recipe in recipes:
        if recipe.name in registry:
            raise ValueError(f"recipe {recipe.name} is defined twice")
        registry[recipe.name] = recipe
    return registry


RECIPES: dict[str, Recipe] = _build()
METHODS = tuple(dict.fromkeys(r.method for r in RECIPES.values()))


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``, or a one-line SpecError naming the closest ones."""
    if name in RECIPES:
        return RECIPES[name]
    close = difflib.get_close_matches(str(name), list(RECIPES), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else "names are METHOD/DATASET/TEACHER-STUDENT; "
    raise SpecError(f"unknown recipe '{name}'; {hint}`kdcache recipes` lists them")


def select(dataset: str | None = None, method: str | None = None, pattern: str = "*") -> list[Recipe]:
    """The recipes of one dataset family and/or method whose names match a glob; unknown filters refused."""
    if dataset is not None and dataset not in FAMILIES:
        raise SpecError(f"unknown --dataset '{dataset}'; recipes are for {', '.join(FAMILIES)}")
    if method is not None and method not in METHODS:
        raise SpecError(f"unknown --method '{method}'; recipes are for {', '.join(METHODS)}")
    return [r for r in RECIPES.values() if (dataset is None or r.dataset == dataset)
            and (method is None or r.method == method) and fnmatch.fnmatch(r.name, pattern)]


# ---------------------------------------------------------------------------------------- resolution
SCALED_ARGS = ("warmup", "sld_start_epoch")  # loss hyperparameters counted in epochs
# TrainConfig fields a recipe sets (view_policy only for recipes with one view policy: the field is what
# training from a dataset spec draws; a store replays its own views)
RECIPE_FIELDS = ("loss", "loss_args", "correction", "lr", "epochs", "milestones", "lr_decay", "batch_size",
                 "weight_decay", "momentum", "schedule", "view_policy")


def scale_epochs(value: int, factor: float) -> int:
    """An epoch count times ``factor``, rounded half up, at least 1."""
    return max(1, math.floor(value * factor + 0.5))


def scale_milestones(milestones: Iterable[int], factor: float) -> tuple[int, ...]:
    """Milestones times ``factor`` (``scale_epochs``), kept strictly ascending (a collision moves up by one)."""
    out: list[int] = []
    for m in milestones:
        s = scale_epochs(m, factor)
        out.append(s if not out or s > out[-1] else out[-1] + 1)
    return tuple(out)


def _join(values: Iterable[Any]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def resolve_recipe(recipe: Recipe, explicit: Mapping[str, Any],
                   current: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``TrainConfig`` values ``recipe`` sets (``RECIPE_FIELDS``), the ``explicit`` ones (field -> value
    the user set; ``loss_args`` merged key by key) winning. When the run's epochs differ from the recipe's,
    the milestones, ``warmup`` and ``sld_start_epoch`` not set explicitly are scaled by epochs / recipe.epochs,
    with one ``RecipeScaledWarning`` naming what moved (silent when ``current``, the config's values, already
    holds them: resolving a resolved config changes and says nothing)."""
    explicit = {k: v for k, v in explicit.items() if v is not None}
    if "loss" in explicit and explicit["loss"] != recipe.loss:
        raise SpecError(f"--loss {explicit['loss']} does not go with recipe {recipe.name} (loss {recipe.loss}); "
                        "drop --loss, or pick another recipe (`kdcache recipes`)")
    current = current or {}
    epochs = explicit.get("epochs", recipe.epochs)
    valid = isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1  # else validate() refuses it
    factor = epochs / recipe.epochs if valid else 1
    out: dict[str, Any] = {"loss": recipe.loss, "epochs": epochs}
    for name in ("correction", "lr", "lr_decay", "batch_size", "weight_decay", "momentum", "schedule"):
        out[name] = explicit.get(name, getattr(recipe, name))
    if not recipe.view_groups:
        out["view_policy"] = explicit.get("view_policy", recipe.view_policy)
    moved: list[str] = []
    user_args = dict(explicit.get("loss_args") or {})
    args = dict(recipe.loss_args)
    for key in SCALED_ARGS:
        if key in args and key not in user_args and factor != 1:
            new = scale_epochs(args[key], factor)
            if (current.get("loss_args") or {}).get(key) != new:
                moved.append(f"{key} {args[key]} -> {new}")
            args[key] = new
    merged = args | user_args  # typed as the loss's defaults (a flag's "6" is 6.0), so a run's config reads back
    typed = resolve_hparams(recipe.loss, merged)
    out["loss_args"] = {key: typed[key] for key in merged}
    if "milestones" in explicit:
        out["milestones"] = tuple(explicit["milestones"])
    else:
        out["milestones"] = scale_milestones(recipe.milestones, factor) if factor != 1 else recipe.milestones
        if out["milestones"] != recipe.milestones and tuple(current.get("milestones") or ()) != out["milestones"]:
            moved.insert(0, f"milestones {_join(recipe.milestones)} -> {_join(out['milestones'])}")
    if moved:
        warnings.warn(f"recipe {recipe.name} is for {recipe.epochs} epochs; for {epochs} it scales "
                      f"{', '.join(moved)} (x {epochs}/{recipe.epochs}); pass them to set your own",
                      RecipeScaledWarning, stacklevel=3)
    return out


def set_fields(cfg: TrainConfig) -> set[str]:
    """The fields of a dataclass config that differ from their defaults: what a library caller set."""
    out = set()
    for f in fields(cfg):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if default is MISSING or getattr(cfg, f.name) != default:
            out.add(f.name)
    return out


def with_recipe(cfg: TrainConfig, explicit: Collection[str] | None = None) -> TrainConfig:
    """``cfg`` with its recipe's settings (``resolve_recipe``); ``cfg`` itself when it names no recipe.

    ``explicit``: every field the caller set on purpose (the CLI: the flags typed, or read from --config);
    they win. None: the fields that differ from their defaults (``set_fields``). A library caller who
    wants a default value against the recipe, e.g. epochs=240 with a 100-epoch recipe, passes
    ``explicit=set_fields(cfg) | {"epochs"}``. Resolving again with the same ``explicit`` gives the same
    config, silently.
    SortKD's train-time ``sort`` is skipped when the store's teacher was already cached with it.
    """
    if cfg.recipe is None:
        return cfg
    recipe = get_recipe(cfg.recipe)
    names = set_fields(cfg) if explicit is None else set(explicit)
    given = {name: getattr(cfg, name) for name in RECIPE_FIELDS if name in names}
    current = {name: getattr(cfg, name) for name in RECIPE_FIELDS}
    settings = resolve_recipe(recipe, given, current)
    if settings["correction"] == recipe.correction != "none" and _store_corrected_with(cfg, recipe.correction):
        settings["correction"] = "none"  # the store already holds sort-corrected records
    return replace(cfg, **settings)


def _store_corrected_with(cfg: TrainConfig, correction: str) -> bool:
    from kdcache.stores.logit_store import LogitStore

    if not LogitStore.exists(cfg.source):
        return False
    store = LogitStore.open(cfg.source)
    names = [t for t in (cfg.teacher.split(",") if cfg.teacher else store.teachers) if t in store.teachers]
    return bool(names) and all((store.teacher_attrs(t).get("correction") or {}).get("name") == correction
                               for t in names)


# ----------------------------------------------------------------------------------------- fit checks
_BUILTIN_DATASETS = ("digits", "mnist5k", "mnist-pairs")  # kdcache.data's bundled specs


def check_fits(recipe: Recipe, dataset: str | Mapping[str, Any], num_classes: int | None = None) -> None:
    """Refuse (one line) a recipe for another dataset: ``dataset`` is a store's attrs (its recorded spec
    and class count) or a dataset spec (with ``num_classes`` when known). A ``python:`` dataset object has
    no family to read from its name; its class count decides."""
    if isinstance(dataset, Mapping):
        info = dataset.get("dataset") or {}
        spec = str(info.get("spec") or (dataset.get("identity") or {}).get("dataset") or "an unnamed dataset")
        num_classes = info.get("num_classes", dataset.get("num_classes"))
        holds = "the store holds"
    else:
        spec, holds = str(dataset), "the data is"
    want, found = FAMILIES[recipe.dataset], family_of(spec)
    own_object = spec.startswith("python:")
    if (found is want or (found is None and own_object)) and num_classes in (None, want.num_classes):
        return
    classes = f" ({num_classes} classes)" if num_classes is not None else ""
    if found is not None and found is not want and num_classes in (None, found.num_classes):
        hint = f"pick a recipe for {found.name} (`kdcache recipes --dataset {found.name}`) or drop --recipe"
    else:
        hint = f"no recipe is for that dataset: drop --recipe (recipes are for {', '.join(FAMILIES)})"
    raise SpecError(f"recipe {recipe.name} is for {want.name} ({want.num_classes} classes) but {holds} "
                    f"{spec}{classes}; {hint}")


def _canonical(spec: str) -> str:
    """A policy string with every argument written out, when its ops are known; else as written."""
    from kdcache.views import policy_from_spec

    try:
        return policy_from_spec(spec).spec
    except SpecError:
        return " ".join(str(spec).split())


def _stored_policy(record: Mapping[str, Any]) -> str:
    from kdcache.views import get_view_policy

    name, args = str(record.get("name")), dict(record.get("args") or {})
    if name == "pipeline":
        return _canonical(args.get("spec", name))
    try:
        return get_view_policy(name, **args).spec
    except SpecError:
        return name


def check_views(recipe: Recipe, record: Mapping[str, Any]) -> None:
    """The store's recorded views (``attrs["view_policy"]``) against the recipe's: a two-view recipe on a
    store without those view groups is refused (one line, with the teach flags); other differences warn."""
    name, args = record.get("name"), record.get("args") or {}
    show = f"`kdcache recipes {recipe.name}` prints the teach flags"
    if recipe.view_groups:
        wanted = [g for g, _ in recipe.view_groups]
        stored = [(str(g), str(s)) for g, s in args.get("groups", [])] if name == "groups" else []
        teach = f"cache it with `kdcache teach ... {shlex.join(view_flags(recipe))}`"
        if not stored:
            raise SpecError(f"recipe {recipe.name} trains {len(wanted)} linked views ({', '.join(wanted)}) but the "
                            f"store has one view group; {teach}")
        if [g for g, _ in stored] != wanted:
            raise SpecError(f"recipe {recipe.name} trains the linked views {', '.join(wanted)} but the store's "
                            f"view groups are {', '.join(g for g, _ in stored)}; {teach}")
        for (group, spec), (_, want) in zip(stored, recipe.view_groups, strict=True):
            if _canonical(spec) != _canonical(want):
                warnings.warn(f"recipe {recipe.name}: view group {group} is '{spec}' in the store but '{want}' in "
                              f"the paper; the run is not the paper's ({show})", RecipeViewsWarning, stacklevel=3)
        return
    if name == "groups":
        groups = ", ".join(str(g) for g, _ in args.get("groups", []))
        warnings.warn(f"recipe {recipe.name} trains one view policy ({recipe.view_policy}) but the store has view "
                      f"groups ({groups}); {show}", RecipeViewsWarning, stacklevel=3)
        return
    stored_spec = _stored_policy(record)
    if stored_spec != _canonical(recipe.view_policy):
        warnings.warn(f"recipe {recipe.name} trains on {recipe.view_policy} views but the store's are "
                      f"{stored_spec}; the run is not the paper's ({show})", RecipeViewsWarning, stacklevel=3)


def check_recipe(cfg: TrainConfig) -> None:
    """The run's data fits its recipe: the store's dataset, classes and views (``check_fits``,
    ``check_views``), or a dataset spec's family (no store: one view policy only)."""
    if cfg.recipe is None:
        return
    from kdcache.stores.logit_store import LogitStore

    recipe = get_recipe(cfg.recipe)
    if LogitStore.exists(cfg.source):
        attrs = LogitStore.open(cfg.source).attrs
        check_fits(recipe, attrs)
        check_views(recipe, attrs.get("view_policy") or {})
        return
    name = cfg.source.partition("?")[0].lower()
    if name in _BUILTIN_DATASETS or family_of(name) or name.startswith(("torchvision:", "cifar10")):
        check_fits(recipe, cfg.source)
        if recipe.view_groups:
            raise SpecError(f"recipe {recipe.name} trains linked view groups, which only a store holds; cache "
                            f"them with `kdcache teach ... {shlex.join(view_flags(recipe))}` and train from it")


# ------------------------------------------------------------------------------------------ stage one
def view_flags(recipe: Recipe) -> list[str]:
    """The `kdcache teach` view flags of a store that fits ``recipe``."""
    if recipe.view_groups:
        return [flag for g, spec in recipe.view_groups for flag in ("--view-group", f"{g}={spec}")]
    from kdcache.views import policy_from_spec

    flags = ["--view-policy", recipe.view_policy]
    try:
        enumerable = policy_from_spec(recipe.view_policy).num_views_all is not None
    except SpecError:
        enumerable = False
    return flags + (["--views", "all"] if enumerable else [])  # crop-flip: all 162 views, the exact online set


def recipe_teach_flags(recipe: Recipe) -> list[str]:
    """The `kdcache teach` flags that make a store fitting ``recipe``: its views (all of them when they can
    be enumerated) and the temperatures its loss reads the teacher at, plus T=1 (exact tail mass there)."""
    temps = sorted({1.0, *loss_temperatures(recipe.loss, dict(recipe.loss_args))})
    return [*view_flags(recipe), "--temperatures", _join(temps)]


# ------------------------------------------------------------------------------------------- listings
KEY_ARGS = {"kd": ("T", "w_ce", "w_kd"), "dkd": ("beta", "T", "warmup"), "sld": ("w_ce", "w_kd", "sld_start_epoch"),
            "ttm": ("gamma", "beta"), "wttm": ("gamma", "beta")}


def format_args(recipe: Recipe, keys: Iterable[str] | None = None) -> str:
    """``key=value`` pairs of the recipe's loss args: all of them, or ``keys`` (the listing's ``KEY_ARGS``,
    followed by ``+correction`` when the recipe corrects the teacher)."""
    shown = tuple(recipe.loss_args) if keys is None else tuple(keys)
    parts = [f"{k}={_join(v) if isinstance(v, tuple) else _join([v])}" for k, v in recipe.loss_args.items()
             if k in shown]
    if keys is not None and recipe.correction != "none":
        parts.append("+" + recipe.correction)
    return " ".join(parts)


def _short(source: str) -> str:
    repo, _, path = source.partition(":")
    return f"{repo.rpartition('/')[2]}:{path}"


def table_lines(recipes: Iterable[Recipe], width: int = 80) -> list[str]:
    """The `kdcache recipes` listing: name, LR, epochs and the key loss args on one line (wrapped within
    ``width``), the entry's config file (repository name:path) on the next."""
    recipes = list(recipes)
    name_w = max([len(r.name) for r in recipes] + [6])
    head = f"{'recipe':<{name_w}}  {'lr':<6} {'epochs':<6} "
    args_w = max(width - len(head), 16)
    lines = [head + "loss args", "  config file (`kdcache recipes NAME`: every source, in full)"]
    for r in recipes:
        wrapped = textwrap.wrap(format_args(r, KEY_ARGS.get(r.loss)), args_w) or [""]
        lines.append(f"{r.name:<{name_w}}  {r.lr:<6g} {r.epochs:<6} {wrapped[0]}")
        lines += [" " * len(head) + part for part in wrapped[1:]]
        lines.append("  " + _short(r.source[0]))
    return lines


def _command(words: list[str], width: int) -> list[str]:
    """A shell command (``words`` already quoted) wrapped with trailing backslashes so every line fits
    ``width`` (a flag stays with its value)."""
    units: list[str] = []
    for word in words:
        if (units and units[-1].startswith("--") and " " not in units[-1] and not word.startswith("--")
                and len(units[-1]) + len(word) < width - 8):
            units[-1] += " " + word
        else:
            units.append(word)
    lines, line = [], "  " + units[0]
    for unit in units[1:]:
        if len(line) + 1 + len(unit) > width - 2:
            lines.append(line + " \\")
            line = "      " + unit
        else:
            line += " " + unit
    return [*lines, line]


def _source_rows(sources: Iterable[str]) -> list[tuple[str, str]]:
    """Sources grouped by repository: ``owner/repo @ commit``, then its files (each fits 80 columns)."""
    rows: list[tuple[str, str]] = []
    by_repo: dict[str, list[str]] = {}
    for source in sources:
        repo, _, path = source.partition(":")
        by_repo.setdefault(repo, []).append(path)
    for repo, paths in by_repo.items():
        commit = COMMITS.get(repo, "")[:7]
        rows.append(("source" if not rows else "", f"{repo} @ {commit}" if commit else repo))
        rows += [("", "  " + path) for path in paths]
    return rows


def describe_lines(recipe: Recipe, width: int = 80) -> list[str]:
    """`kdcache recipes NAME`: every field, then the two commands that train it (placeholders in capitals)."""
    from kdcache.models import list_models

    r = recipe
    family = FAMILIES[r.dataset]
    rows = [
        ("method", f"{r.method} (loss {r.loss}" + (f", correction {r.correction})" if r.correction != "none" else ")")),
        ("dataset", f"{r.dataset} ({family.num_classes} classes): "
                    + ", ".join(d + "PATH" if d.endswith(":") else d for d in family.datasets)),
        ("pair", f"{r.teacher} -> {r.student}"),
        ("loss args", format_args(r)),
        ("optimiser", f"SGD lr {r.lr:g}, momentum {r.momentum:g}, weight decay {r.weight_decay:g}, "
                      f"batch {r.batch_size}"),
        ("schedule", f"{r.epochs} epochs, {r.schedule}: x{r.lr_decay:g} after epochs {_join(r.milestones)}"),
        ("views", "; ".join(f"{g}={s}" for g, s in r.view_groups) if r.view_groups else r.view_policy),
        *_source_rows(r.source),
        ("notes", r.notes),
    ]
    lines = [r.name]
    for key, value in rows:
        if value:
            wrapped = textwrap.wrap(value, width - 14, break_on_hyphens=False, break_long_words=False) or [""]
            lines += [f"  {key:<10}  {wrapped[0]}", *(" " * 14 + part for part in wrapped[1:])]
    models = set(list_models(torchvision_models=True))
    student = r.student.lower() if r.student.lower() in models else "STUDENT"
    flags = recipe_teach_flags(r)
    lines += ["", f"stage one, a store that fits (TEACHER: the paper's {r.teacher}, e.g. ARCH@w.pt):"]
    words = [shlex.quote(w) for w in ["kdcache", "teach", family.teach_spec, "--teacher", "TEACHER", "--out",
                                      "STORE"]]
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        group, _, spec = value.partition("=")
        if flag == "--view-group" and len(shlex.quote(value)) > width // 2:  # a long policy: a shell variable
            var = group.upper().replace("-", "_")
            lines.append(f"  {var}={shlex.quote(spec)}")
            words += [flag, f'"{group}=${var}"']
        else:
            words += [flag, shlex.quote(value)]
    lines += _command(words, width)
    if "--views" not in flags:
        lines.append("  (these views cannot be enumerated: add --views N, N teacher passes)")
    lines += ["stage two (flags you add win over the recipe):"]
    lines += _command([shlex.quote(w) for w in ["kdcache", "train", "STORE", "--student", student, "--recipe", r.name,
                                                "--out", "RUN"]], width)
    return lines


def markdown_table(recipes: Iterable[Recipe] | None = None) -> str:
    """The recipes as a markdown table (docs/recipes.md holds it; ``python -m kdcache.recipes`` prints it)."""
    out = ["| recipe | teacher → student | lr | epochs (milestones) | batch | wd | loss args | views | source |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in RECIPES.values() if recipes is None else recipes:
        views = "<br>".join(f"{g}: `{s}`" for g, s in r.view_groups) if r.view_groups else f"`{r.view_policy}`"
        sources = "<br>".join(f"`{s}`" for s in r.source)
        out.append(f"| `{r.name}` | {r.teacher} → {r.student} | {r.lr:g} | {r.epochs} ({_join(r.milestones)}) | "
                   f"{r.batch_size} | {r.weight_decay:g} | {format_args(r)} | {views} | {sources} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # regenerate the table of docs/recipes.md
    print(markdown_table(), end="")
