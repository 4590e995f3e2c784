"""The store (format 1) on real zarr in tmp dirs: round trips, layout, integrity, refusals."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest
import zarr
from helpers import empty_store
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kdcache.stores import (
    CorruptionError,
    LogitStore,
    StoreError,
    decode_uint8,
    encode_uint8,
    index_dtype,
)
from kdcache.stores.format import block_checksum


def _manifest(labels: np.ndarray) -> dict:
    n = len(labels)
    return {"dataset_index": np.arange(n)[::-1].copy(), "sample_id": [f"s{i}" for i in range(n)], "label": labels}


def _create(url, n=1000, views=2, shard_rows=300, chunk_rows=100, num_classes=10, **kw) -> LogitStore:
    labels = np.random.default_rng(0).integers(0, num_classes, n)
    view_params = {
        "flip": np.random.default_rng(1).integers(0, 2, (views, n)).astype(np.uint8),
        "scale": np.ones((views, n), np.float16),
    }
    return LogitStore.create(
        url,
        labels=labels,
        views=view_params,
        attrs={"dataset": {"spec": "digits"}},
        manifest=_manifest(labels),
        shard_rows=shard_rows,
        chunk_rows=chunk_rows,
        **kw,
    )


def _record(rows: int, k: int, num_classes: int, temps: int = 1, seed: int = 0, dense: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    rec = {
        "values": -np.sort(-rng.standard_normal((rows, k)) * 4, axis=1).astype(np.float32),
        "label_logit": rng.standard_normal(rows).astype(np.float32),
        "tail": rng.standard_normal((rows, temps)).astype(np.float32),
    }
    if not dense:
        rec["indices"] = rng.integers(0, num_classes, (rows, k))
    return rec


def _fill(store: LogitStore, name: str, view: int, k: int, num_classes: int, temps: int = 1, dense=False):
    """Write every shard of a view; return the concatenated records for comparison."""
    parts = []
    for shard in range(store.num_shards):
        start, stop = store.shard_bounds(shard)
        rec = _record(stop - start, k, num_classes, temps, seed=100 * view + shard, dense=dense)
        store.write_block(name, view, shard, rec)
        parts.append(rec)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def test_float16_round_trip_multi_shard(tmp_path):
    store = _create(tmp_path / "s")
    assert (store.num_rows, store.num_views, store.num_shards) == (1000, 2, 4)
    assert [store.shard_bounds(s) for s in range(4)] == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    store.add_teacher("t", num_classes=10, k=3, temperatures=(1.0, 4.0), attrs={"spec": "torchvision:x"})
    ref = _fill(store, "t", 1, 3, 10, temps=2)
    got = LogitStore.open(tmp_path / "s").read_view("t", 1)
    assert set(got) == {"values", "indices", "label_logit", "tail"}
    np.testing.assert_array_equal(got["values"], ref["values"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got["indices"], ref["indices"])
    assert got["indices"].dtype == np.int64 and got["values"].dtype == np.float32
    np.testing.assert_array_equal(got["label_logit"], ref["label_logit"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got["tail"], ref["tail"])
    part = store.read_block("t", 1, 250, 650)  # spans shards and chunks
    np.testing.assert_array_equal(part["indices"], ref["indices"][250:650])
    assert store.done("t").tolist() == [[False] * 4, [True] * 4]
    assert store.verify() == []


def test_uint8_round_trip_error_within_half_step(tmp_path):
    store = _create(tmp_path / "s", n=500, shard_rows=200, chunk_rows=100)
    store.add_teacher("q", num_classes=50, k=8, encoding="uint8")
    ref = _fill(store, "q", 0, 8, 50)
    got = store.read_view("q", 0)
    v = ref["values"].astype(np.float64)
    half_step = (v.max(axis=1) - v.min(axis=1)) / 255 / 2
    err = np.abs(got["values"].astype(np.float64) - v).max(axis=1)
    assert np.all(err <= half_step * (1 + 1e-5) + 1e-6)
    root = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert root["teachers/q/values"].dtype == np.uint8
    assert root["teachers/q/value_scale"].shape == (2, 500)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, (5, 7), elements=st.floats(-1e4, 1e4, width=32)))
def test_uint8_codec_covers_each_row_range(values):
    q, offset, scale = encode_uint8(values)
    decoded = decode_uint8(q, offset, scale).astype(np.float64)
    v = values.astype(np.float64)
    np.testing.assert_array_equal(offset, values.max(axis=1))  # the top logit decodes exactly
    bound = scale.astype(np.float64)[:, None] / 2 + np.abs(v) * 1e-6 + 1e-30
    assert np.all(np.abs(decoded - v) <= bound)


def test_dense_layout_has_no_indices(tmp_path):
    store = _create(tmp_path / "s", n=64, views=1, shard_rows=64, chunk_rows=32)
    with pytest.raises(StoreError, match="k must equal num_classes"):
        store.add_teacher("d", num_classes=10, k=5, layout="dense")
    store.add_teacher("d", num_classes=10, k=10, layout="dense")
    assert "indices" not in zarr.open_group(str(tmp_path / "s"), mode="r")["teachers/d"]
    with pytest.raises(StoreError, match="expected"):
        store.write_block("d", 0, 0, _record(64, 10, 10))  # carries indices
    ref = _fill(store, "d", 0, 10, 10, dense=True)
    got = store.read_view("d", 0)
    assert "indices" not in got
    np.testing.assert_array_equal(got["values"], ref["values"].astype(np.float16).astype(np.float32))


def test_int32_indices_for_many_classes(tmp_path):
    assert index_dtype(65535) == np.uint16 and index_dtype(65536) == np.int32
    store = _create(tmp_path / "s", n=20, views=1, shard_rows=20, chunk_rows=20)
    store.add_teacher("big", num_classes=70000, k=4)
    rec = _record(20, 4, 70000)
    rec["indices"][0] = [69999, 65536, 3, 0]
    store.write_block("big", 0, 0, rec)
    assert zarr.open_group(str(tmp_path / "s"), mode="r")["teachers/big/indices"].dtype == np.int32
    np.testing.assert_array_equal(store.read_view("big", 0)["indices"], rec["indices"])
    rec["indices"][0, 0] = 70000
    with pytest.raises(StoreError, match="outside"):
        store.write_block("big", 0, 0, rec)


def test_chunk_and_shard_sizes_round_up(tmp_path):
    store = _create(tmp_path / "s", n=1000, views=1, shard_rows=100, chunk_rows=64)
    assert (store.chunk_rows, store.shard_rows, store.num_shards) == (64, 128, 8)
    assert store.shard_bounds(7) == (896, 1000)
    store.add_teacher("t", num_classes=10, k=2)
    arr = zarr.open_group(str(tmp_path / "s"), mode="r")["teachers/t/values"]
    assert (arr.chunks, arr.shards) == ((1, 64, 2), (1, 128, 2))
    with pytest.raises(StoreError, match="out of range"):
        store.shard_bounds(8)


def test_done_and_checksum_only_after_a_complete_write(tmp_path):
    store = _create(tmp_path / "s")
    store.add_teacher("t", num_classes=10, k=3)
    assert not store.done("t").any()
    root = zarr.open_group(str(tmp_path / "s"), mode="r")
    assert not root["teachers/t/checksum"][:].any()
    bad = _record(300, 3, 10)
    bad["tail"] = bad["tail"][:-1]
    with pytest.raises(StoreError, match="shape"):
        store.write_block("t", 1, 2, bad)
    assert not store.done("t").any() and not root["teachers/t/checksum"][:].any()
    store.write_block("t", 1, 2, _record(300, 3, 10))
    expected = np.zeros((2, 4), bool)
    expected[1, 2] = True
    np.testing.assert_array_equal(store.done("t"), expected)
    raw = {name: root[f"teachers/t/{name}"][1, 600:900] for name in ("values", "indices", "label_logit", "tail")}
    raw["block_stats"] = root["teachers/t/block_stats"][1, 2]  # covered too (teacher attr checksum_covers)
    covers = tuple(store.teacher_attrs("t")["checksum_covers"])
    assert covers == ("values", "indices", "label_logit", "tail", "block_stats")
    checksum = int(root["teachers/t/checksum"][1, 2])
    assert checksum == block_checksum(raw, covers) != 0 and checksum != block_checksum(raw)
    store.write_block("t", 1, 2, _record(300, 3, 10))  # idempotent rewrite
    assert int(root["teachers/t/checksum"][1, 2]) == checksum and store.verify("t") == []


def test_verify_finds_a_flipped_byte(tmp_path):
    store = _create(tmp_path / "s", n=400, views=1, shard_rows=200, chunk_rows=50)
    store.add_teacher("t", num_classes=10, k=5)
    _fill(store, "t", 0, 5, 10)
    assert store.verify() == []
    shard_file = tmp_path / "s" / "teachers" / "t" / "values" / "c" / "0" / "1" / "0"
    data = bytearray(shard_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    problems = LogitStore.open(tmp_path / "s").verify()
    assert len(problems) == 1
    assert problems[0].startswith("view 0 shard 1 of teacher t:")
    assert "unreadable chunk" in problems[0] or "checksum mismatch" in problems[0]


@pytest.mark.parametrize("path", ["labels", "views/flip", "views/scale"])
def test_verify_finds_silently_changed_labels_and_views(tmp_path, path):
    """A value rewritten in place decodes fine: only the crc32 recorded at creation catches it."""
    _create(tmp_path / "s", n=400, views=2, shard_rows=200, chunk_rows=50)
    assert LogitStore.open(tmp_path / "s").verify() == []
    arr = zarr.open_group(str(tmp_path / "s"), mode="r+")[path]
    index = (123,) if arr.ndim == 1 else (1, 123)
    arr[index] = arr[index] + 1
    problems = LogitStore.open(tmp_path / "s").verify()
    assert problems == [f"{path}: checksum mismatch (crc32 differs from the one recorded at creation)"]


def test_verify_reports_structural_damage(tmp_path):
    store = _create(tmp_path / "s", n=100, views=1, shard_rows=100, chunk_rows=100)
    store.add_teacher("t", num_classes=10, k=5)
    _fill(store, "t", 0, 5, 10)
    shutil.rmtree(tmp_path / "s" / "teachers" / "t" / "tail")
    problems = LogitStore.open(tmp_path / "s").verify()
    assert len(problems) == 1 and "missing array" in problems[0]
    with pytest.raises(StoreError, match="no teacher"):
        store.verify("nope")


def test_read_block_reports_undecodable_chunk(tmp_path):
    store = _create(tmp_path / "s", n=100, views=1, shard_rows=100, chunk_rows=100)
    store.add_teacher("t", num_classes=10, k=5)
    _fill(store, "t", 0, 5, 10)
    shard_file = tmp_path / "s" / "teachers" / "t" / "values" / "c" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[-3] ^= 0xFF  # inside the shard index, guarded by zarr's crc32c
    shard_file.write_bytes(bytes(data))
    with pytest.raises(CorruptionError, match="unreadable chunk"):
        LogitStore.open(tmp_path / "s").read_view("t", 0)


def test_newer_format_refused(tmp_path):
    _create(tmp_path / "s")
    root = zarr.open_group(str(tmp_path / "s"), mode="r+")
    meta = root.attrs["kdcache"]
    root.update_attributes({"kdcache": {**meta, "format": 2}})
    with pytest.raises(StoreError, match=r"store format 2 is newer than this kdcache \(format 1\); upgrade"):
        LogitStore.open(tmp_path / "s")


def test_paths_that_are_not_stores_are_refused(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("hello")
    with pytest.raises(StoreError, match="existing file"):
        _create(f)
    with pytest.raises(StoreError, match="is a file"):
        LogitStore.open(f)
    with pytest.raises(StoreError, match="no store"):
        LogitStore.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x").write_text("x")
    with pytest.raises(StoreError, match="not a kdcache store"):
        LogitStore.open(tmp_path / "plain")
    with pytest.raises(StoreError, match="not a zarr store"):
        _create(tmp_path / "plain", overwrite=True)
    zarr.open_group(str(tmp_path / "z"), mode="w")
    with pytest.raises(StoreError, match="not a kdcache store"):
        LogitStore.open(tmp_path / "z")


def test_existing_store_needs_overwrite(tmp_path):
    _create(tmp_path / "s").add_teacher("t", num_classes=10, k=3)
    with pytest.raises(StoreError, match="already exists"):
        _create(tmp_path / "s")
    store = _create(tmp_path / "s", n=50, shard_rows=50, chunk_rows=50, overwrite=True)
    assert store.num_rows == 50 and store.teachers == []


def test_bad_input_leaves_no_store(tmp_path):
    labels = np.arange(10) % 3
    bad_manifest = {**_manifest(labels), "label": np.zeros(10, int)}
    with pytest.raises(StoreError, match="disagrees"):
        LogitStore.create(tmp_path / "s", labels=labels, views={}, num_views=1, attrs={}, manifest=bad_manifest)
    with pytest.raises(StoreError, match="may not set"):
        LogitStore.create(
            tmp_path / "s", labels=labels, views={}, num_views=1, attrs={"num_rows": 3}, manifest=_manifest(labels)
        )
    with pytest.raises(StoreError, match="plain JSON"):
        LogitStore.create(
            tmp_path / "s", labels=labels, views={}, num_views=1, attrs={"x": np.int64(1)}, manifest=_manifest(labels)
        )
    with pytest.raises(StoreError, match="number of views"):
        LogitStore.create(tmp_path / "s", labels=labels, views={}, attrs={}, manifest=_manifest(labels))
    assert not (tmp_path / "s").exists()


def test_manifest_round_trip(tmp_path):
    labels = np.array([2, 0, 1, 1], np.int64)
    table = pa.table(
        {
            "row": [3, 1, 0, 2],
            "dataset_index": [7, 5, 4, 6],
            "sample_id": ["d", "b", "a", "c"],
            "label": [1, 0, 2, 1],
            "relpath": ["x/d", "x/b", "x/a", "x/c"],
        }
    )
    store = LogitStore.create(tmp_path / "s", labels=labels, views={}, num_views=1, attrs={}, manifest=table)
    got = LogitStore.open(tmp_path / "s").manifest()
    assert got.column_names == ["row", "dataset_index", "sample_id", "label", "relpath"]
    assert got.schema.field("row").type == pa.int64() and got.schema.field("label").type == pa.int32()
    assert got.column("row").to_pylist() == [0, 1, 2, 3]
    assert got.column("sample_id").to_pylist() == ["a", "b", "c", "d"]
    assert got.column("label").to_pylist() == labels.tolist()
    assert (tmp_path / "s" / "manifest.parquet").is_file()
    assert len(store.attrs["manifest_sha256"]) == 64 and store.verify() == []
    (tmp_path / "s" / "manifest.parquet").write_bytes(b"tampered")
    assert store.verify() == ["manifest.parquet: sha256 differs from the one recorded at creation"]


def test_reopen_read_only(tmp_path):
    store = _create(tmp_path / "s")
    store.add_teacher("t", num_classes=10, k=3, attrs={"spec": "torchvision:resnet18"})
    store.write_block("t", 0, 0, _record(300, 3, 10))
    store.set_teacher_attrs("t", eval_accuracy=0.9)
    with pytest.raises(StoreError, match="cannot change"):
        store.set_teacher_attrs("t", k=4)
    ro = LogitStore.open(tmp_path / "s")
    assert ro.mode == "r" and ro.teachers == ["t"]
    assert ro.attrs["dataset"] == {"spec": "digits"} and ro.attrs["format"] == 1
    assert ro.attrs["shard_rows"] == 300 and ro.attrs["chunk_rows"] == 100
    assert ro.teacher_attrs("t") == {
        "spec": "torchvision:resnet18",
        "eval_accuracy": 0.9,
        "num_classes": 10,
        "k": 3,
        "encoding": "float16",
        "layout": "topk",
        "temperatures": [1.0],
        "block_stats_names": [],
        "checksum_covers": ["values", "indices", "label_logit", "tail", "block_stats"],
    }
    np.testing.assert_array_equal(ro.labels(), store.labels())
    assert ro.views()["flip"].shape == (2, 1000) and ro.views(1)["scale"].dtype == np.float16
    assert ro.done("t")[0, 0] and ro.read_block("t", 0, 0, 10)["values"].shape == (10, 3)
    with pytest.raises(StoreError, match="read-only"):
        ro.write_block("t", 0, 1, _record(300, 3, 10))
    with pytest.raises(StoreError, match="read-only"):
        ro.add_teacher("u", num_classes=10, k=3)
    with pytest.raises(StoreError, match="no teacher"):
        ro.read_view("nope", 0)


def test_add_teacher_twice_needs_replace(tmp_path):
    store = _create(tmp_path / "s")
    store.add_teacher("t", num_classes=10, k=3)
    store.write_block("t", 0, 0, _record(300, 3, 10))
    with pytest.raises(StoreError, match="already exists"):
        store.add_teacher("t", num_classes=10, k=3)
    store.add_teacher("t", num_classes=10, k=5, encoding="uint8", replace=True)
    assert not store.done("t").any()
    store.write_block("t", 0, 0, _record(300, 5, 10))
    assert store.read_block("t", 0, 0, 300)["values"].shape == (300, 5)


def test_float16_overflow_names_the_fix(tmp_path):
    store = _create(tmp_path / "s", n=10, views=1, shard_rows=10, chunk_rows=10)
    store.add_teacher("t", num_classes=10, k=2)
    rec = _record(10, 2, 10)
    rec["values"][0, 0] = 1e5
    with pytest.raises(StoreError, match="--encoding uint8"):
        store.write_block("t", 0, 0, rec)
    store.add_teacher("q", num_classes=10, k=2, encoding="uint8")
    store.write_block("q", 0, 0, rec)
    assert store.read_view("q", 0)["values"][0, 0] == pytest.approx(1e5)


def test_memory_url_and_nbytes(tmp_path):
    store = _create("memory://kdcache-test/s", n=100, views=1, shard_rows=50, chunk_rows=50, overwrite=True)
    store.add_teacher("t", num_classes=10, k=3)
    ref = _fill(store, "t", 0, 3, 10)
    got = LogitStore.open("memory://kdcache-test/s").read_view("t", 0)
    np.testing.assert_array_equal(got["indices"], ref["indices"])
    sizes = store.nbytes_stored()
    assert sizes["teachers/t/values"] > 0 and sizes["manifest.parquet"] > 0 and "labels" in sizes
    assert store.verify() == []


def test_block_stats_count_only_done_blocks(tmp_path):
    """Per-block sums survive resumes: they are stored with the block and read back only once done."""
    n = 300
    store = empty_store(tmp_path / "s.kdc", n=n, shard_rows=100, chunk_rows=100)
    store.add_teacher("t", num_classes=4, k=2, stats_names=("rows", "hits"))
    rec = {"values": np.tile([2.0, 1.0], (100, 1)), "indices": np.tile([0, 1], (100, 1)),
           "label_logit": np.full(100, 2.0), "tail": np.zeros((100, 1))}
    store.write_block("t", 0, 1, rec, stats=np.array([100.0, 42.0]))
    stats = store.block_stats("t")
    assert stats.shape == (1, 3, 2)
    np.testing.assert_array_equal(stats.sum(axis=(0, 1)), [100.0, 42.0])
    with pytest.raises(StoreError, match="block stats"):
        store.write_block("t", 0, 0, rec, stats=np.array([1.0]))
    assert not store.done("t")[0, 0]
