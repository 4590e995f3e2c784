"""`kdcache demo` end to end on digits, with few epochs: every stage runs for real."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from kdcache.demo import _slug, run_demo
from kdcache.stores.logit_store import LogitStore


def test_demo_runs_every_stage_and_writes_the_report(tmp_path: Path):
    results = run_demo(out=str(tmp_path), dataset="digits", epochs=2, teacher_epochs=2, seed=0)
    assert [r["run"] for r in results] == ["ce (hard labels)", "kd from cache", "kd, live teacher",
                                           "kd + sort from cache"]
    store = LogitStore.open(str(tmp_path / "cache.kdc"))
    assert store.num_views == 4 and bool(store.done(store.teachers[0]).all())
    stored = sum(store.nbytes_stored().values())
    for r in results:
        assert len(r["curve"]) == 2 and 0.0 <= r["final_top1"] <= 1.0
        assert r["cache_bytes"] == (stored if "from cache" in r["run"] else 0)
        assert (tmp_path / _slug(r["run"]) / "metrics.parquet").exists()
    with Image.open(tmp_path / "report.png") as im:
        assert im.size[0] > im.size[1] > 100
