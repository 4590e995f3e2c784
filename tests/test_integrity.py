"""Integrity end to end (issue 10): verify says what it found (exit 0 / 3 / 2), every array that matters is
checksummed, `kdcache repair` restores a damaged store to the bytes of an undamaged one, a `teach` rerun
repairs too, and a kill at any step of store creation leaves a store the same command resumes.

Real zarr stores on tmp dirs, the real CLI, real SIGKILLs (a creation step kills its own process when
KDCACHE_CRASH_AT names it, stores/logit_store.py ``_crash_point``, so each step is hit deterministically).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import ROOT, assert_same_arrays, cli, store_arrays

from kdcache.stores import format as fmt
from kdcache.stores.logit_store import CREATION_STEPS, LogitStore

# digits test split (360 rows), 2 crop-flip views, 128-row shards: 3 shards x 2 views = 6 blocks of a tiny CNN
ARGS = ("teach", "digits", "--split", "test", "--teacher", "kdcache.models:tiny_cnn", "--k", "5", "--views", "2",
        "--view-policy", "crop-flip", "--shard-rows", "128", "--chunk-rows", "64", "--batch-size", "64")
NAME = "tiny_cnn"


def run_teach(out: Path):
    res = cli(*ARGS, "--out", out)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An undamaged store made by ARGS: what every repaired or resumed store must equal, byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "ref.kdc"
    run_teach(out)
    return out


@pytest.fixture
def store(tmp_path, reference) -> Path:
    """A fresh copy of the reference store, to damage."""
    out = tmp_path / "s.kdc"
    shutil.copytree(reference, out)
    return out


def chunk_file(store: Path, array: str, *index: int) -> Path:
    return store.joinpath("teachers", NAME, array, "c", *map(str, index))


def flip(path: Path, at: int | None = None, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= mask
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ verify
def test_verify_exits_3_on_an_unfinished_store_and_names_the_command_that_finishes_it(store, reference):
    st = LogitStore.open(str(store), mode="r+")
    st.reset_blocks(NAME, [(0, 1), (1, 2)])  # what a kill after 4 of 6 blocks leaves
    res = cli("verify", store)
    assert res.exit_code == 3, res.output
    assert f"teacher {NAME}: 4/6 blocks done" in res.output
    assert f"2 block(s) unfinished; finish it with: kdcache repair {store}" in res.output
    res = cli("repair", store)
    assert res.exit_code == 0, res.output
    assert f"repaired: teacher {NAME}: 2 block(s) recomputed" in res.output
    assert cli("verify", store).exit_code == 0
    assert_same_arrays(store, reference)


@pytest.mark.parametrize("what", ["block_stats", "done", "checksum", "values", "labels", "views", "manifest"])
def test_verify_catches_a_changed_byte_in_every_array_that_matters(store, what):
    """block_stats and the done byte were the two misses of the issue's 20 flips: both are caught now."""
    if what == "block_stats":  # uncompressed float64: a flipped byte decodes fine, only the checksum sees it
        flip(chunk_file(store, "block_stats", 0, 1, 0))
    elif what == "done":  # 0x01 -> 0xFE reads as true to numpy: only a strict look at the byte sees it
        flip(chunk_file(store, "done", 1, 2), at=0)
        assert chunk_file(store, "done", 1, 2).read_bytes() == b"\xfe"
    elif what == "checksum":
        flip(chunk_file(store, "checksum", 0, 0), at=0, mask=0x01)
    elif what == "values":
        flip(chunk_file(store, "values", 1, 0, 0))
    elif what == "labels":
        flip(store / "labels" / "c" / "0")
    elif what == "views":
        flip(store / "views" / "dx" / "c" / "1" / "0")
    else:
        flip(store / "manifest.parquet")
    res = cli("verify", store)
    assert res.exit_code == 2, res.output
    assert res.output.count("problem: ") == 1, res.output
    block = what in ("block_stats", "done", "checksum", "values")
    assert ("kdcache repair" in res.output) == block and ("--overwrite" in res.output) != block


