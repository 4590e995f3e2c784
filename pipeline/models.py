"""Model registry, seeded construction, and teacher specs with weight provenance.

``build_model(name, num_classes, seed)`` builds a registered net (``list_models()``) or any
torchvision classification architecture, with a seeded initialisation: the same name and seed give
the same weights, so a random-weight teacher can be rebuilt later to verify a store.

Teacher specs (``build_teacher``):

- ``torchvision:<arch>[:<WEIGHTS>|none]``: torchvision architecture; ``WEIGHTS`` is a weights enum
  name (``IMAGENET1K_V1``, ``DEFAULT`` (the default), or ``ResNet50_Weights.IMAGENET1K_V2``), which
  torchvision downloads unless cached; ``none`` = random weights seeded by ``seed``.
- ``<arch>@path/to/state_dict.pt``: registered or torchvision arch, weights from a state dict
  (``torch.load(weights_only=True)``; a checkpoint dict holding it under "model"/"state_dict" works).
- ``timm:<name>[:pretrained]`` (the ``timm`` extra, teachers and students alike): ``timm.create_model``
  with ``num_classes``; random seeded weights, or with ``:pretrained`` timm's own download (Hugging Face
  hub). Offline, use ``timm:<name>@path/to/state_dict.pt``.
- ``package.module:factory``: ``factory(num_classes=...)`` when it has a ``num_classes`` parameter,
  else ``factory()``; must return an nn.Module (its output width is the caller's to check).
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import importlib
import importlib.util
import inspect
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn

from kdcache.cifar_nets import CIFAR_RESNETS, WIDE_RESNETS, CifarResNet, WideResNet
from kdcache.stores.errors import SpecError

TEACHER_FORMS = ("torchvision:<arch>[:<WEIGHTS>|none], timm:<name>[:pretrained], <arch>@path/to/state_dict.pt, "
                 "package.module:factory")
TIMM_PREFIX = "timm:"


class WeightsDownloadError(SpecError):
    """Pretrained weights could not be fetched (no network, no cached copy)."""


_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: ``@register_model("small_cnn")`` on a factory ``fn(num_classes, **kw) -> nn.Module``."""

    def wrap(fn):
        if name in _MODELS:
            raise ValueError(f"model '{name}' is already registered")
        _MODELS[name] = fn
        return fn

    return wrap


def list_models(pattern: str = "*", torchvision_models: bool = False) -> list[str]:
    """Registered model names matching a glob ``pattern``, sorted (plus torchvision's when asked)."""
    names = set(_MODELS)
    if torchvision_models:
        names |= set(_torchvision_archs())
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def _torchvision_archs() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)  # classification only


def list_model_specs(pattern: str = "*") -> list[str]:
    """Every model name a spec may use: registered nets, torchvision classification architectures, then
    ``timm:<name>`` when timm is installed. ``pattern`` (a glob) matches the name with or without ``timm:``."""
    groups = [list_models(), sorted(_torchvision_archs())]
    if importlib.util.find_spec("timm") is not None:
        groups.append([TIMM_PREFIX + name for name in _import_timm("timm:*").list_models()])
    return [spec for group in groups for spec in group
            if fnmatch.fnmatch(spec, pattern) or fnmatch.fnmatch(spec.removeprefix(TIMM_PREFIX), pattern)]


for _name, (_depth, _widths) in CIFAR_RESNETS.items():
    register_model(_name)(partial(CifarResNet, _depth, _widths))
for _name, (_depth, _k) in WIDE_RESNETS.items():
    register_model(_name)(partial(WideResNet, _depth, _k))


