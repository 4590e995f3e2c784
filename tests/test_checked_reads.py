"""Stage two checks every block it reads: done, crc32 once per store instance, class ids in range.

One small sampled store (digits test split, tiny_cnn, 2 crop-flip views, 3 shards of 128 rows: 6 blocks;
a sampled record has all five record arrays: values, indices, counts, label_logit, tail) is damaged in
copies: flipped bytes, a deleted chunk file, cleared done flags, out-of-range class ids. `kdcache train`
must refuse each with one line and exit 2, the public loader with a one-line error, never train on it.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import cli

import kdcache
from kdcache.loader import PartialStoreWarning
from kdcache.soft_labels import SoftLabels
from kdcache.stores.errors import CorruptionError, StoreError
from kdcache.stores.logit_store import LogitStore

TEACHER = "tiny_cnn"
ARRAYS = ("values", "indices", "label_logit", "tail", "counts")
VIEWS, SHARDS, ROWS, SHARD_ROWS = 2, 3, 360, 128
TRAIN = ("--student", "tiny_cnn", "--loss", "kd", "--epochs", "1", "--max-steps-per-epoch", "1", "--workers", "0")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checked") / "s.kdc"
    res = cli("teach", "digits", "--split", "test", "--teacher", f"kdcache.models:{TEACHER}", "--k", "sampled:4",
              "--views", str(VIEWS), "--view-policy", "crop-flip", "--shard-rows", str(SHARD_ROWS),
              "--chunk-rows", "64", "--out", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def copy(pristine, tmp_path) -> Path:
    dst = tmp_path / "s.kdc"
    shutil.copytree(pristine, dst)
    return dst


def shard_file(store: Path, array: str, view: int, shard: int) -> Path:
    """The file holding one block of a (V, N, .) or (V, N) array (shards (1, S, .): one file per block)."""
    base = store / "teachers" / TEACHER / array / "c" / str(view) / str(shard)
    return base / "0" if base.is_dir() else base


def one_error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    return lines[0]


def train(store: Path, out: Path, *extra: str):
    return cli("train", store, *TRAIN, "--out", out, *extra)


def stream_every_view(store: Path) -> None:
    """Serve one streamed epoch of every view (cycle: epoch e reads view e - 1) from a fresh store instance."""
    soft = SoftLabels(LogitStore.open(store), TEACHER, preload="no")
    for epoch in range(1, VIEWS + 1):
        for _ in soft.batches(soft.order(epoch), 50):
            pass


def test_twenty_random_byte_flips_in_record_arrays_are_all_refused(pristine, tmp_path):
    rng = np.random.default_rng(10)
    refused, harmless, where = 0, 0, set()
    while refused < 20:
        store = tmp_path / f"flip{refused + harmless}.kdc"
        shutil.copytree(pristine, store)
        array = ARRAYS[(refused + harmless) % len(ARRAYS)]
        view, shard = int(rng.integers(VIEWS)), int(rng.integers(SHARDS))
        path = shard_file(store, array, view, shard)
        data = bytearray(path.read_bytes())
        data[int(rng.integers(len(data)))] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        try:  # what zarr itself decodes: a flip the codecs ignore leaves the data intact, and serving it is right
            same = np.array_equal(zarr.open_array(str(pristine / "teachers" / TEACHER / array), mode="r")[:],
                                  zarr.open_array(str(store / "teachers" / TEACHER / array), mode="r")[:])
        except Exception:
            same = False
        if same:
            harmless += 1
            stream_every_view(store)  # the checks do not refuse intact data
            continue
        line = one_error_line(train(store, tmp_path / f"run{refused}"))
        assert ("checksum mismatch" in line or "unreadable chunk" in line) and "kdcache verify" in line, line
        assert not (tmp_path / f"run{refused}" / "student.pt").exists()
        with pytest.raises(CorruptionError) as err:
            stream_every_view(store)
        assert "\n" not in str(err.value)
        refused += 1
        where.add((array, view, shard))
    assert harmless <= 5, f"{harmless} flips left the data intact: the sample says little"
    assert {a for a, _, _ in where} == set(ARRAYS) and {v for _, v, _ in where} == set(range(VIEWS))
    assert {s for _, _, s in where} == set(range(SHARDS))


def test_a_deleted_chunk_is_refused_never_served_as_zeros(copy, tmp_path):
    shard_file(copy, "values", 1, 2).unlink()
    line = one_error_line(train(copy, tmp_path / "run"))
    assert line == (f"error: view 1 shard 2 of teacher '{TEACHER}': checksum mismatch (a chunk is missing or "
                    f"damaged); run `kdcache verify {copy}`")
    loader = kdcache.CachedLoader(str(copy), batch_size=32, preload="no", workers=0)
    loader.set_epoch(2)  # view 1
    with pytest.raises(CorruptionError, match="view 1 shard 2 .* checksum mismatch") as err:
        list(loader)
    assert "\n" not in str(err.value)
    with pytest.raises(CorruptionError, match="view 1 shard 2"):
        kdcache.CachedLoader(str(copy), batch_size=32, preload="yes", workers=0)


def test_class_ids_out_of_range_are_corruption_not_an_index_error(copy, tmp_path):
    """Out-of-range ids under a matching checksum (as a buggy writer would leave them): caught after decoding."""
    group = zarr.open_group(str(copy / "teachers" / TEACHER), mode="r+")
    indices = group["indices"]
    block = indices[0, :SHARD_ROWS]
    block[5, 0] = 40_000
    indices[0:1, :SHARD_ROWS] = block[None]
    store = LogitStore.open(copy)
    t = store._teacher(TEACHER)
    group["checksum"][0, 0] = store._block_crc(t, 0, 0, store._read_raw(t, 0, 0, SHARD_ROWS))
    assert LogitStore.open(copy).verify() == []  # the checksum matches: only the range check can catch it
    line = one_error_line(train(copy, tmp_path / "run"))
    assert "class ids outside [0, 10)" in line
    for checked in (True, False):
        with pytest.raises(CorruptionError, match="class ids outside"):
            LogitStore.open(copy).read_block(TEACHER, 0, 0, 64, checked=checked)


def clear_done(store: Path, *blocks: tuple[int, int]) -> None:
    done = zarr.open_array(str(store / "teachers" / TEACHER / "done"), mode="r+")
    for view, shard in blocks:
        done[view, shard] = False


def test_an_unfinished_store_is_refused_naming_the_command_that_finishes_it(copy, tmp_path):
    clear_done(copy, (1, 1), (0, 2))
    line = one_error_line(train(copy, tmp_path / "run"))
    assert f"2 of {VIEWS * SHARDS} blocks" in line and "--allow-partial" in line
    command = line.split("finish them with `", 1)[1].split("`", 1)[0]
    words = shlex.split(command)
    assert words[:2] == ["kdcache", "teach"] and words[words.index("--out") + 1] == str(copy)
    with pytest.raises(StoreError, match="2 of 6 blocks") as err:
        kdcache.CachedLoader(str(copy), batch_size=32, workers=0)
    assert "\n" not in str(err.value)
    res = cli(*words[1:])  # the command as printed finishes exactly the missing blocks
    assert res.exit_code == 0, res.output
    assert LogitStore.open(copy).done(TEACHER).all()
    assert LogitStore.open(copy).verify() == []
    kdcache.CachedLoader(str(copy), batch_size=32, workers=0)  # no longer refused


def test_allow_partial_trains_on_the_shards_done_in_every_view_only(copy, tmp_path):
    clear_done(copy, (1, 1))
    for array in ARRAYS:  # the unfinished block holds garbage: it must never be read
        shard_file(copy, array, 1, 1).write_bytes(b"half-written")
    allowed = np.r_[0:SHARD_ROWS, 2 * SHARD_ROWS : ROWS]
    res = train(copy, tmp_path / "run", "--allow-partial", "--epochs", "2")
    assert res.exit_code == 0, res.output
    assert f"{len(allowed)} of {ROWS} rows of the 2 of 3 shards done in every view" in res.output
    assert (tmp_path / "run" / "student.pt").exists()
    for preload in ("yes", "no"):
        with pytest.warns(PartialStoreWarning, match="1 of 6 blocks"):
            loader = kdcache.CachedLoader(str(copy), batch_size=32, preload=preload, workers=0, allow_partial=True)
        for epoch in (1, 2, 3):  # both views
            np.testing.assert_array_equal(np.sort(loader.order(epoch).rows), allowed)
            loader.set_epoch(epoch)
            assert sum(len(y) for _, y, _ in loader) == loader.steps() * 32
        with pytest.warns(PartialStoreWarning):
            ranks = [kdcache.CachedLoader(str(copy), batch_size=16, preload=preload, workers=0, rank=r, world=2,
                                          allow_partial=True) for r in range(2)]
        shares = [r.order(1).rows for r in ranks]
        assert not set(shares[0]) & set(shares[1])
        np.testing.assert_array_equal(np.sort(np.concatenate(shares)), allowed)
        assert ranks[0].steps(1) == ranks[1].steps(1) == min(len(s) for s in shares) // 16
    clear_done(copy, (0, 0), (0, 2))  # now no shard is done in both views
    with pytest.raises(StoreError, match="no shard is done in every view"):
        kdcache.CachedLoader(str(copy), batch_size=32, workers=0, allow_partial=True)


def test_each_block_is_checked_once_per_store_instance(pristine):
    store = LogitStore.open(pristine)
    reads: list[tuple[int, int, int]] = []
    real = store._read_raw

    def counting(t, view, start, stop):
        reads.append((view, start, stop))
        return real(t, view, start, stop)

    store._read_raw = counting
    first = store.read_block(TEACHER, 0, 64, 100, checked=True)
    assert reads == [(0, 0, SHARD_ROWS)]  # first touch: the whole block, checked
    again = store.read_block(TEACHER, 0, 64, 100, checked=True)
    assert reads[1:] == [(0, 64, 100)]  # checked already: only the rows asked for
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    reads.clear()
    store.read_block(TEACHER, 0, 100, 300, checked=True)  # shard 0 checked, shards 1-2 not: one read each run
    assert reads == [(0, 100, SHARD_ROWS), (0, SHARD_ROWS, ROWS)]
    reads.clear()
    soft = SoftLabels(store, TEACHER, preload="no", buffer_chunks=1)
    list(soft.batches(soft.order(1), 50))  # view 0: every block checked already
    assert sum(b - a for _, a, b in reads) == ROWS and {v for v, _, _ in reads} == {0}
    reads.clear()
    list(soft.batches(soft.order(2), 50))  # view 1, chunk by chunk: each block read whole once, on first touch
    whole = [(a, b) for _, a, b in reads if b - a == SHARD_ROWS or (a, b) == (2 * SHARD_ROWS, ROWS)]
    assert sorted(whole) == [(0, 128), (128, 256), (256, 360)]
    reads.clear()
    list(soft.batches(soft.order(4), 50))  # view 1 again: no block is read whole any more
    assert sum(b - a for _, a, b in reads) == ROWS and all(b - a <= 64 for _, a, b in reads)
