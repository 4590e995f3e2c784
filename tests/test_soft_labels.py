"""kdcache.soft_labels: the epoch order and the records served in it, streamed and preloaded."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kdcache.soft_labels import SoftLabels
from kdcache.stores.errors import CorruptionError
from kdcache.stores.logit_store import LogitStore

ROOT = Path(__file__).resolve().parents[1]
ROWS, VIEWS, CLASSES, K, CHUNK = 1000, 3, 20, 4, 64


def make_store(path: Path, rows: int = ROWS, chunk_rows: int = CHUNK, shard_rows: int = 4 * CHUNK) -> LogitStore:
    """A real store whose every (view, row) record differs, so a misplaced row cannot go unseen."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, rows).astype(np.int32)
    store = LogitStore.create(path, labels=labels, views={}, attrs={}, num_views=VIEWS,
                              manifest={"dataset_index": np.arange(rows), "sample_id": [str(i) for i in range(rows)],
                                        "label": labels}, chunk_rows=chunk_rows, shard_rows=shard_rows)
    store.add_teacher("t", num_classes=CLASSES, k=K, temperatures=(1.0, 4.0))
    for view in range(VIEWS):
        for shard in range(store.num_shards):
            a, b = store.shard_bounds(shard)
            values = -np.sort(-rng.normal(size=(b - a, K)), axis=1)
            store.write_block("t", view, shard, {
                "values": values, "indices": rng.integers(0, CLASSES, (b - a, K)),
                "label_logit": rng.normal(size=b - a), "tail": rng.normal(size=(b - a, 2))})
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> LogitStore:
    return make_store(tmp_path_factory.mktemp("soft") / "s.kdc")


