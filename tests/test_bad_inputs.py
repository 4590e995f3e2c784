"""Every bad input is clean (issue 10): one line naming the problem and the fix, exit code 2, no traceback,
and nothing half-made: an ``--out`` that did not exist still does not, and every shared store, run and file
the case points at is unchanged (file listing, sizes and mtimes).

One parametrised test over a corpus of (surface, arguments or a callable, a substring of the one line).
CLI surfaces run ``kdcache.cli.main.app`` through ``typer.testing.CliRunner``; the ``api`` surface calls
the public Python API and expects a one-line ``KdcacheError``. Argument strings are formatted with the
shared inputs built once per module (``inputs``): ``{store}`` a small good store, ``{nozarr}``,
``{manifest_cut}``, ... damaged copies of it, ``{out}`` a fresh path that must not exist afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import runner
from PIL import Image

import kdcache
import kdcache.views
from kdcache.cli.main import app
from kdcache.models import build_model
from kdcache.stores.errors import KdcacheError
from kdcache.stores.logit_store import LogitStore

T = "kdcache.models:small_cnn"  # stored as "small_cnn"
MAX_LINE = 200  # characters of the message (after "error: ")


@dataclass(frozen=True)
class Bad:
    """One bad input: where it goes, what is passed (argv strings, or ``fn(inputs, out)`` for the API), and a
    substring the one error line must contain."""

    surface: str  # teach | train | inspect | verify | demo | list | api
    args: tuple[str, ...] | Callable[[SimpleNamespace, Path], Any]
    needle: str


def teach(*args: str, needle: str, teacher: str = T) -> Bad:
    """``kdcache teach digits --split test --teacher TEACHER --out {out} ARGS`` (a later --out wins)."""
    return Bad("teach", ("digits", "--split", "test", "--teacher", teacher, "--out", "{out}", *args), needle)


def teach_raw(*args: str, needle: str) -> Bad:
    """``kdcache teach ARGS`` with nothing filled in."""
    return Bad("teach", args, needle)


def train(*args: str, needle: str, source: str = "{store}") -> Bad:
    return Bad("train", (source, "--student", "tiny_cnn", "--out", "{out}", "--epochs", "1",
                         "--max-steps-per-epoch", "1", *args), needle)


def api(fn: Callable[[SimpleNamespace, Path], Any], needle: str) -> Bad:
    return Bad("api", fn, needle)


def _user_float_images() -> list:
    return [(torch.zeros(1, 4, 4), 0)] * 4  # ToTensor output: float, not uint8


def _wide_module() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 7))  # 7 logits, digits has 10


CASES = {
    # ----------------------------------------------------------------- teach: the dataset
    "teach unknown option": teach_raw("digits", "--teacher", T, "--out", "{out}", "--bogus", needle="--bogus"),
    "teach missing teacher": teach_raw("digits", "--out", "{out}", needle="Missing option '--teacher'"),
    "teach k not a number": teach("--batch-size", "many", needle="'--batch-size'"),
    "train epochs not a number": train("--epochs", "abc", needle="'--epochs'"),
    "teach unknown dataset": teach_raw("nosuchdata", "--teacher", T, "--out", "{out}", needle="unknown dataset"),
    "teach dataset bad seed": teach_raw("digits?seed=x", "--teacher", T, "--out", "{out}", needle="integer"),
    "teach dataset unknown arg": teach_raw("digits?foo=1", "--teacher", T, "--out", "{out}", needle="foo"),
    "teach dataset malformed arg": teach_raw("digits?seed", "--teacher", T, "--out", "{out}", needle="key=value"),
    "teach dataset arg twice": teach_raw("digits?seed=1&seed=2", "--teacher", T, "--out", "{out}", needle="twice"),
    "teach dataset negative seed": teach_raw("digits?seed=-1", "--teacher", T, "--out", "{out}", needle="seed=-1"),
    "teach unknown split": teach("--split", "holdout", needle="split"),
    "teach imagefolder missing": teach_raw("imagefolder:/nonexistent/imgs", "--teacher", T, "--out", "{out}",
                                           needle="not a directory"),
    "teach imagefolder no classes": teach_raw("imagefolder:{empty_dir}", "--teacher", T, "--out", "{out}",
                                              needle="no class folders"),
    "teach imagefolder no images": teach_raw("imagefolder:{no_images}", "--teacher", T, "--out", "{out}",
                                             needle="no images"),
    "teach imagefolder test without val": teach_raw("imagefolder:{no_images}", "--split", "test", "--teacher", T,
                                                    "--out", "{out}", needle="val="),
    "teach imagefolder unreadable image": teach_raw("imagefolder:{bad_images}", "--teacher", T, "--image-size", "8",
                                                    "--k", "all", "--out", "{out}", needle="cannot read 'b/bad.png'"),
    "teach imagefolder unreadable in-process": teach_raw("imagefolder:{bad_images}", "--teacher", T, "--image-size",
                                                         "8", "--k", "all", "--workers", "0", "--out", "{out}",
                                                         needle="cannot read 'b/bad.png'"),
    "teach imagefolder unreadable rrc": teach_raw("imagefolder:{bad_images}", "--teacher", T, "--image-size", "8",
                                                  "--view-policy", "rrc-flip", "--views", "2", "--k", "all",
                                                  "--out", "{out}",
                                                  needle="cannot read 'b/bad.png'"),
    "teach torchvision unknown": teach_raw("torchvision:NoSuchSet", "--teacher", T, "--out", "{out}",
                                           needle="no dataset"),
    "teach torchvision not downloaded": teach_raw("torchvision:CIFAR10?root={empty_dir}", "--teacher", T,
                                                  "--out", "{out}", needle="download=1"),
    "teach torchvision split in spec": teach_raw("torchvision:CIFAR10?train=1", "--teacher", T, "--out", "{out}",
                                                 needle="--split"),
    "teach python dataset name": teach_raw("python:Squares", "--teacher", T, "--out", "{out}",
                                           needle="Python dataset"),
    # ----------------------------------------------------------------- teach: teachers
    "teach unknown teacher form": teach(teacher="nosuch:thing:here", needle="teacher"),
    "teach unknown teacher spec": teach(teacher="resnet18", needle="unknown teacher spec"),
    "teach torchvision arch of kdcache": teach(teacher="torchvision:small_cnn:none", needle="kdcache model"),
    "teach torchvision unknown arch": teach(teacher="torchvision:resnet1800:none", needle="unknown model"),
    "teach torchvision unknown weights": teach(teacher="torchvision:resnet18:NOSUCH", needle="unknown weights"),
    "teach weights missing": teach(teacher="small_cnn@/nonexistent/w.pt", needle="w.pt"),
    "teach weights garbage": teach(teacher="small_cnn@{garbage_pt}", needle="not a weights-only state dict"),
    "teach weights a list": teach(teacher="small_cnn@{list_pt}", needle="state dict"),
    "teach weights other head": teach(teacher="small_cnn@{weights3}", needle="3x128 there"),
    "teach weights 10 on 100 classes": teach_raw("mnist-pairs?n=40", "--split", "test", "--teacher",
                                                 "small_cnn@{weights10}", "--out", "{out}", needle="100"),
    "teach weights other arch": teach(teacher="tiny_cnn@{weights10}", needle="tiny_cnn"),
    "teach factory module missing": teach(teacher="nosuchpkg.mod:make", needle="cannot import"),
    "teach factory attr missing": teach(teacher="kdcache.models:nosuch", needle="cannot import"),
    "teach factory not callable": teach(teacher="kdcache.models:TEACHER_FORMS", needle="not callable"),
    "teach factory not a module": teach(teacher="kdcache.models:list_models", needle="nn.Module"),
    "teach width mismatch": teach(teacher="torchvision.models:resnet18", needle="10 classes"),
    "teach same teacher twice": teach("--teacher", T, needle="same store name"),
    "teach timm unknown": teach(teacher="timm:nosuchnet", needle="unknown timm model"),
    "teach timm bad weights": teach(teacher="timm:resnet18:imagenet", needle="pretrained"),
    # ----------------------------------------------------------------- teach: the record
    "teach k zero": teach("--k", "0", needle="--k"),
    "teach k negative": teach("--k", "-3", needle="--k"),
    "teach k word": teach("--k", "many", needle="--k"),
    "teach k above classes": teach("--k", "11", needle="--k"),
    "teach sampled zero": teach("--k", "sampled:0", needle="sampled"),
    "teach sampled too many": teach("--k", "sampled:300", needle="255"),
    "teach sampled word": teach("--k", "sampled:x", needle="sampled"),
    "teach temperature negative": teach("--temperatures", "1,-4", needle="--temperatures"),
    "teach temperature zero": teach("--temperatures", "0", needle="--temperatures"),
    "teach temperature empty": teach("--temperatures", ",", needle="--temperatures"),
    "teach temperature word": teach("--temperatures", "hot", needle="--temperatures"),
    "teach max-kl negative": teach("--k", "auto", "--max-kl", "-1", needle="--max-kl"),
    "teach proposal without sampled": teach("--proposal-temperature", "4", needle="sampled"),
    "teach proposal undeclared": teach("--k", "sampled:8", "--proposal-temperature", "3", needle="declared"),
    "teach encoding": teach("--encoding", "float8", needle="--encoding"),
    "teach auto over budget": teach("--k", "auto", "--encoding", "uint8", "--max-kl", "1e-9", needle="--max-kl"),
    "teach float16 overflow": teach(teacher="huge_logits_teacher:make", needle="float16"),
    # ----------------------------------------------------------------- teach: views and corrections
    "teach views zero": teach("--views", "0", needle="--views"),
    "teach views negative": teach("--views", "-2", needle="--views"),
    "teach views word": teach("--views", "some", needle="--views"),
    "teach views huge": teach("--views", "1000000000", "--view-policy", "crop-flip", needle="--views"),
    "teach views identity": teach("--views", "3", needle="single view"),
    "teach views all rrc": teach("--views", "all", "--view-policy", "rrc-flip", needle="all"),
    "teach view policy": teach("--view-policy", "mixup", needle="view policy"),
    "teach policy unknown op": teach("--view-policy", "crop-flip | randaugmnt:n=2",
                                     needle="unknown op 'randaugmnt' at character 13"),
    "teach policy empty op": teach("--view-policy", "crop-flip | | cutout", needle="empty op at character 12"),
    "teach policy unknown argument": teach("--view-policy", "crop-flip:size=3", needle="no argument 'size'"),
    "teach policy magnitude": teach("--view-policy", "crop-flip | randaugment:magnitude=31", needle="magnitude"),
    "teach policy probability": teach("--view-policy", "crop-flip | random-erasing:p=1.5", needle="p must be"),
    "teach policy alpha": teach("--view-policy", "crop-flip | mixup:alpha=0", needle="alpha"),
    "teach policy mix first": teach("--view-policy", "mixup", needle="no op before the mix"),
    "teach policy mix not last": teach("--view-policy", "crop-flip | mixup | cutout", needle="must come last"),
    "teach mixing with correction": teach("--view-policy", "crop-flip | mixup", "--correction", "swap",
                                          needle="two labels"),
    "teach view group form": teach("--view-group", "weak", needle="NAME=POLICY"),
    "teach one view group": teach("--view-group", "weak=crop-flip", needle="at least two groups"),
    "teach view groups and policy": teach("--view-group", "a=crop-flip", "--view-group", "b=rrc-flip",
                                          "--view-policy", "crop-flip", needle="not both"),
    "teach correction": teach("--correction", "smooth", needle="correction"),
    "teach loca alpha": teach("--correction", "loca", "--loca-alpha", "2", needle="alpha"),
    "teach loca temperature": teach("--correction", "loca", "--loca-temperature", "0", needle="temperature"),
    "teach loca args without loca": teach("--loca-alpha", "0.5", needle="alpha"),
    # ----------------------------------------------------------------- teach: sizes, devices, workers
    "teach batch size": teach("--batch-size", "0", needle="--batch-size"),
    "teach shard rows": teach("--shard-rows", "0", needle="shard"),
    "teach chunk rows": teach("--chunk-rows", "-1", needle="chunk"),
    "teach image size negative": teach("--image-size", "-5", needle="--image-size"),
    "teach image size zero": teach("--image-size", "0", needle="--image-size"),
    "teach image size huge": teach("--image-size", "100000", needle="at most 4096"),
    "teach seed negative": teach("--seed", "-1", needle="--seed"),
    "teach workers negative": teach("--workers", "-3", needle="--workers"),
    "teach device word": teach("--device", "gpu0", needle="--device"),
    "teach device cuda": teach("--device", "cuda", needle="GPU"),
    "teach device cuda index": teach("--device", "cuda:7", needle="GPU"),
    "teach cluster form": teach("--cluster", "remote:2", needle="local:N"),
    # ----------------------------------------------------------------- teach: where it writes
    "teach out is a file": teach("--out", "{a_file}", needle="existing file"),
    "teach out below a file": teach("--out", "{a_file}/store.kdc", needle="{a_file}"),
    "teach out foreign dir": teach("--out", "{foreign_dir}", needle="no zarr.json"),
    "teach out foreign dir overwrite": teach("--out", "{foreign_dir}", "--overwrite", needle="not a zarr store"),
    "teach out other settings": teach("--k", "4", "--views", "3", "--view-policy", "crop-flip", "--out", "{store}",
                                      needle="--overwrite"),
    "teach out zarr.json gone": teach("--out", "{nozarr}", needle="--overwrite"),
    "teach out locked elsewhere": teach("--k", "4", "--views", "2", "--view-policy", "crop-flip", "--out", "{locked}",
                                        needle="--break-lock"),
    "teach out unknown protocol": teach("--out", "nosuchfs://bucket/s.kdc", needle="nosuchfs"),
    "teach out s3 without s3fs": teach("--out", "s3://bucket/s.kdc", needle="s3"),
    # ----------------------------------------------------------------- inspect
    "inspect missing": Bad("inspect", ("/nonexistent/s.kdc",), "no store"),
    "inspect a file": Bad("inspect", ("{a_file}",), "is a file"),
    "inspect empty dir": Bad("inspect", ("{empty_dir}",), "no zarr.json"),
    "inspect foreign dir": Bad("inspect", ("{foreign_dir}",), "no zarr.json"),
    "inspect zarr.json gone": Bad("inspect", ("{nozarr}",), "zarr.json missing"),
    "inspect attrs stripped": Bad("inspect", ("{noattrs}",), "not a kdcache store"),
    "inspect newer format": Bad("inspect", ("{newer}",), "newer"),
    "inspect teacher attrs lost": Bad("inspect", ("{teacher_attrs_lost}",), "damaged"),
    "inspect teacher array lost": Bad("inspect", ("{teacher_array_lost}",), "damaged"),
    "inspect unknown protocol": Bad("inspect", ("nosuchfs://bucket/s.kdc",), "nosuchfs"),
    # ----------------------------------------------------------------- verify
    "verify samples zero": Bad("verify", ("{store}", "--samples", "0"), "--samples"),
    "verify samples negative": Bad("verify", ("{store}", "--teacher", T, "--samples", "-4"), "--samples"),
    "verify seed negative": Bad("verify", ("{store}", "--teacher", T, "--seed", "-1"), "--seed"),
    "verify missing": Bad("verify", ("/nonexistent/s.kdc",), "no store"),
    "verify zarr.json gone": Bad("verify", ("{nozarr}",), "zarr.json missing"),
    "verify newer format": Bad("verify", ("{newer}",), "newer"),
    "verify teacher not in store": Bad("verify", ("{store}", "--teacher", "torchvision:resnet18:none"), "not in"),
    "verify teacher bad spec": Bad("verify", ("{store}", "--teacher", "nosuch:thing:here"), "not in"),
    "verify teacher weights garbage": Bad("verify", ("{store}", "--teacher", "small_cnn@{garbage_pt}"),
                                          "state dict"),
    "verify device word": Bad("verify", ("{store}", "--teacher", T, "--device", "gpu0"), "--device"),
    "verify device cuda": Bad("verify", ("{store}", "--teacher", T, "--device", "cuda"), "GPU"),
    # ----------------------------------------------------------------- train
    "train unknown loss": train("--loss", "nosuch", needle="unknown loss"),
    "train unknown student": train("--student", "nosuchnet", needle="unknown model"),
    "train student width": train("--student", "torchvision.models:resnet18", needle="logits"),
    "train epochs zero": train("--epochs", "0", needle="--epochs"),
    "train batch size zero": train("--batch-size", "0", needle="--batch-size"),
    "train max steps zero": train("--max-steps-per-epoch", "0", needle="--max-steps-per-epoch"),
    "train schedule": train("--schedule", "linear", needle="--schedule"),
    "train milestones word": train("--milestones", "a,b", needle="--milestones"),
    "train view schedule": train("--view-schedule", "shuffle", needle="cycle"),
    "train preload": train("--preload", "maybe", needle="preload"),
    "train teacher unknown": train("--teacher", "nosuch", needle="nosuch"),
    "train ensemble member unknown": train("--teacher", "small_cnn,nosuch", needle="nosuch"),
    "train fingerprint": train("--dataset", "digits?seed=3", needle="fingerprint"),
    "train correction unknown": train("--correction", "smooth", needle="correction"),
    "train loca alpha": train("--correction", "loca", "--loca-alpha", "1.5", needle="alpha"),
    "train loss-arg form": train("--loss-arg", "T4", needle="KEY=VALUE"),
    "train loss-arg unknown": train("--loss-arg", "gamma9=1", needle="gamma9"),
    "train strict tail": train("--loss", "ttm", "--strict", needle="temperature"),
    "train online teacher bad": train("--online-teacher", "nosuch:thing:here", needle="cannot import"),
    "train needs teacher on dataset": train("--loss", "kd", source="digits", needle="needs a teacher"),
    "train dataset view policy": train("--loss", "ce", "--view-policy", "mixup", source="digits",
                                       needle="view policy"),
    "train recipe unknown": train("--recipe", "dkd/cifar100/res32x4-res9x4", needle="recipe"),
    "train recipe other dataset": train("--recipe", "dkd/cifar100/res32x4-res8x4", needle="cifar100"),
    "train sld one view group": train("--loss", "sld", needle="2 linked views"),
    "train dkd on mixed views live": train("--loss", "dkd", "--online-teacher", T, source="{mixed}",
                                           needle="mixed view"),
    "train correction on mixed views live": train("--correction", "swap", "--online-teacher", T, source="{mixed}",
                                                  needle="two labels"),
    "train dkd on fresh mixed views": train("--loss", "dkd", "--online-teacher", T, "--view-policy",
                                            "crop-flip | mixup", source="digits", needle="mixed view"),
    "train dkd on mixed views": train("--loss", "dkd", source="{mixed}", needle="mixed view"),
    "train correction on mixed views": train("--correction", "sort", source="{mixed}", needle="two labels"),
    "train source zarr.json gone": train(source="{nozarr}", needle="zarr.json missing"),
    "train source manifest cut": train(source="{manifest_cut}", needle="manifest"),
    "train source teacher lost": train(source="{teacher_gone}", needle="teacher"),
    "train out is a file": train("--out", "{a_file}", needle="existing file"),
    "train resume other loss": train("--loss", "dkd", "--resume", "--out", "{run}", needle="another loss"),
    "train image size negative": train("--image-size", "-5", needle="--image-size"),
    "train seed negative": train("--seed", "-1", needle="--seed"),
    "train image size huge": train("--image-size", "100000", needle="--image-size"),
    "train workers negative": train("--workers", "-3", needle="--workers"),
    "train lr negative": train("--lr", "-1", needle="--lr"),
    "train momentum negative": train("--momentum", "-1", needle="--momentum"),
    "train weight decay negative": train("--weight-decay", "-1", needle="--weight-decay"),
    "train device word": train("--device", "gpu0", needle="--device"),
    "train device cuda": train("--device", "cuda", needle="GPU"),
    "train out below a file": train("--out", "{a_file}/run", needle="{a_file}"),
    "train config missing": train("--config", "/nonexistent/c.toml", needle="c.toml"),
    "train config bad toml": train("--config", "{bad_toml}", needle="bad.toml"),
    # ----------------------------------------------------------------- demo and list
    "demo dataset": Bad("demo", ("--out", "{out}", "--dataset", "cifar", "--teacher-epochs", "1"), "digits"),
    "demo teacher epochs zero": Bad("demo", ("--out", "{out}", "--teacher-epochs", "0"), "--teacher-epochs"),
    "demo epochs negative": Bad("demo", ("--out", "{out}", "--epochs", "-1", "--dataset", "digits", "--teacher-epochs",
                                         "1"), "--epochs"),
    "demo out is a file": Bad("demo", ("--out", "{a_file}", "--teacher-epochs", "1"), "{a_file}"),
    "demo out below a file": Bad("demo", ("--out", "{a_file}/demo", "--teacher-epochs", "1"), "{a_file}"),
    "list unknown kind": Bad("list", ("gadgets",), "unknown kind"),
    "list no match": Bad("list", ("losses", "zz*"), "no losses match"),
    "list models no match": Bad("list", ("models", "zzznomatch*"), "no models match"),
    # ----------------------------------------------------------------- the Python API
    "api teach no teacher": api(lambda i, out: kdcache.teach("digits", teachers=[], out=out), "no teacher"),
    "api teach typo option": api(lambda i, out: kdcache.teach("digits", T, out, vews=2), "views"),
    "api teach teachers type": api(lambda i, out: kdcache.teach("digits", 42, out), "spec string"),
    "api teach teacher item type": api(lambda i, out: kdcache.teach("digits", [T, 3.5], out), "float"),
    "api teach spec under other name": api(lambda i, out: kdcache.teach("digits", {"mine": T}, out), "small_cnn"),
    "api teach bad module name": api(lambda i, out: kdcache.teach("digits", {"a b": _wide_module()}, out),
                                     "letters"),
    "api teach module width": api(lambda i, out: kdcache.teach("digits", {"wide": _wide_module()}, out,
                                                               split="test", progress=False), "10 classes"),
    "api teach dataset no len": api(lambda i, out: kdcache.teach(object(), T, out), "len()"),
    "api teach dataset empty": api(lambda i, out: kdcache.teach([], T, out), "empty"),
    "api teach dataset float images": api(lambda i, out: kdcache.teach(_user_float_images(), T, out), "uint8"),
    "api teach dataset bad item": api(lambda i, out: kdcache.teach([(1, 2, 3)], T, out), "(image, label)"),
    "api teach dataset bad label": api(lambda i, out: kdcache.teach([(torch.zeros(1, 4, 4, dtype=torch.uint8), -1)],
                                                                    T, out), "label"),
    "api teach temperatures": api(lambda i, out: kdcache.teach("digits", T, out, temperatures="a,b"), "numbers"),
    "api teach views word": api(lambda i, out: kdcache.teach("digits", T, out, views="many", progress=False),
                                "views"),
    "api teach cluster with objects": api(lambda i, out: kdcache.teach(_user_float_images(), T, out,
                                                                       cluster="local:1"), "cluster="),
    "api open_store missing": api(lambda i, out: kdcache.open_store("/nonexistent/s.kdc"), "no store"),
    "api open_store zarr.json gone": api(lambda i, out: kdcache.open_store(i.nozarr), "zarr.json missing"),
    "api open_store a file": api(lambda i, out: kdcache.open_store(i.a_file), "file"),
    "api open_store unknown teacher": api(lambda i, out: kdcache.open_store(i.store).teacher("nosuch"), "nosuch"),
    "api loader batch size": api(lambda i, out: kdcache.CachedLoader(i.store, batch_size=0), "batch_size"),
    "api loader max steps": api(lambda i, out: kdcache.CachedLoader(i.store, 8, max_steps=0), "max_steps"),
    "api loader workers": api(lambda i, out: kdcache.CachedLoader(i.store, 8, workers=-1), "workers"),
    "api loader image size": api(lambda i, out: kdcache.CachedLoader(i.store, 8, image_size=-5), "image_size"),
    "api loader transform": api(lambda i, out: kdcache.CachedLoader(i.store, 8, transform="flip"), "transform"),
    "api loader teacher": api(lambda i, out: kdcache.CachedLoader(i.store, 8, teacher="nosuch"), "nosuch"),
    "api loader loss": api(lambda i, out: kdcache.CachedLoader(i.store, 8, loss="nosuch"), "nosuch"),
    "api loader preload": api(lambda i, out: kdcache.CachedLoader(i.store, 8, preload="maybe"), "preload"),
    "api loader view schedule": api(lambda i, out: kdcache.CachedLoader(i.store, 8, view_schedule="x"), "cycle"),
    "api loader correction": api(lambda i, out: kdcache.CachedLoader(i.store, 8, correction="smooth"), "smooth"),
    "api loader rank": api(lambda i, out: kdcache.CachedLoader(i.store, 8, rank=3, world=2), "rank"),
    "api loader device": api(lambda i, out: kdcache.CachedLoader(i.store, 8, device="gpu0"), "device"),
    "api loader fingerprint": api(lambda i, out: kdcache.CachedLoader(i.store, 8, dataset="digits?seed=3"),
                                  "fingerprint"),
    "api loader missing store": api(lambda i, out: kdcache.CachedLoader("/nonexistent/s.kdc", 8), "no store"),
    "api loader zarr.json gone": api(lambda i, out: kdcache.CachedLoader(i.nozarr, 8), "zarr.json missing"),
    "api loader manifest cut": api(lambda i, out: kdcache.CachedLoader(i.manifest_cut, 8), "manifest"),
    "api loader epoch zero": api(lambda i, out: kdcache.CachedLoader(i.store, 8).set_epoch(0), "epoch"),
    "api loader bad state": api(lambda i, out: kdcache.CachedLoader(i.store, 8).load_state_dict(
        {**kdcache.CachedLoader(i.store, 8).state_dict(), "seed": 5}), "seed"),
    "api verify samples zero": api(lambda i, out: kdcache.verify(i.store, teacher=T, samples=0), "samples"),
    "api verify seed": api(lambda i, out: kdcache.verify(i.store, teacher=T, seed=-1), "seed"),
    "api verify missing": api(lambda i, out: kdcache.verify("/nonexistent/s.kdc"), "no store"),
    "api verify teacher spec": api(lambda i, out: kdcache.verify(i.store, teacher="nosuch:thing:here"),
                                   "not in"),
    "api verify device": api(lambda i, out: kdcache.verify(i.store, teacher=T, device="gpu0"), "device"),
    "api view policy too many views": api(lambda i, out: kdcache.views.get_view_policy("crop-flip").sample(20_000, 4),
                                          "at most 10000"),
    "api build_model": api(lambda i, out: kdcache.build_model("nosuchnet", 10), "unknown model"),
    "api get_loss": api(lambda i, out: kdcache.get_loss("nosuch"), "nosuch"),
    "api get_layout": api(lambda i, out: kdcache.get_layout("nosuch"), "nosuch"),
    "api apply_correction": api(lambda i, out: kdcache.apply_correction("smooth", torch.zeros(2, 3),
                                                                        torch.zeros(2, dtype=torch.int64)),
                                "smooth"),
}


def case_params() -> list:
    return [pytest.param(case, id=name) for name, case in CASES.items()]


# ---------------------------------------------------------------------------------- shared inputs
def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``path`` (or the file itself) -> (size, mtime_ns): what "unchanged" compares."""
    if path.is_file():
        st = path.stat()
        return {"": (st.st_size, st.st_mtime_ns)}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def damaged(good: Path, name: str, change: Callable[[Path], None]) -> Path:
    """A copy of the good store with one change."""
    copy = good.parent / name
    shutil.copytree(good, copy)
    change(copy)
    return copy