class SmallCNN(nn.Module):
    """Two conv blocks, a 4x4 adaptive pool (keeps coarse position: MNIST pairs need left vs right),
    and a 2-layer head. Fast on CPU for 8x8 digits, 28x28 MNIST and 28x56 pairs. ``norm=False``
    replaces BatchNorm by biased convs: no cross-sample op in train mode (DDP equals one process)."""

    def __init__(self, num_classes: int = 10, width: int = 32, hidden: int = 128, norm: bool = True):
        super().__init__()

        def bn(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if norm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=not norm), bn(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=not norm), bn(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("small_cnn")
def small_cnn(num_classes: int = 10, **kwargs) -> nn.Module:
    return SmallCNN(num_classes=num_classes, **kwargs)


@register_model("small_cnn_wide")
def small_cnn_wide(num_classes: int = 10, **kwargs) -> nn.Module:
    """The demo's teacher: SmallCNN at twice the width."""
    return SmallCNN(num_classes=num_classes, **{"width": 64, "hidden": 256, **kwargs})


@register_model("tiny_cnn")
def tiny_cnn(num_classes: int = 10, **kwargs) -> nn.Module:
    """The demo's student: SmallCNN at a quarter of the width, so the teacher has something to teach."""
    return SmallCNN(num_classes=num_classes, **{"width": 8, "hidden": 32, **kwargs})


@register_model("tiny_cnn_nobn")
def tiny_cnn_nobn(num_classes: int = 10, **kwargs) -> nn.Module:
    """tiny_cnn without BatchNorm: per-sample in train mode, so DDP trains it exactly as one process."""
    return SmallCNN(num_classes=num_classes, **{"width": 8, "hidden": 32, "norm": False, **kwargs})


def _unknown_model(name: str) -> SpecError:
    close = difflib.get_close_matches(name, list_models() + _torchvision_archs(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return SpecError(f"unknown model '{name}'{hint}; `kdcache list models` names the registered nets and "
                     "torchvision architectures")


def _not_torchvision(arch: str) -> SpecError:
    """``torchvision:small_cnn``: a kdcache net is not a torchvision one; say how to name it."""
    return SpecError(f"'{arch}' is a kdcache model, not a torchvision one; use {arch} (students), "
                     f"kdcache.models:{arch} or {arch}@state_dict.pt (teachers)")


def _seeded(seed: int, fn: Callable[[], nn.Module]) -> nn.Module:
    """Run a constructor under its own CPU RNG stream: reproducible, and the caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _torchvision_kwargs(name: str) -> dict:
    # these two return (logits, aux) tuples in train mode and warn without init_weights
    return {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}


def _import_timm(spec: str):
    """timm is an optional extra: import it only for a ``timm:`` spec."""
    try:
        import timm
    except ImportError:
        raise SpecError(f"{spec} needs `pip install kdcache[timm]`") from None
    return timm


def _parse_timm_spec(spec: str) -> tuple[str, bool]:
    """``timm:<name>[:pretrained]`` -> (name, pretrained), with the name checked against timm's registry."""
    name, _, weights = spec.removeprefix(TIMM_PREFIX).partition(":")
    if weights not in ("", "pretrained"):
        raise SpecError(f"bad timm spec '{spec}': the only weights option is ':pretrained'; "
                        "expected timm:<name>[:pretrained]")
    timm = _import_timm(spec)
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(TIMM_PREFIX + c for c in close)}?)" if close else ""
        raise SpecError(f"unknown timm model '{name}'{hint}; `kdcache list models 'timm:*'` lists them")
    return name, bool(weights)


def _timm_model(spec: str, num_classes: int, seed: int, **kwargs) -> tuple[nn.Module, str]:
    """(model, weights label): seeded random init, or timm's own pretrained download."""
    name, pretrained = _parse_timm_spec(spec)
    timm = _import_timm(spec)
    if not pretrained:
        return _seeded(seed, lambda: timm.create_model(name, pretrained=False, num_classes=num_classes,
                                                       **kwargs)), "none"
    if not (timm.list_pretrained(name) or timm.list_pretrained(f"{name}.*")):
        raise SpecError(f"timm model '{name}' has no pretrained weights; use timm:{name} (random init) "
                        f"or timm:{name}@path/to/state_dict.pt")
    try:  # the seed fixes the new classifier head when num_classes differs from the checkpoint's
        model = _seeded(seed, lambda: timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs))
    except (OSError, RuntimeError) as err:  # Hugging Face hub errors and URLError are OSErrors
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:200]
        raise WeightsDownloadError(f"could not download pretrained weights for timm:{name} ({reason}); the "
                                   f"weights need a network (or the Hugging Face cache) or a local checkpoint: "
                                   f"timm:{name}@path/to/state_dict.pt") from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return model, f"timm:{cfg.get('hf_hub_id') or cfg.get('url') or 'pretrained'}"


