"""The benchmark scripts run end to end at toy sizes: benchmarks/imagenet_scale.py --quick,
benchmarks/views.py --quick, benchmarks/linked_and_mixed.py --quick and benchmarks/gpu.sh --dry-run (numbers
are not checked against targets here: those live in benchmarks/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import imagenet_scale  # noqa: E402  (benchmarks/imagenet_scale.py)


def positive(d: dict, *keys: str) -> None:
    for key in keys:
        assert d[key] > 0, (key, d[key])


def test_synthetic_records_are_valid_top_k_records():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 1000, 4096).astype(np.int32)
    rec = imagenet_scale.synthetic_records(rng, labels, 1000)
    assert rec["values"].shape == rec["indices"].shape == (4096, 10)
    assert (np.diff(rec["values"], axis=1) <= 0).all()  # descending, as SparseLogits.from_dense stores them
    idx = np.sort(rec["indices"], axis=1)
    assert idx.min() >= 0 and idx.max() < 1000 and (np.diff(idx, axis=1) > 0).all()  # distinct classes
    assert np.isfinite(rec["tail"]).all() and np.isfinite(rec["label_logit"]).all()
    in_rec = rec["indices"] == labels[:, None]
    # where the label is in the record, its stored logit is the label_logit
    np.testing.assert_array_equal(rec["values"][in_rec], rec["label_logit"][in_rec.any(axis=1)])
    stats = imagenet_scale.record_stats(rec, labels)
    assert 0.6 < stats["top1"] < 0.95 and 0.01 < stats["mean_tail_mass_T1"] < 0.2  # teacher-like, not degenerate


def test_synthetic_records_match_the_records_of_dense_logits_of_the_same_model():
    """The shortcuts (exponential spacings for the top ranks, sampled tail) against the records
    ``SparseLogits.from_dense`` makes of full (rows, 1000) draws of the model SYNTHETIC_NOTE describes."""
    from kdcache.sparse import SparseLogits

    n, classes = 4000, 1000
    rng = np.random.default_rng(1)
    labels = rng.integers(0, classes, n).astype(np.int32)
    fast = imagenet_scale.synthetic_records(np.random.default_rng(2), labels, classes)
    mu, beta = rng.standard_normal(n), 1.8 * np.exp(rng.normal(0.0, 0.3, n))
    g = rng.gumbel(size=(n, classes))
    g[np.arange(n), labels] += 9.0 + 1.5 * rng.standard_t(3, n)
    dense = SparseLogits.from_dense(torch.from_numpy(mu[:, None] + beta[:, None] * g), torch.from_numpy(labels).long(),
                                    10, (1.0, 4.0))
    pairs = {"top value": (fast["values"][:, 0], dense.values[:, 0].numpy()),
             "10th value": (fast["values"][:, 9], dense.values[:, 9].numpy()),
             "tail lse T=1": (fast["tail"][:, 0], dense.tail_lse[:, 0].numpy()),
             "tail lse T=4": (fast["tail"][:, 1], dense.tail_lse[:, 1].numpy()),
             "top-1": (fast["indices"][:, 0] == labels, dense.indices[:, 0].numpy() == labels)}
    for name, (a, b) in pairs.items():
        se = np.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 4 * se, (name, a.mean(), b.mean(), se)


def test_imagenet_scale_quick_writes_its_json(tmp_path):
    out, cache = tmp_path / "imagenet_scale.json", tmp_path / "cache"
    subprocess.run([sys.executable, "benchmarks/imagenet_scale.py", "--quick", "--out", str(out), "--cache-dir",
                    str(cache)], check=True, cwd=ROOT, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert {"machine", "settings", "synthetic", "stores", "measured", "growth", "extrapolations"} <= set(res)
    assert res["quick"] is True
    names = [s[0] for s in res["settings"]["stores"]]
    assert set(res["stores"]) == set(names) and set(res["measured"]["stores"]) == set(names) - {imagenet_scale.PROBE}
    for s in res["stores"].values():
        positive(s["bytes_per_record"], "teacher", "views", "total")
        positive(s["write"], "records_per_s", "write_block_s_total", "create_s")
    for m in res["measured"]["stores"].values():
        assert m["inspect"]["s"]["min"] > 0 and m["verify"]["s"]["min"] > 0 and m["verify"]["peak_rss_mib"]["min"] > 0
        assert m["serve"]["epoch1_rows_per_s"]["min"] > 0 and m["serve"]["epoch2_rows_per_s"]["min"] > 0
        assert m["serve"]["peak_rss_above_imports_mib"]["min"] >= 0
    assert res["measured"]["cli_startup"]["s"]["min"] > 0
    assert res["growth"]["rows"] and set(res["growth"]["linear_or_better"]) == set(
        res["growth"]["per_unit_cost_ratio_largest_over_reference"])
    targets = res["extrapolations"]["targets"]
    assert set(targets) == {"imagenet-1k x 10 views", "imagenet-1k x 100 views", "imagenet-21k x 10 views"}
    for t in targets.values():
        positive(t, "disk_bytes", "write_path_cpu_s", "verify_s", "preload_ram_bytes", "stream_epoch_s")
        assert t["measured"] is False  # toy stores: everything extrapolated
    assert targets["imagenet-21k x 10 views"]["records"] == imagenet_scale.IMAGENET_21K_ROWS * 10
    assert not any(cache.rglob("*.kdc"))  # the temporary stores are deleted without --keep


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, gpu.sh would run the real measurement")
def test_gpu_script_refuses_a_machine_without_a_gpu(tmp_path):
    res = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OUT": str(tmp_path / "gpu")})
    assert res.returncode == 1
    assert res.stderr.strip() == "no CUDA GPU: benchmarks/gpu.sh measures GPU bars; use --dry-run on CPU"
    assert not (tmp_path / "gpu").exists()


def test_gpu_script_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu"
    res = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OUT": str(out)})
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    steps = {name: s["exit"] for name, s in summary["steps"].items()}
    steps.pop("record_path", None)  # runs once benchmarks/record_path.py takes --device
    assert steps == dict.fromkeys(("env", "images", "tune_workers", "teach", "train"), 0)
    assert summary["steps"].get("record_path", {"exit": 0})["exit"] == 0
    env = json.loads((out / "env.json").read_text())
    assert env["device"] == "cpu" and env["dry_run"] is True
    tune = json.loads((out / "tune_workers.json").read_text())
    assert str(tune["best"]) in tune["images_per_s_by_workers"]
    assert min(tune["images_per_s_by_workers"].values()) > 0
    teach = json.loads((out / "teach.json").read_text())
    assert teach["settings"]["workers"] == tune["best"]  # the tuned worker count reached stage one
    assert teach["settings"]["input_size"] == [32, 32]
    positive(teach["throughput"]["summary"], "median_bare_records_per_s", "median_teach_records_per_s")
    train = json.loads((out / "train.json").read_text())
    assert min(min(v) for v in train["student_steps"]["rows_per_s"].values()) > 0
    assert train["student_steps"]["cache_speedup_over_online"] > 0


def test_views_quick_writes_its_json(tmp_path):
    out = tmp_path / "views.json"
    subprocess.run([sys.executable, "benchmarks/views.py", "--quick", "--out", str(out)], check=True, cwd=ROOT,
                   capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert res["quick"] is True and set(res["replay_vs_fresh"]) == set(res["bytes"]) == set(res["settings"]["policies"])
    for e in res["replay_vs_fresh"].values():
        rates = e["wall"]["images_per_s"]
        assert min(rates["replay"]["per_repeat"] + rates["fresh"]["per_repeat"]) > 0
        assert e["breakdown"]["replay_us_per_image"]["total"] > 0 and e["breakdown"]["fresh_us_per_image"]["total"] > 0
    for b in res["bytes"].values():
        assert b["itemsize_bytes_per_view"] > 0 and b["disk_bytes_per_view"] >= b["chunk_payload_bytes_per_view"] > 0


def test_linked_and_mixed_quick_writes_its_json(tmp_path):
    out = tmp_path / "linked_and_mixed.json"
    subprocess.run([sys.executable, "benchmarks/linked_and_mixed.py", "--quick", "--out", str(out)], check=True,
                   cwd=ROOT, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert res["quick"] is True and set(res["replay_check"]) == {"sld_two_view", "cutmix_kd"}
    assert set(res["replay_check"]["sld_two_view"]) == {"weak", "strong"}  # both linked groups served
    for check in res["replay_check"].values():  # the cache holds the teacher's logits of the served pixels
        for d in check.values():
            assert d["max_abs_logit_diff"] <= 2e-3 * max(1.0, d["max_abs_logit"])
    for exp in ("sld_two_view", "cutmix_kd"):
        runs = res["students"][exp]["runs"]
        assert [r["seed"] for r in runs["cache"]] == [r["seed"] for r in runs["online"]] == res["settings"]["seeds"]
        assert all(0 <= r["test_top1"] <= 1 for arm in runs.values() for r in arm)
