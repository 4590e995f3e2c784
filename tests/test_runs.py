"""Runs are never lost, configs can be trusted, and Ctrl-C says how to go on (`kdcache train` / `teach`).

Real runs throughout: tiny_cnn on digits for a few steps, stores made by stage one, a JPEG ImageFolder
written with PIL, and subprocesses sent SIGINT."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import cli, wait_for_done
from PIL import Image

from kdcache.stores.logit_store import LogitStore
from kdcache.teach import TeachConfig, run_teach

QUICK = ("--student", "tiny_cnn", "--loss", "ce", "--epochs", "1", "--max-steps-per-epoch", "2")


def train(out: Path, *extra: str, source: str | Path = "digits"):
    return cli("train", source, *QUICK, "--out", out, *extra)


def one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "student.pt", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """digits' test split (360 rows), 2 crop-flip views, top-4 of a random small_cnn."""
    out = tmp_path_factory.mktemp("runs") / "s.kdc"
    run_teach(TeachConfig(dataset="digits", split="test", teachers=["kdcache.models:small_cnn"], out=str(out), k=4,
                          views=2, view_policy="crop-flip"))
    return out


# ------------------------------------------------------------------------------------ runs are never lost
def test_an_existing_run_needs_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    assert train(run).exit_code == 0
    before = {name: (run / name).read_bytes() for name in ("config.json", "checkpoint.pt", "student.pt")}
    line = one_error_line(train(run, "--seed", "1"))
    assert f"--out {run} already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert {name: (run / name).read_bytes() for name in before} == before, "a refused run must write nothing"

    # --overwrite clears the run first: when the new run dies in its first epoch, nothing of the old one is left
    line = one_error_line(train(run, "--overwrite", "--lr", "1e20"))
    assert "training diverged in epoch 1" in line and "step" in line and "--lr" in line
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    assert json.loads((run / "config.json").read_text())["lr"] == 1e20


def test_resume_without_a_checkpoint_is_an_error_naming_it(tmp_path):
    run = tmp_path / "never"
    line = one_error_line(train(run, "--resume"))
    assert f"no checkpoint at {run / 'checkpoint.pt'}" in line
    assert not run.exists()
    assert "pass only one" in one_error_line(train(run, "--resume", "--overwrite"))


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path):
    run = tmp_path / "run"
    assert train(run).exit_code == 0
    config = run / "config.json"
    text, mtime = config.read_text(), config.stat().st_mtime_ns
    line = one_error_line(train(run, "--resume", "--seed", "7"))
    assert "another seed" in line
    assert config.read_text() == text and config.stat().st_mtime_ns == mtime


def test_a_loss_that_becomes_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """Epoch 1 at lr 0.05 is fine; the step decay of 1e8 after epoch 1 makes epoch 2 diverge."""
    run = tmp_path / "run"
    res = cli("train", "digits", "--student", "tiny_cnn", "--loss", "ce", "--epochs", "3", "--max-steps-per-epoch",
              "3", "--milestones", "1", "--lr-decay", "1e8", "--out", run)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("epoch 1/3") and len(lines) == 2, res.output  # epoch 1's line, then the error
    line = lines[1]
    assert line.startswith("error: training diverged in epoch 2: the ") and "5e+06 in this epoch" in line
    assert ("at step" in line or "after its last step" in line) and "keeps the last good epoch, 1" in line
    assert not (run / "student.pt").exists()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert [m["epoch"] for m in pq.read_table(run / "metrics.parquet").to_pylist()] == [1]


BAD_NUMBERS = {
    "--lr": ("-1", "--lr must be a number > 0"),
    "--momentum": ("1", "--momentum must be in [0, 1)"),
    "--weight-decay": ("-1", "--weight-decay must be a number >= 0"),
    "--image-size": ("-5", "--image-size must be an integer in 1..4096"),
    "--workers": ("-3", "--workers must be an integer >= 0"),
    "--epochs": ("0", "--epochs must be an integer >= 1"),
    "--batch-size": ("0", "--batch-size must be an integer >= 1"),
    "--max-steps-per-epoch": ("0", "--max-steps-per-epoch must be an integer >= 1"),
    "--lr-decay": ("0", "--lr-decay must be a number > 0"),
    "--milestones": ("3,2", "--milestones must be ascending epochs >= 1"),
    "--device": ("gpu0", "--device must be auto, cpu, cuda or cuda:N"),
}