def build_model(name: str, num_classes: int, seed: int = 0, **kwargs) -> nn.Module:
    """A freshly initialised model, identical for identical (name, num_classes, seed, kwargs)."""
    if name.startswith(TIMM_PREFIX):
        return _timm_model(name, num_classes, seed, **kwargs)[0]
    if name in _MODELS:
        return _seeded(seed, lambda: _MODELS[name](num_classes=num_classes, **kwargs))
    if name in _torchvision_archs():
        kw = {**_torchvision_kwargs(name), **kwargs}
        return _seeded(seed, lambda: torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw))
    if ":" in name:
        return _from_factory(name, num_classes, seed, role="student")
    raise _unknown_model(name)


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _finish(model: nn.Module, spec: str, weights: str, seed: int) -> tuple[nn.Module, dict]:
    model.eval().requires_grad_(False)
    return model, {"spec": spec, "weights": weights, "weights_sha256": state_dict_sha256(model.state_dict()),
                   "seed": seed}


def _torchvision_teacher(spec: str, rest: str, num_classes: int, seed: int):
    arch, _, weights_name = rest.partition(":")
    if arch not in _torchvision_archs():
        raise _not_torchvision(arch) if arch in _MODELS else _unknown_model(arch)
    weights_name = weights_name or "DEFAULT"
    if weights_name.lower() == "none":
        return _finish(build_model(arch, num_classes, seed), spec, "none", seed)
    try:
        if "." in weights_name:
            weights = torchvision.models.get_weights(weights_name)
        else:
            weights = torchvision.models.get_model_weights(arch)[weights_name]
    except (KeyError, ValueError) as err:
        choices = [w.name for w in torchvision.models.get_model_weights(arch)]
        raise SpecError(f"unknown weights '{weights_name}' for torchvision:{arch}; "
                        f"expected one of {', '.join(choices + ['DEFAULT', 'none'])}") from err
    try:
        model = _seeded(seed, lambda: torchvision.models.get_model(arch, weights=weights))
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise SpecError(f"could not get weights {weights} for torchvision:{arch} ({err}); without network, put "
                        "the file in the torch hub cache or use <arch>@path/to/state_dict.pt") from None
    return _finish(model, spec, str(weights), seed)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SpecError(f"teacher weights file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have no common type; their text advises weights_only=False
        raise SpecError(f"'{path}' is not a weights-only state dict (torch.load(weights_only=True) failed with "
                        f"{type(err).__name__}); save it with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):  # common checkpoint wrappers (Lightning, RepDistiller)
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SpecError(f"'{path}' does not hold a state dict (a dict of tensors); save model.state_dict()")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _checkpoint_teacher(spec: str, num_classes: int, seed: int):
    arch, _, path = spec.partition("@")
    model = build_model(arch, num_classes, seed)
    state = _load_state_dict(Path(path).expanduser())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        why = state_dict_mismatch(model, state)
        raise SpecError(f"'{path}' does not fit {arch} with {num_classes} classes: {why}; use weights saved from "
                        "this architecture for this dataset") from None
    return _finish(model, spec, str(path), seed)


def state_dict_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """The first difference between a model's parameters and a state dict, in a few words (PyTorch's own
    message lists every tensor, hundreds of characters)."""
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and tuple(own[name].shape) != tuple(tensor.shape):
            shape = "x".join(map(str, tensor.shape)) or "scalar"
            return f"{name} is {shape} there, {'x'.join(map(str, own[name].shape)) or 'scalar'} here"
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing:
        return f"{len(missing)} tensor(s) missing, e.g. {missing[0]}"
    return f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}" if unexpected else "tensors differ"


def _factory_teacher(spec: str, num_classes: int, seed: int):
    return _finish(_from_factory(spec, num_classes, seed, role="teacher"), spec, "factory", seed)


def _from_factory(spec: str, num_classes: int, seed: int, role: str = "model") -> nn.Module:
    """``package.module:factory`` -> the module it builds (seeded), for teachers and students alike."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise SpecError(f"cannot import {role} factory '{spec}': {err}") from None
    if not callable(factory):
        raise SpecError(f"{role} factory '{spec}' is not callable")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    # only a named parameter counts: **kwargs may forward it nowhere useful (or somewhere that fails)
    takes = "num_classes" in params
    model = _seeded(seed, lambda: factory(num_classes=num_classes) if takes else factory())
    if not isinstance(model, nn.Module):
        raise SpecError(f"{role} factory '{spec}' returned {type(model).__name__}, not a torch nn.Module")
    return model


def build_teacher(spec: str, num_classes: int, seed: int = 0) -> tuple[nn.Module, dict]:
    """Teacher in eval mode (no grads) + provenance {spec, weights, weights_sha256, seed}.

    The output width is not checked here; the caller compares it with the dataset's classes.
    """
    if not isinstance(spec, str) or not spec:
        raise SpecError(f"empty teacher spec; expected one of: {TEACHER_FORMS}")
    if spec.startswith("torchvision:"):
        return _torchvision_teacher(spec, spec.partition(":")[2], num_classes, seed)
    if "@" in spec:
        return _checkpoint_teacher(spec, num_classes, seed)
    if spec.startswith(TIMM_PREFIX):
        model, weights = _timm_model(spec, num_classes, seed)
        return _finish(model, spec, weights, seed)
    if ":" in spec:
        return _factory_teacher(spec, num_classes, seed)
    raise SpecError(f"unknown teacher spec '{spec}'; expected one of: {TEACHER_FORMS}")


def check_output_width(model: torch.nn.Module, spec: str, num_classes: int, size, device) -> None:
    """A teacher with the wrong head would silently cache nonsense: check one forward first."""
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, *size, device=device))
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise SpecError(
            f"teacher '{spec}' outputs {tuple(out.shape[1:])} logits but the dataset has {num_classes} "
            "classes; use a teacher trained on this dataset (or :none weights, built with the right head)"
        )


def ready_teacher(model: nn.Module, spec: str, num_classes: int, size, device: torch.device) -> nn.Module:
    """A teacher as stage one runs it: on ``device``, in eval mode, channels_last on CUDA, head checked."""
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    check_output_width(model, spec, num_classes, size, device)
    return model


def build_ready_teacher(spec: str, num_classes: int, seed: int, size, device: torch.device
                        ) -> tuple[nn.Module, dict]:
    """``build_teacher`` then ``ready_teacher``: what stage one labels with and what verify replays with."""
    model, provenance = build_teacher(spec, num_classes, seed=seed)
    return ready_teacher(model, spec, num_classes, size, device), provenance


def teacher_name(spec: str) -> str:
    """A short store-safe name: 'torchvision:resnet18:none' -> 'resnet18', 'a.b:make' -> 'make'."""
    if spec.startswith(("torchvision:", "timm:")):  # timm:<name>[:pretrained] and timm:<name>@ckpt -> <name>
        base = spec.split(":")[1].partition("@")[0]
    elif "@" in spec:
        base = spec.split("@")[0]
    else:
        base = spec.rsplit(":", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "teacher"
