"""Stage two with real components: a store on disk, a torchvision teacher, a student trained a few steps."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from kdcache.cli.main import app
from kdcache.corrections import apply_correction
from kdcache.models import build_model
from kdcache.soft_labels import SoftLabels
from kdcache.stores.logit_store import LogitStore
from kdcache.teach import TeachConfig, run_teach
from kdcache.train import TrainConfig, run_train

runner = CliRunner()
TEACHER = "torchvision:resnet18:none"


@pytest.fixture(scope="module")
def dense_store(tmp_path_factory) -> Path:
    """k = C, identity views: the cache holds exactly what the live teacher would say (up to float16)."""
    out = tmp_path_factory.mktemp("stores") / "dense.kdc"
    run_teach(TeachConfig(dataset="digits", teachers=[TEACHER], out=str(out), k="all", views=1,
                          chunk_rows=256, shard_rows=512))
    return out


@pytest.fixture(scope="module")
def topk_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "topk.kdc"
    run_teach(TeachConfig(dataset="digits", teachers=[TEACHER], out=str(out), k=4, views=3,
                          view_policy="crop-flip", chunk_rows=256, shard_rows=512))
    return out


def train(tmp_path: Path, source: Path | str, name: str, **kw) -> tuple[list[dict], dict[str, torch.Tensor]]:
    cfg = TrainConfig(source=str(source), student="small_cnn", out=str(tmp_path / name), epochs=1,
                      batch_size=64, lr=0.05, max_steps_per_epoch=6, **kw)
    metrics = run_train(cfg)
    return metrics, torch.load(tmp_path / name / "student.pt", weights_only=True)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def test_cache_and_online_teacher_train_the_same_student(tmp_path, dense_store):
    _, cached = train(tmp_path, dense_store, "cached", loss="kd")
    _, online = train(tmp_path, dense_store, "online", loss="kd", online_teacher=TEACHER)
    _, hard = train(tmp_path, dense_store, "ce", loss="ce")
    # the only difference is float16 storage of the teacher's logits (relative error <= 2**-11)
    assert max_diff(cached, online) < 2e-4
    assert max_diff(cached, hard) > 100 * max_diff(cached, online), "the teacher must change the student"


def test_resume_continues_to_the_uninterrupted_result(tmp_path, topk_store):
    base = dict(loss="dkd", epochs=2, view_schedule="random")
    run_train(TrainConfig(source=str(topk_store), student="small_cnn", out=str(tmp_path / "full"),
                          max_steps_per_epoch=4, **base))
    run_train(TrainConfig(source=str(topk_store), student="small_cnn", out=str(tmp_path / "part"),
                          max_steps_per_epoch=4, **{**base, "epochs": 1}))
    run_train(TrainConfig(source=str(topk_store), student="small_cnn", out=str(tmp_path / "part"),
                          max_steps_per_epoch=4, resume=True, **base))
    full = torch.load(tmp_path / "full" / "student.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "student.pt", weights_only=True)
    assert max_diff(full, part) == 0.0
    metrics = pq.read_table(tmp_path / "part" / "metrics.parquet").to_pylist()
    assert [m["epoch"] for m in metrics] == [1, 2]


@pytest.mark.parametrize("loss", ["kd", "dkd", "ttm", "wttm", "clkd", "sld"])
def test_every_loss_trains_from_a_topk_store(tmp_path, topk_store, loss):
    with pytest.warns(UserWarning) if loss in ("ttm", "wttm") else _nothing():
        metrics, weights = train(tmp_path, topk_store, loss, loss=loss,
                                 loss_args={"views": 1} if loss == "sld" else {})  # one view per step: no groups
    assert np.isfinite(metrics[-1]["train_loss"]) and metrics[-1]["train_loss"] > 0
    init = build_model("small_cnn", 10, seed=0).state_dict()
    assert max_diff(weights, init) > 1e-3, "the loss must train the student"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_train_time_correction_changes_the_targets(tmp_path, topk_store):
    _, plain = train(tmp_path, topk_store, "plain", loss="kd")
    _, sorted_ = train(tmp_path, topk_store, "sort", loss="kd", correction="sort")
    assert max_diff(plain, sorted_) > 0


def test_streamed_and_preloaded_soft_labels_serve_the_same_records(topk_store):
    store = LogitStore.open(str(topk_store))
    for schedule in ("cycle", "random"):
        stream = SoftLabels(store, "resnet18", preload="no", view_schedule=schedule, buffer_chunks=2)
        ram = SoftLabels(store, "resnet18", preload="yes", view_schedule=schedule)
        order = stream.order(epoch=2)
        assert sorted(order.rows.tolist()) == list(range(store.num_rows)), "every row once per epoch"
        for a, b in zip(stream.batches(order, 100), ram.batches(order, 100), strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_teacher_from_dataset_with_ce(tmp_path):
    res = runner.invoke(app, ["train", "digits", "--student", "small_cnn", "--loss", "ce", "--epochs", "2",
                              "--out", str(tmp_path / "t"), "--max-steps-per-epoch", "8"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t" / "student.pt").exists()
    assert len(pq.read_table(tmp_path / "t" / "metrics.parquet")) == 2


def test_correction_on_a_corrected_store_is_refused(tmp_path):
    out = tmp_path / "sorted.kdc"
    run_teach(TeachConfig(dataset="digits", split="test", teachers=[TEACHER], out=str(out), k=3, correction="sort"))
    res = runner.invoke(app, ["train", str(out), "--student", "small_cnn", "--correction", "swap",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "already corrected" in res.output


def one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def test_out_that_is_a_file_is_refused_and_kept(tmp_path, dense_store):
    target = tmp_path / "run.txt"
    target.write_text("keep me")
    line = one_error_line(runner.invoke(app, ["train", str(dense_store), "--student", "small_cnn",
                                              "--out", str(target)]))
    assert "existing file" in line and target.read_text() == "keep me"


def test_resume_with_other_settings_is_refused(tmp_path, dense_store):
    args = ["train", str(dense_store), "--student", "small_cnn", "--epochs", "1", "--max-steps-per-epoch", "2",
            "--out", str(tmp_path / "run")]
    assert runner.invoke(app, [*args, "--loss", "kd"]).exit_code == 0
    line = one_error_line(runner.invoke(app, [*args, "--loss", "dkd", "--resume"]))
    assert "another loss" in line and "'kd' there" in line
    line = one_error_line(runner.invoke(app, [*args, "--loss", "kd", "--student", "tiny_cnn", "--resume"]))
    assert "another student" in line
    # more epochs of the same run is what --resume is for
    res = runner.invoke(app, [*args[:5], "2", *args[6:], "--loss", "kd", "--resume"])
    assert res.exit_code == 0, res.output
    assert [m["epoch"] for m in pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()] == [1, 2]


def test_a_run_shorter_than_the_losss_epoch_settings_says_so(tmp_path, topk_store):
    from kdcache.train import EpochSettingWarning

    with pytest.warns(EpochSettingWarning, match=r"sld_start_epoch 150 >= --epochs 1.*sld_start_epoch=1"):
        train(tmp_path, topk_store, "sld", loss="sld", loss_args={"views": 1, "temperatures": "1,4"})
    with pytest.warns(EpochSettingWarning, match="warmup 20 > --epochs 1"):
        train(tmp_path, topk_store, "dkd", loss="dkd")
    with warnings.catch_warnings():
        warnings.simplefilter("error", EpochSettingWarning)
        train(tmp_path, topk_store, "dkd-short", loss="dkd", loss_args={"warmup": 1})


def test_sld_trains_the_papers_two_linked_views_or_says_how(tmp_path, topk_store):
    base = ["train", str(topk_store), "--student", "small_cnn", "--epochs", "1", "--max-steps-per-epoch", "1",
            "--loss", "sld"]
    line = one_error_line(runner.invoke(app, [*base, "--out", str(tmp_path / "two")]))
    assert "2 linked views" in line and "--view-group" in line and "views=1" in line
    assert not (tmp_path / "two").exists()
    res = runner.invoke(app, [*base, "--loss-arg", "views=1", "--out", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output


def test_only_unbiased_losses_train_from_a_sampled_store(tmp_path):
    store = tmp_path / "sampled.kdc"
    run_teach(TeachConfig(dataset="digits", split="test", teachers=[TEACHER], out=str(store), k="sampled:4"))
    base = ["train", str(store), "--student", "small_cnn", "--epochs", "1", "--max-steps-per-epoch", "2"]
    for loss in ("dkd", "wttm", "clkd", "sld"):
        one_view = ["--loss-arg", "views=1"] if loss == "sld" else []
        line = one_error_line(runner.invoke(app, [*base, "--loss", loss, *one_view, "--out", str(tmp_path / loss)]))
        assert "biased on a sampled record" in line and "kd or ttm" in line
    line = one_error_line(runner.invoke(app, [*base, "--correction", "swap", "--out", str(tmp_path / "swap")]))
    assert "sampled record" in line
    res = runner.invoke(app, [*base, "--loss", "kd", "--out", str(tmp_path / "kd")])
    assert res.exit_code == 0, res.output


def corrected_dense_store(tmp_path: Path, correction: str) -> Path:
    out = tmp_path / f"{correction}.kdc"
    run_teach(TeachConfig(dataset="digits", teachers=[TEACHER], out=str(out), k="all", views=1,
                          chunk_rows=256, shard_rows=512, correction=correction))
    return out


def test_train_time_sort_trains_the_student_of_a_sorted_cache(tmp_path, dense_store):
    """DESIGN §3: a correction at train time on an uncorrected store equals the store cached with it.
    Sort gives every rank its value, so float16 rounding before or after it gives the same record; the
    train-time path reorders the classes inside the record, so sums run in another order (~1e-7 relative),
    which a few SGD steps carry to ~1e-5 in the weights."""
    _, at_train = train(tmp_path, dense_store, "train-time", loss="kd", correction="sort")
    _, cached = train(tmp_path, corrected_dense_store(tmp_path, "sort"), "cached", loss="kd")
    _, plain = train(tmp_path, dense_store, "plain", loss="kd")
    assert max_diff(at_train, cached) < 3e-5
    assert max_diff(at_train, plain) > 100 * max_diff(at_train, cached), "the correction must change the student"


def test_train_time_swap_equals_a_swapped_cache_except_at_float16_ties(tmp_path, dense_store):
    """Swap exchanges the label with *the* argmax. Where the two largest logits round to one float16
    value, the cache (swapped in float32, then rounded) and train time (rounded, then swapped) may pick
    different partners of the tie: both are valid swaps. Every other row is identical."""
    plain, cached = LogitStore.open(str(dense_store)), LogitStore.open(str(corrected_dense_store(tmp_path, "swap")))
    labels = torch.from_numpy(plain.labels().astype(np.int64))
    z = torch.from_numpy(plain.read_view("resnet18", 0)["values"].astype(np.float32))
    at_train = apply_correction("swap", z, labels)
    stored = torch.from_numpy(cached.read_view("resnet18", 0)["values"].astype(np.float32))
    top2 = z.topk(2, dim=1).values
    tie = top2[:, 0] == top2[:, 1]
    differ = (at_train != stored).any(dim=1)
    for record in (stored, at_train):  # the label holds the largest value (argmax up to a float16 tie)
        assert (record.gather(1, labels[:, None])[:, 0] == record.max(dim=1).values).all()
    assert not (differ & ~tie).any(), "rows without a float16 tie must be swapped identically"
    torch.testing.assert_close(at_train.sort(dim=1).values, stored.sort(dim=1).values, rtol=0, atol=0)


def test_a_missing_store_is_named_as_such(tmp_path):
    line = one_error_line(runner.invoke(app, ["train", str(tmp_path / "nope.kdc"), "--student", "small_cnn",
                                              "--out", str(tmp_path / "run")]))
    assert line.startswith(f"error: no store at {tmp_path / 'nope.kdc'}")


def test_a_store_that_lost_its_label_logits_is_refused(tmp_path, dense_store):
    """Every loss and correction may read the label logit; a store without it is damaged, not a variant."""
    import shutil

    damaged = tmp_path / "damaged.kdc"
    shutil.copytree(dense_store, damaged)
    shutil.rmtree(damaged / "teachers" / "resnet18" / "label_logit")
    for loss in ("kd", "dkd"):
        line = one_error_line(runner.invoke(app, ["train", str(damaged), "--student", "small_cnn", "--loss", loss,
                                                  "--out", str(tmp_path / loss)]))
        assert "missing array 'label_logit'" in line and "kdcache verify" in line


def test_the_default_lr_is_the_losss_paper_setting(tmp_path, topk_store):
    import json

    for loss, lr in (("sld", 0.025), ("kd", 0.05)):
        cfg = TrainConfig(source=str(topk_store), student="small_cnn", out=str(tmp_path / loss), loss=loss,
                          epochs=1, max_steps_per_epoch=1, schedule="step",
                          loss_args={"views": 1} if loss == "sld" else {})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sld reads T=2..6, which the store's tail does not declare
            metrics = run_train(cfg)
        assert metrics[0]["lr"] == lr
        assert json.loads((tmp_path / loss / "config.json").read_text())["lr"] == lr
