"""Stage one end to end through the real CLI: real zarr on disk, real torchvision teachers (random weights)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import zarr
from helpers import ROOT, TEACHER, assert_same_arrays, cli, runner, small_teach_args, store_arrays, teach, wait_for_done

from kdcache.cli.main import app
from kdcache.stores.logit_store import LogitStore
from kdcache.verify import labelled_in_bf16, tolerance


def small_store(tmp_path: Path, *extra: str, name: str = "s.kdc") -> Path:
    """The shared small run (helpers.SMALL_TEACH: 360 rows, 2 views, 3 shards) into tmp_path/name."""
    out = tmp_path / name
    res = cli(*small_teach_args(out, "--batch-size", "50", *extra))
    assert res.exit_code == 0, res.output
    return out


def test_teach_inspect_verify_roundtrip(tmp_path):
    out = small_store(tmp_path, "--correction", "sort")
    store = LogitStore.open(str(out))
    assert store.num_views == 2 and store.num_rows == 360
    assert store.done("resnet18").all()
    rec = store.read_block("resnet18", 1, 0, store.num_rows)
    assert rec["values"].shape == (360, 5)
    assert np.all(np.diff(rec["values"], axis=1) <= 0), "top-k values are stored descending"
    # sort makes the label the top class of every corrected record
    np.testing.assert_array_equal(rec["indices"][:, 0], store.labels())

    res = runner.invoke(app, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    t = info["teachers"]["resnet18"]
    assert t["k"] == 5 and t["blocks_done"] == f"{2 * store.num_shards}/{2 * store.num_shards}"
    assert 0 < t["bytes_per_record"] < t["dense_float32_bytes_per_record"] * 2
    assert t["changed_by_correction"] == pytest.approx(1 - t["teacher_top1"], abs=1e-9)
    assert set(t["kl_by_temperature"]) == {"1.0", "4.0"}
    # a CPU run is fp32 throughout: verify replays it at fp32 tolerance
    assert store.teacher_attrs("resnet18")["summary"]["bf16_rows"] == 0 and not labelled_in_bf16(store, "resnet18")

    res = runner.invoke(app, ["verify", str(out), "--teacher", TEACHER, "--samples", "16"])
    assert res.exit_code == 0, res.output
    assert "top-1 agreement 100.0%" in res.output


def test_dense_uint8_store_matches_teacher(tmp_path):
    out = small_store(tmp_path, "--k", "all", "--encoding", "uint8")
    res = runner.invoke(app, ["verify", str(out), "--teacher", TEACHER, "--samples", "8"])
    assert res.exit_code == 0, res.output
    store = LogitStore.open(str(out))
    assert store.teacher_attrs("resnet18")["layout"] == "dense"


def test_two_teachers_share_views(tmp_path):
    out = tmp_path / "two.kdc"
    res = teach("digits", "--split", "test", "--teacher", TEACHER, "--teacher", "torchvision:mobilenet_v3_small:none",
                "--k", "3", "--out", str(out))
    assert res.exit_code == 0, res.output
    store = LogitStore.open(str(out))
    assert sorted(store.teachers) == ["mobilenet_v3_small", "resnet18"]
    a = store.read_block("resnet18", 0, 0, 10)["values"]
    b = store.read_block("mobilenet_v3_small", 0, 0, 10)["values"]
    assert not np.allclose(a, b)


def test_rerun_resumes_and_other_command_is_refused(tmp_path):
    out = small_store(tmp_path)
    before = store_arrays(out)
    again = small_store(tmp_path)  # same command: nothing left to do, nothing changes
    after = store_arrays(again)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    res = cli(*small_teach_args(out, "--views", "3"))
    assert res.exit_code == 2
    assert "--overwrite" in res.output


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    args = ["teach", "digits", "--teacher", TEACHER, "--k", "4", "--views", "3", "--view-policy", "crop-flip",
            "--shard-rows", "64", "--chunk-rows", "64", "--batch-size", "16"]
    killed = tmp_path / "killed.kdc"
    cmd = [sys.executable, "-m", "kdcache.cli", *args, "--out", str(killed)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_done(killed, 3, proc, timeout=120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = LogitStore.open(str(killed)).done("resnet18")
    assert not partial.all(), "the run must be killed before it finishes"
    res = runner.invoke(app, [*args, "--out", str(killed)])
    assert res.exit_code == 0, res.output
    clean = tmp_path / "clean.kdc"
    res = runner.invoke(app, [*args, "--out", str(clean)])
    assert res.exit_code == 0, res.output
    assert_same_arrays(killed, clean)
    assert LogitStore.open(str(killed)).verify() == []


@pytest.fixture
def state_dict_path(tmp_path) -> Path:
    torch.manual_seed(5)
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


def test_verify_detects_a_different_teacher(tmp_path, state_dict_path):
    out = small_store(tmp_path)
    other = tmp_path / "other.pt"
    torch.manual_seed(6)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), other)
    res = runner.invoke(app, ["verify", str(out), "--teacher", f"resnet18@{other}", "--samples", "8"])
    assert res.exit_code == 2
    assert "does not reproduce" in res.output


def test_state_dict_teacher(tmp_path, state_dict_path):
    out = tmp_path / "sd.kdc"
    res = teach("digits", "--split", "test", "--teacher", f"resnet18@{state_dict_path}", "--k", "3", "--out", str(out))
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["verify", str(out), "--teacher", f"resnet18@{state_dict_path}", "--samples", "8"])
    assert res.exit_code == 0, res.output


def test_not_a_state_dict_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save([1, 2, 3], bad)
    res = teach("digits", "--split", "test", "--teacher", f"resnet18@{bad}", "--out", str(tmp_path / "x.kdc"))
    assert res.exit_code == 2 and "state dict" in res.output


def test_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    res = teach("digits", "--split", "test", "--teacher", TEACHER, "--out", str(target))
    assert res.exit_code == 2, res.output
    assert target.read_text() == "keep me"


def test_newer_format_store_is_refused(tmp_path):
    out = small_store(tmp_path)
    group = zarr.open_group(str(out), mode="r+")
    attrs = dict(group.attrs["kdcache"])
    attrs["format"] = 99
    group.attrs["kdcache"] = attrs
    res = runner.invoke(app, ["inspect", str(out)])
    assert res.exit_code == 2 and "newer" in res.output


def test_verify_reports_a_corrupt_chunk(tmp_path):
    out = small_store(tmp_path)
    shard_files = sorted(p for p in (out / "teachers" / "resnet18" / "values").rglob("*") if p.is_file()
                         and p.name != "zarr.json")
    target = shard_files[0]
    data = bytearray(target.read_bytes())
    mid = len(data) // 3
    data[mid] ^= 0xFF
    target.write_bytes(bytes(data))
    res = runner.invoke(app, ["verify", str(out)])
    assert res.exit_code == 2
    assert "problem" in res.output


def test_bf16_tolerance_is_wider_and_scales_with_the_row():
    stored = np.array([[8.0, -2.0, 0.5]], dtype=np.float32)
    fp32, bf16 = tolerance(stored, "float16"), tolerance(stored, "float16", bf16=True)
    assert np.all(bf16 > fp32)
    np.testing.assert_allclose(bf16, 2.0**-6 * (8.0 + np.abs(stored)) + 2.0**-11 * np.abs(stored))  # + float16 rounding


def test_rrc_boxes_follow_each_images_aspect_ratio(tmp_path):
    """imagefolder images have their own sizes: RandomResizedCrop's ratio range holds in pixels, not in
    fractions of a square (wide 20 x 80 and tall 80 x 20 images)."""
    from PIL import Image

    from kdcache.teach import TeachConfig, run_teach
    from kdcache.views import RRCFlip

    sizes = {"wide": (20, 80), "tall": (80, 20)}
    for cls, (h, w) in sizes.items():
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (w, h), color=(40 * i, 90, 200)).save(tmp_path / "data" / cls / f"{i}.png")
    out = tmp_path / "rrc.kdc"
    run_teach(TeachConfig(dataset=f"imagefolder:{tmp_path / 'data'}", teachers=[TEACHER], out=str(out), k="all",
                          views=8, view_policy="rrc-flip", image_size=16))
    store = LogitStore.open(str(out))
    views, ids = store.views(), store.manifest_column("sample_id")
    ratios = []
    for v in range(store.num_views):
        for r in range(store.num_rows):
            hw = sizes[str(ids[r]).split("/")[0]]
            _, _, bh, bw = RRCFlip.box({key: views[key][v, r] for key in views}, hw)
            ratios.append(bw / bh)
    ratios = np.asarray(ratios)
    # 3/4 .. 4/3 up to pixel rounding of a box at least a few pixels on a side
    assert ratios.min() > 0.75 * 0.8 and ratios.max() < 4 / 3 * 1.25, (ratios.min(), ratios.max())