@pytest.mark.parametrize("flag", sorted(BAD_NUMBERS))
def test_every_numeric_option_is_checked_up_front(tmp_path, flag):
    value, needle = BAD_NUMBERS[flag]
    line = one_error_line(cli("train", "digits", "--student", "tiny_cnn", "--loss", "ce", "--out", tmp_path / "r",
                              flag, value))
    assert needle in line and value in line
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    assert "has no CUDA GPU" in one_error_line(train(tmp_path / "r", "--device", "cuda"))


def unwritable_targets(tmp_path: Path) -> list[Path]:
    """Paths this user cannot write: a read-only directory (not for root, who may write anyway) and /sys."""
    targets = []
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        targets += [ro, ro / "run"]
    if Path("/sys").is_dir():
        targets += [Path("/sys"), Path("/sys/kdcache-run")]
    return targets


def test_an_unwritable_out_is_one_line_for_train_and_demo(tmp_path):
    targets = unwritable_targets(tmp_path)
    if not targets:
        pytest.skip("no unwritable directory on this machine")
    for target in targets:
        line = one_error_line(train(target))
        assert f"{target}" in line and ("not writable" in line or "cannot write" in line), line
    line = one_error_line(cli("demo", "--out", targets[-1], "--dataset", "digits"))
    assert str(targets[-1]) in line


# ------------------------------------------------------------------------------------ config you can trust
def test_a_runs_config_json_repeats_the_run(tmp_path, store):
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    options = ("--student", "tiny_cnn", "--loss", "kd", "--loss-arg", "T=2", "--correction", "loca",
               "--loca-alpha", "0.8", "--milestones", "1", "--lr-decay", "0.5", "--seed", "3",
               "--max-steps-per-epoch", "2", "--view-schedule", "random")
    assert cli("train", store, *options, "--epochs", "1", "--out", run1).exit_code == 0
    res = cli("train", store, *options, "--epochs", "2", "--out", run1, "--resume")
    assert res.exit_code == 0, res.output
    saved = json.loads((run1 / "config.json").read_text())
    assert saved["resume"] is True and saved["correction_args"] == {"alpha": 0.8}  # resume is not read back

    res = cli("train", "--config", run1 / "config.json", "--out", run2)
    assert res.exit_code == 0, res.output
    assert_same_weights(run1, run2)  # a resumed run equals the uninterrupted one (tests/test_train.py)
    again = json.loads((run2 / "config.json").read_text())
    assert {k: v for k, v in again.items() if k not in ("out", "resume")} == \
        {k: v for k, v in saved.items() if k not in ("out", "resume")}


def test_unknown_config_keys_are_refused_naming_the_closest_option(tmp_path):
    toml = tmp_path / "a.toml"
    toml.write_text("kk = 5\n")
    line = one_error_line(cli("teach", "digits", "--teacher", "kdcache.models:small_cnn", "--out",
                              tmp_path / "x.kdc", "--config", toml))
    assert "unknown key 'kk'" in line and "'k' (--k)" in line
    assert not (tmp_path / "x.kdc").exists()
    toml.write_text("[teach]\nk = 3\n\n[train]\nepoch = 2\n")
    line = one_error_line(train(tmp_path / "r", "--config", toml))
    assert "unknown key 'epoch'" in line and "'epochs'" in line
    data = tmp_path / "b.json"
    data.write_text(json.dumps({"max_steps": 2}))
    assert "'max_steps_per_epoch'" in one_error_line(train(tmp_path / "r", "--config", data))
    data.write_text("{not json")
    assert "cannot read config" in one_error_line(train(tmp_path / "r", "--config", data))


def test_a_config_table_fills_the_options_and_flags_win(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[teach]\nk = 3\n\n[train]\nstudent = "tiny_cnn"\nloss = "ce"\nepochs = 2\n'
                    "max-steps-per-epoch = 1\nseed = 5\n")
    res = cli("train", "digits", "--config", toml, "--epochs", "1", "--out", tmp_path / "r")
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (saved["epochs"], saved["seed"], saved["max_steps_per_epoch"], saved["loss"]) == (1, 5, 1, "ce")