def direct(store: LogitStore, views: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The records of (view, row) pairs read straight from the store, one view at a time."""
    whole = [store.read_view("t", v) for v in range(store.num_views)]
    return {key: np.stack([whole[v][key][r] for v, r in zip(views, rows, strict=True)]) for key in whole[0]}


def concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def readers() -> int:
    return sum(t.name == "kdcache-soft-labels" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("schedule", ["cycle", "random"])
@pytest.mark.parametrize("buffer_chunks", [1, 3, 16])
def test_streamed_and_preloaded_serve_the_stores_records_in_order(store, schedule, buffer_chunks):
    stream = SoftLabels(store, "t", preload="no", view_schedule=schedule, buffer_chunks=buffer_chunks)
    ram = SoftLabels(store, "t", preload="yes", view_schedule=schedule)
    for epoch in (1, 2):
        order = stream.order(epoch)
        want = direct(store, order.views, order.rows)
        for drop_last in (True, False):
            # 70 rows: batches straddle the reader's chunk-sized pieces and the buffers
            got_stream = list(stream.batches(order, 70, drop_last=drop_last))
            got_ram = list(ram.batches(order, 70, drop_last=drop_last))
            served = ROWS - ROWS % 70 if drop_last else ROWS
            assert [len(b["values"]) for b in got_stream] == [70] * (ROWS // 70) + ([] if drop_last else [ROWS % 70])
            for got in (got_stream, got_ram):
                assert_same(concat(got), {key: v[:served] for key, v in want.items()})


@pytest.mark.parametrize("preload", ["yes", "no"])
@pytest.mark.parametrize("schedule", ["cycle", "random"])
def test_every_row_once_per_epoch_deterministic_in_seed_and_epoch(store, preload, schedule):
    soft = SoftLabels(store, "t", preload=preload, view_schedule=schedule, seed=3)
    orders = [soft.order(e) for e in (1, 2, 3, 4)]
    for epoch, order in enumerate(orders, start=1):
        assert order.rows.dtype == np.int64 and order.views.dtype == np.int64
        np.testing.assert_array_equal(np.sort(order.rows), np.arange(ROWS))
        assert order.views.min() >= 0 and order.views.max() < VIEWS
        if schedule == "cycle":
            assert (order.views == (epoch - 1) % VIEWS).all()
    again = SoftLabels(store, "t", preload=preload, view_schedule=schedule, seed=3).order(2)
    np.testing.assert_array_equal(again.rows, orders[1].rows)
    np.testing.assert_array_equal(again.views, orders[1].views)
    assert not np.array_equal(orders[0].rows, orders[1].rows)
    other_seed = SoftLabels(store, "t", preload=preload, view_schedule=schedule, seed=4).order(2)
    assert not np.array_equal(other_seed.rows, orders[1].rows)


def test_streamed_batches_are_class_mixed(tmp_path):
    """Stored rows are a seeded permutation of the dataset (pipeline/teach.py), so rows from several
    chunks make a class-mixed batch: rows are permuted across a buffer, never served chunk by chunk."""
    soft = SoftLabels(make_store(tmp_path / "s.kdc"), "t", preload="no", buffer_chunks=4)
    order = soft.order(1)
    spans = [np.ptp(order.rows[a : a + 64]) for a in range(0, ROWS - 64, 64)]
    assert min(spans) > CHUNK  # every batch reaches beyond one chunk


@pytest.mark.parametrize("preload", ["yes", "no"])
@pytest.mark.parametrize("drop_last", [True, False])
def test_skip_serves_exactly_the_tail_of_the_unskipped_batches(store, preload, drop_last):
    soft = SoftLabels(store, "t", preload=preload, buffer_chunks=2)
    order = soft.order(5)
    whole = list(soft.batches(order, 48, drop_last=drop_last))
    for skip in (0, 1, 2, 5, len(whole) - 1, len(whole), len(whole) + 3):
        tail = list(soft.batches(order, 48, drop_last=drop_last, skip=skip))
        assert len(tail) == max(0, len(whole) - skip)
        for a, b in zip(tail, whole[skip:], strict=True):
            assert_same(a, b)


def test_skipped_buffers_are_never_read(tmp_path):
    """Corrupt every chunk that lies wholly inside the skipped batches: skipping them must still serve
    (it never reads them) while serving from the start fails on the corrupt chunk."""
    store = make_store(tmp_path / "s.kdc", chunk_rows=CHUNK, shard_rows=CHUNK)  # a file per chunk
    soft = SoftLabels(store, "t", preload="no", buffer_chunks=2)
    order = soft.order(1)
    skip = -(-order.buffers[2].start // 32)  # the first two buffers lie wholly before batch `skip`
    first, stop = skip * 32, ROWS - ROWS % 32
    want = direct(store, order.views[first:stop], order.rows[first:stop])
    for buf in order.buffers[:2]:
        for chunk, view in zip(buf.chunks, buf.views, strict=True):
            for path in (tmp_path / "s.kdc" / "teachers" / "t").glob(f"*/c/{view}/{chunk}*"):
                for file in [path] if path.is_file() else path.iterdir():
                    file.write_bytes(b"not a blosc chunk")
    assert_same(concat(list(soft.batches(order, 32, skip=skip))), want)
    with pytest.raises(CorruptionError):
        list(soft.batches(order, 32))


@pytest.mark.parametrize("preload", ["yes", "no"])
@pytest.mark.parametrize("rows", [ROWS, 5 * CHUNK + 7])
def test_share_rows_matches_each_ranks_order(tmp_path, preload, rows):
    store = make_store(tmp_path / "s.kdc", rows=rows)
    for world in (1, 2, 3):
        softs = [SoftLabels(store, "t", preload=preload, rank=r, world=world) for r in range(world)]
        for epoch in (1, 2, 7):
            orders = [s.order(epoch) for s in softs]
            assert softs[0].share_rows(epoch) == [len(o) for o in orders]
            assert all(s.share_rows(epoch) == softs[0].share_rows(epoch) for s in softs)
            rows_seen = np.concatenate([o.rows for o in orders])
            np.testing.assert_array_equal(np.sort(rows_seen), np.arange(rows))  # disjoint and covering
            if preload == "yes":  # rank r holds positions r, r + world, ... of the single-process order
                whole = SoftLabels(store, "t", preload=preload).order(epoch)
                for r, o in enumerate(orders):
                    np.testing.assert_array_equal(o.rows, whole.rows[r::world])


def test_the_reader_thread_exits_when_the_consumer_stops_early(store):
    before = readers()
    soft = SoftLabels(store, "t", preload="no", buffer_chunks=1)
    for epoch in (1, 2, 3):
        batches = soft.batches(soft.order(epoch), 16)
        next(batches)
        batches.close()
    deadline = time.monotonic() + 5
    while readers() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert readers() == before


def test_bad_arguments_are_one_line_errors(store):
    from kdcache.stores.errors import SpecError

    with pytest.raises(SpecError, match="buffer_chunks"):
        SoftLabels(store, "t", preload="no", buffer_chunks=0)
    soft = SoftLabels(store, "t", preload="no")
    with pytest.raises(SpecError, match="skip"):
        next(soft.batches(soft.order(1), 10, skip=-1))


def test_the_quick_loader_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "loader.json"
    subprocess.run([sys.executable, "benchmarks/loader.py", "--quick", "--out", str(out),
                    "--cache-dir", str(tmp_path / "cache")], check=True, cwd=ROOT, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert {"machine", "settings", "targets", "serving", "growth", "checks", "images"} <= set(res)
    for epoch in ("first_epoch", "second_epoch"):
        for clock in ("wall", "cpu"):
            assert res["checks"][epoch][clock]["checked_over_unchecked"]["min"] > 0
    assert {"cpu_count", "torch", "zarr", "date"} <= set(res["machine"])
    for name in ("stream", "memmap", "preload"):
        assert res["serving"]["rows_per_s"][name]["min"] > 0
    assert res["serving"]["stream_over_memmap"]["median"] > 0
    assert [g["rows"] for g in res["growth"]] == res["settings"]["growth_rows"]
    assert all(min(g["rows_per_s"]) > 0 and g["peak_rss_above_imports_mib"] >= 0 for g in res["growth"])
    for by_workers in res["images"]["by_workers"].values():
        for rates in by_workers["rows_per_s"].values():
            assert rates["epoch1_with_startup"]["min"] > 0 and rates["epoch2"]["min"] > 0


@pytest.mark.parametrize("preload", ["yes", "no"])
@pytest.mark.parametrize("schedule", ["cycle", "random"])
def test_shards_limits_every_order_and_share_to_those_shards_rows(store, preload, schedule):
    """CachedLoader(allow_partial=True) serves only some shards: orders, records and DDP shares keep to them."""
    shards = [0, 2]  # 256-row shards: rows 0..255 and 512..767 (not the store's last, short shard)
    allowed = np.r_[0:256, 512:768]
    softs = [SoftLabels(store, "t", preload=preload, view_schedule=schedule, shards=shards, rank=r, world=2,
                        buffer_chunks=3) for r in range(2)]
    whole = SoftLabels(store, "t", preload=preload, view_schedule=schedule, shards=shards, buffer_chunks=3)
    for epoch in (1, 2):
        order = whole.order(epoch)
        np.testing.assert_array_equal(np.sort(order.rows), allowed)
        assert_same(concat(list(whole.batches(order, 70, drop_last=False))), direct(store, order.views, order.rows))
        orders = [s.order(epoch) for s in softs]
        assert softs[0].share_rows(epoch) == [len(o) for o in orders]
        np.testing.assert_array_equal(np.sort(np.concatenate([o.rows for o in orders])), allowed)
    everything = SoftLabels(store, "t", preload=preload, view_schedule=schedule, shards=range(store.num_shards))
    np.testing.assert_array_equal(everything.order(3).rows,
                                  SoftLabels(store, "t", preload=preload, view_schedule=schedule).order(3).rows)


def test_unfinished_blocks_are_refused_and_damaged_ones_caught(tmp_path):
    store = make_store(tmp_path / "s.kdc")
    zarr_done = store._teacher("t").done
    zarr_done[1, 0] = False
    from kdcache.stores.errors import StoreError

    with pytest.raises(StoreError, match="view 1 shard 0 of teacher 't' is unfinished"):
        SoftLabels(store, "t", preload="yes")
    soft = SoftLabels(store, "t", preload="no", shards=[1, 2, 3])  # shard 0 left out: never read
    list(soft.batches(soft.order(2), 32))
    for path in (tmp_path / "s.kdc" / "teachers" / "t" / "tail" / "c" / "2" / "1").iterdir():
        path.unlink()  # a deleted chunk reads as zeros: the checksum catches it
    with pytest.raises(CorruptionError, match="view 2 shard 1 of teacher 't': checksum mismatch"):
        list(soft.batches(soft.order(3), 32))
