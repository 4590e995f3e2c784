"""Training from a teacher ensemble of a multi-teacher store (`kdcache train STORE --teacher a,b`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TEACHER, runner

from kdcache.cli.main import app
from kdcache.ensemble import EnsembleRecord, common_temperatures, parse_teachers
from kdcache.loader import CachedLoader
from kdcache.records import get_layout
from kdcache.soft_labels import SoftLabels
from kdcache.sparse import SparseLogits
from kdcache.stores.errors import SpecError
from kdcache.stores.logit_store import LogitStore
from kdcache.teach import TeachConfig, run_teach
from kdcache.train import TrainConfig, run_train

TEACHERS = [TEACHER, "torchvision:mobilenet_v3_small:none"]
ENSEMBLE = "resnet18,mobilenet_v3_small"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ensemble") / "two.kdc"
    run_teach(TeachConfig(dataset="digits", split="test", teachers=TEACHERS, out=str(out), k=4, views=2,
                          view_policy="crop-flip", chunk_rows=128, shard_rows=256))
    return out


def member_records(store: Path, n: int = 100) -> list[SparseLogits]:
    """Each teacher's records of the same first n (view, row) pairs of epoch 1."""
    st = LogitStore.open(str(store))
    out = []
    for name in ENSEMBLE.split(","):
        soft = SoftLabels(st, name, preload="yes", view_schedule="random")
        order = soft.order(1)
        labels = torch.from_numpy(st.labels()[order.rows[:n]].astype(np.int64))
        attrs = st.teacher_attrs(name)
        out.append(get_layout(attrs["layout"]).from_arrays(next(soft.batches(order, n)), labels, attrs, "cpu"))
    return out


def test_ensemble_log_probs_are_the_mean_of_the_members_probabilities(store):
    members = member_records(store)
    ens = EnsembleRecord(tuple(members))
    assert ens.temperatures == (1.0, 4.0) and ens.num_classes == 10 and len(ens) == 100
    for t in (1.0, 4.0, 2.0):  # 2.0: undeclared, each member spreads its tail at T = 2
        mean = torch.stack([m.scaled_logits(t, torch.float64).log_softmax(1).exp() for m in members]).mean(0)
        got = ens.log_probs(t)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double().exp(), mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.double(), mean.log(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ens.logits(), ens.log_probs(1.0))
    # the ensemble differs from each member (two random teachers disagree)
    assert all((ens.log_probs(4.0) - m.log_probs(4.0)).abs().max() > 1e-3 for m in members)
    sub = ens.index(torch.arange(10))
    torch.testing.assert_close(sub.log_probs(4.0), ens.log_probs(4.0)[:10])
    assert torch.equal(ens.to("cpu").labels, ens.labels)


def test_common_temperatures_and_names():
    assert common_temperatures([(1.0, 2.0, 4.0), (1.0, 4.0)]) == (1.0, 4.0)
    assert parse_teachers(" a, b") == ["a", "b"]
    for bad in ("a,a", "a,,b"):
        with pytest.raises(SpecError):
            parse_teachers(bad)


def test_training_from_the_ensemble(tmp_path, store):
    def run(name, teacher, loss="kd"):
        run_train(TrainConfig(source=str(store), student="tiny_cnn", out=str(tmp_path / name), teacher=teacher,
                              loss=loss, epochs=1, batch_size=64, max_steps_per_epoch=3, workers=0))
        return torch.load(tmp_path / name / "student.pt", weights_only=True)

    ens, single = run("ens", ENSEMBLE), run("single", "resnet18")
    assert max((ens[k].double() - single[k].double()).abs().max().item() for k in ens
               if ens[k].is_floating_point()) > 0, "the ensemble is another teacher"
    for loss in ("dkd", "clkd"):  # clkd reads logits(): the ensemble's log-probabilities
        run(loss, ENSEMBLE, loss)
    loader = CachedLoader(store, 16, teacher=ENSEMBLE)
    assert loader.teacher_attrs["temperatures"] == [1.0, 4.0] and len(loader.members) == 2


@pytest.mark.parametrize("extra, needle", [
    (["--correction", "sort"], "ensemble"),
    (["--loss", "sld", "--loss-arg", "views=1"], "ensemble"),
    (["--online-teacher", TEACHERS[0]], "single --teacher"),
    (["--teacher", "resnet18,resnet18"], "twice"),
    (["--teacher", "resnet18,nosuch"], "nosuch"),
])
def test_ensemble_refusals_are_one_line(tmp_path, store, extra, needle):
    args = ["train", str(store), "--student", "tiny_cnn", "--out", str(tmp_path / "x"), "--teacher", ENSEMBLE,
            *extra]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], res.output


def test_cli_trains_from_the_ensemble(tmp_path, store):
    res = runner.invoke(app, ["train", str(store), "--student", "tiny_cnn", "--teacher", ENSEMBLE, "--epochs", "1",
                              "--max-steps-per-epoch", "2", "--workers", "0", "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert math.isfinite(torch.load(tmp_path / "t" / "student.pt", weights_only=True)["head.3.bias"].sum().item())