# ------------------------------------------------------------------------------------ evaluation
def image_folder(root: Path, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (16, 16, 3)) + 120 * c  # the classes differ in brightness
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.jpg")
    return root


def test_a_store_without_a_test_split_trains_without_evaluation_or_on_val(tmp_path):
    train_dir, val_dir = image_folder(tmp_path / "train"), image_folder(tmp_path / "val", per_class=4)
    store = tmp_path / "folder.kdc"
    res = cli("teach", f"imagefolder:{train_dir}", "--teacher", "kdcache.models:tiny_cnn", "--image-size", "16",
              "--k", "all", "--out", store)
    assert res.exit_code == 0, res.output
    common = ("--student", "tiny_cnn", "--epochs", "2", "--batch-size", "8")
    res = cli("train", store, *common, "--out", tmp_path / "blind")
    assert res.exit_code == 0, res.output
    warned = [line for line in res.output.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "training without evaluation" in warned[0] and "--val" in warned[0], res.output
    metrics = pq.read_table(tmp_path / "blind" / "metrics.parquet").to_pylist()
    assert len(metrics) == 2 and all(np.isnan(m["test_top1"]) and np.isnan(m["test_top5"]) for m in metrics)
    assert (tmp_path / "blind" / "student.pt").exists()

    res = cli("train", store, *common, "--val", f"imagefolder:{val_dir}", "--out", tmp_path / "val")
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    metrics = pq.read_table(tmp_path / "val" / "metrics.parquet").to_pylist()
    assert all(0.0 <= m["test_top1"] <= 1.0 for m in metrics)
    line = one_error_line(cli("train", store, *common, "--val", "digits", "--out", tmp_path / "wrong"))
    assert "--val digits has 10 classes" in line


# ------------------------------------------------------------------------------------ Ctrl-C
def kdcache_process(*args: str | Path, cwd: Path) -> subprocess.Popen:
    """`kdcache ARGS` in a subprocess that takes SIGINT as Ctrl-C (a background job may inherit it ignored)."""
    return subprocess.Popen([sys.executable, "-m", "kdcache.cli", *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt(proc: subprocess.Popen) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err, err
    return out, err


def printed_command(err: str) -> list[str]:
    lines = err.strip().splitlines()
    assert lines[-1].startswith("  kdcache "), err
    return shlex.split(lines[-1].split("   (")[0])


def test_ctrl_c_during_train_prints_the_command_that_resumes(tmp_path):
    args = ("train", "digits", "--student", "tiny_cnn", "--loss", "ce", "--epochs", "500",
            "--max-steps-per-epoch", "3", "--out", "run")
    proc = kdcache_process(*args, cwd=tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    _, err = interrupt(proc)
    assert "interrupted; resume with:" in err
    command = printed_command(err)
    assert command == ["kdcache", *args, "--resume"]
    done = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"]
    command[command.index("--epochs") + 1] = str(done + 1)  # the same run, one epoch further
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        res = cli(*command[1:])
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0, res.output
    metrics = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()
    assert [m["epoch"] for m in metrics] == list(range(1, done + 2))


def test_ctrl_c_during_teach_prints_the_same_command_and_keeps_finished_blocks(tmp_path):
    args = ("teach", "digits", "--split", "test", "--teacher", "kdcache.models:small_cnn", "--views", "16",
            "--view-policy", "crop-flip", "--shard-rows", "64", "--chunk-rows", "64", "--out", "s.kdc")  # 96 blocks
    proc = kdcache_process(*args, cwd=tmp_path)
    wait_for_done(tmp_path / "s.kdc", 1, proc, teacher="small_cnn")
    _, err = interrupt(proc)
    assert "the same command resumes" in err
    assert printed_command(err) == ["kdcache", *args]
    store = LogitStore.open(str(tmp_path / "s.kdc"))
    done = store.done("small_cnn")
    assert 1 <= done.sum() < done.size, "finished blocks are kept, the rest is left for the rerun"