def test_every_single_byte_flip_is_found_or_harmless(store):
    """Flip the first, middle and last byte of a data file of every array (and the manifest): verify reports a
    problem, or the flip changed nothing a reader sees (e.g. an unused header bit)."""
    before = store_arrays(store)
    files = [store / "manifest.parquet"] + [min(p for p in zarr_json.parent.rglob("*") if p.is_file() and p.name !=
                                                "zarr.json") for zarr_json in store.rglob("zarr.json")
                                            if json.loads(zarr_json.read_text())["node_type"] == "array"]
    assert len(files) == 1 + 1 + 3 + 7  # manifest, labels, views dy/dx/flip, the teacher's 7 arrays
    caught = harmless = 0
    for path in files:
        original = path.read_bytes()
        for at in sorted({0, len(original) // 2, len(original) - 1}):
            flip(path, at)
            problems = LogitStore.open(str(store)).verify()
            if problems:
                caught += 1
            else:
                after = store_arrays(store)
                assert all(np.array_equal(before[k], after[k]) for k in before), (path, at)
                harmless += 1
            path.write_bytes(original)
    assert caught > 10 * harmless, (caught, harmless)


def test_a_store_made_before_stats_were_checksummed_still_verifies(store):
    """Teachers without the checksum_covers attr (older kdcache): their checksums cover the block data only."""
    group = zarr.open_group(str(store), mode="r+")[f"teachers/{NAME}"]
    attrs = group.attrs.asdict()
    del attrs[fmt.CHECKSUM_COVERS]
    group.attrs.put(attrs)
    st = LogitStore.open(str(store), mode="r+")
    t = st._teacher(NAME)
    for v in range(st.num_views):
        for s in range(st.num_shards):
            a, b = st.shard_bounds(s)
            t.checksum[v, s] = fmt.block_checksum(st._read_raw(t, v, a, b))  # what the old writer stored
    assert LogitStore.open(str(store)).verify() == []
    assert cli("verify", store).exit_code == 0
    flip(chunk_file(store, "values", 0, 0, 0))
    assert len(LogitStore.open(str(store)).verify()) == 1


# ------------------------------------------------------------------------------------------ repair
def test_repair_restores_the_bytes_of_an_undamaged_store(store, reference):
    flip(chunk_file(store, "block_stats", 0, 1, 0))
    flip(chunk_file(store, "done", 1, 2), at=0)
    flip(chunk_file(store, "values", 1, 0, 0))
    res = cli("repair", store)
    assert res.exit_code == 0, res.output
    assert f"damaged: teacher {NAME}: 3 block(s) failed their checks" in res.output
    assert f"repaired: teacher {NAME}: 3 block(s) recomputed" in res.output
    assert_same_arrays(store, reference)
    assert cli("verify", store).exit_code == 0
    res = cli("repair", store)
    assert res.exit_code == 0 and f"ok: teacher {NAME}: nothing to repair" in res.output


def test_a_teach_rerun_on_a_damaged_store_repairs_it(store, reference, caplog):
    flip(chunk_file(store, "block_stats", 1, 1, 0))
    flip(chunk_file(store, "indices", 0, 2, 0))
    with caplog.at_level("WARNING", logger="kdcache"):
        run_teach(store)
    assert any("2 damaged block(s)" in r.getMessage() for r in caplog.records)
    assert_same_arrays(store, reference)


def test_damaged_labels_are_refused_in_one_line_by_repair_and_by_a_rerun(store):
    flip(store / "labels" / "c" / "0")
    for res in (cli("repair", store), cli(*ARGS, "--out", store)):
        assert res.exit_code == 2, res.output
        line = res.output.strip().splitlines()[-1]
        assert line.startswith("error: ") and "labels" in line and "--overwrite" in line


# ------------------------------------------------------------------------------------------ creation
HARNESS = """
import json, os, sys
from kdcache.cli.main import app
args, outs, results = json.loads(sys.argv[1]), json.loads(sys.argv[2]), {}
for step, out in outs.items():
    pid = os.fork()  # this process has done no zarr or torch work yet: the child starts clean
    if pid == 0:
        os.environ["KDCACHE_CRASH_AT"] = step
        code = 0
        try:
            app([*args, "--out", out], standalone_mode=False)
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    results[step] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
print(json.dumps(results))
"""


def test_a_kill_at_every_step_of_creation_resumes_to_the_same_store(tmp_path, reference):
    """SIGKILL at each step of creating the store and adding its teacher, then the plain command again
    (no --overwrite): it resumes to a store identical to an uninterrupted run."""
    outs = {step: str(tmp_path / step.replace(":", "-")) for step in CREATION_STEPS}
    proc = subprocess.run([sys.executable, "-c", HARNESS, json.dumps(ARGS), json.dumps(outs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {step: signal.SIGKILL for step in CREATION_STEPS}
    for step, out in outs.items():
        if step.startswith("create:") and step not in ("create:start", "create:done"):
            assert LogitStore.in_creation(out), step  # killed mid-creation: it says so ...
            res = cli("verify", out)
            assert res.exit_code == 3 and "rerun the `kdcache teach` command" in res.output, (step, res.output)
        res = cli(*ARGS, "--out", out)  # ... and the same command resumes it
        assert res.exit_code == 0, (step, res.output)
        assert_same_arrays(out, reference)


def test_a_half_made_store_of_another_command_still_needs_overwrite(tmp_path):
    out = tmp_path / "s.kdc"
    out.mkdir()
    (out / fmt.CREATING).write_text(json.dumps({"identity": {"dataset": "something else"}}))
    (out / "labels").mkdir()
    res = cli(*ARGS, "--out", out)
    assert res.exit_code == 2 and "another command was interrupted" in res.output and "--overwrite" in res.output
    assert (out / "labels").is_dir()
    run_teach_overwrite = cli(*ARGS, "--out", out, "--overwrite")
    assert run_teach_overwrite.exit_code == 0, run_teach_overwrite.output
    assert not LogitStore.in_creation(out) and LogitStore.open(str(out)).done(NAME).all()