def set_root_attrs(store: Path, change: Callable[[dict], None]) -> None:
    doc = json.loads((store / "zarr.json").read_text())
    change(doc["attributes"])
    (store / "zarr.json").write_text(json.dumps(doc))


def drop_teacher_attrs(store: Path) -> None:
    path = store / "teachers" / "small_cnn" / "zarr.json"
    doc = json.loads(path.read_text())
    doc["attributes"] = {}
    path.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> SimpleNamespace:
    """The shared inputs, made once: a good store, damaged copies, a finished run, weights, files."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good = root / "good.kdc"
    kdcache.teach("digits", teachers=[T], out=good, split="test", k=4, views=2, view_policy="crop-flip",
                  shard_rows=128, chunk_rows=64, progress=False)
    paths = {"store": good}
    paths["mixed"] = root / "mixed.kdc"
    kdcache.teach("digits", teachers=[T], out=paths["mixed"], split="test", k="all", views=1,
                  view_policy="crop-flip | mixup", shard_rows=128, chunk_rows=64, progress=False)
    paths["nozarr"] = damaged(good, "nozarr.kdc", lambda s: (s / "zarr.json").unlink())
    paths["manifest_cut"] = damaged(good, "cut.kdc", lambda s: (s / "manifest.parquet").write_bytes(
        (s / "manifest.parquet").read_bytes()[:100]))
    paths["teacher_gone"] = damaged(good, "gone.kdc", lambda s: shutil.rmtree(s / "teachers" / "small_cnn"))
    paths["teacher_attrs_lost"] = damaged(good, "tattrs.kdc", drop_teacher_attrs)
    paths["teacher_array_lost"] = damaged(good, "tarray.kdc",
                                          lambda s: shutil.rmtree(s / "teachers" / "small_cnn" / "label_logit"))
    paths["noattrs"] = damaged(good, "noattrs.kdc", lambda s: set_root_attrs(s, lambda a: a.clear()))
    paths["newer"] = damaged(good, "newer.kdc", lambda s: set_root_attrs(s, lambda a: a["kdcache"].update(format=99)))
    lock = {"host": "some-other-host", "pid": 1, "pid_start": 1, "started": "2026-01-01T00:00:00Z",
            "command": "kdcache teach", "token": "0" * 32}
    paths["locked"] = damaged(good, "locked.kdc", lambda s: (s / "kdcache.lock").write_text(json.dumps(lock)))
    run = root / "run"
    res = runner.invoke(app, ["train", str(good), "--student", "tiny_cnn", "--loss", "kd", "--epochs", "1",
                              "--max-steps-per-epoch", "1", "--out", str(run)])
    assert res.exit_code == 0, res.output
    paths["run"] = run
    for name, classes in (("weights10", 10), ("weights3", 3)):
        paths[name] = root / f"{name}.pt"
        torch.save(build_model("small_cnn", classes, seed=1).state_dict(), paths[name])
    paths["garbage_pt"] = root / "garbage.pt"
    paths["garbage_pt"].write_bytes(b"this is not a torch file" * 8)
    paths["list_pt"] = root / "list.pt"
    torch.save([1, 2, 3], paths["list_pt"])
    paths["a_file"] = root / "a_file.txt"
    paths["a_file"].write_text("keep me")
    paths["bad_toml"] = root / "bad.toml"
    paths["bad_toml"].write_text("epochs = = 3\n")
    paths["empty_dir"] = root / "empty"
    paths["empty_dir"].mkdir()
    paths["foreign_dir"] = root / "foreign"
    paths["foreign_dir"].mkdir()
    (paths["foreign_dir"] / "notes.txt").write_text("not a store")
    paths["no_images"] = root / "no_images"
    (paths["no_images"] / "cat").mkdir(parents=True)
    (paths["no_images"] / "cat" / "readme.txt").write_text("no images here")
    for cls, data in (("a", None), ("b", b"not a png")):  # one good image, one that PIL cannot read
        (root / "bad_images" / cls).mkdir(parents=True)
        if data is None:
            Image.new("RGB", (8, 8), color=(10, 200, 30)).save(root / "bad_images" / cls / "ok.png")
        else:
            (root / "bad_images" / cls / "bad.png").write_bytes(data)
    paths["bad_images"] = root / "bad_images"
    ns = SimpleNamespace(**{k: str(v) for k, v in paths.items()})
    ns.snapshots = {k: snapshot(Path(v)) for k, v in paths.items()}
    return ns


# ---------------------------------------------------------------------------------- the test
def fill(arg: str, inputs: SimpleNamespace, out: Path) -> str:
    return arg.format(out=out, **{k: v for k, v in vars(inputs).items() if k != "snapshots"})


def shorten(message: str, inputs: SimpleNamespace, out: Path) -> str:
    """The message with the test's long tmp paths written as their placeholders: a user's paths are theirs."""
    paths = {"{out}": str(out), **{f"{{{k}}}": v for k, v in vars(inputs).items() if k != "snapshots"}}
    for name, path in sorted(paths.items(), key=lambda kv: -len(kv[1])):
        message = message.replace(path, name)
    return message


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    return lines[0]


@pytest.mark.parametrize("case", case_params())
def test_bad_input_is_one_clean_line(case: Bad, inputs, tmp_path):
    out = tmp_path / "out.kdc"
    if case.surface == "api":
        with pytest.raises(KdcacheError) as caught:
            case.args(inputs, out)
        message = str(caught.value)
        assert "\n" not in message.strip(), message
    else:
        args = [fill(a, inputs, out) for a in case.args]
        res = runner.invoke(app, [case.surface, *args])
        assert "Traceback" not in res.output, res.output
        assert res.exit_code == 2, res.output
        assert isinstance(res.exception, SystemExit | None), repr(res.exception)
        line = one_line(res.output)
        assert line.startswith("error: "), res.output
        message = line.removeprefix("error: ")
    needle = fill(case.needle, inputs, out)
    assert needle in message, message
    assert len(shorten(message, inputs, out)) <= MAX_LINE, f"{len(shorten(message, inputs, out))} characters: {message}"
    assert "Traceback" not in message and "weights_only=False" not in message, message
    assert not out.exists(), f"{out} was left behind: {sorted(os.listdir(out)) if out.is_dir() else 'a file'}"
    for name, before in inputs.snapshots.items():
        assert snapshot(Path(getattr(inputs, name))) == before, f"the shared input {name} changed"


def test_overwrite_replaces_a_store_whose_zarr_json_is_gone(inputs, tmp_path):
    """The fix the error names works: --overwrite replaces what a damaged store left (a foreign directory is
    still refused: "teach out foreign dir overwrite" above)."""
    broken = tmp_path / "broken.kdc"
    shutil.copytree(inputs.nozarr, broken)
    args = ["teach", "digits", "--split", "test", "--teacher", T, "--k", "4", "--out", str(broken)]
    assert "zarr.json missing" in one_line(runner.invoke(app, args).output)
    res = runner.invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    store = LogitStore.open(str(broken))
    assert store.done("small_cnn").all() and store.num_views == 1


def test_corpus_is_large_and_covers_every_surface():
    """The issue asks for at least 100 cases across every CLI command and the Python API."""
    cases = list(CASES.values())
    assert len(cases) >= 100
    assert {c.surface for c in cases} == {"teach", "train", "inspect", "verify", "demo", "list", "api"}
