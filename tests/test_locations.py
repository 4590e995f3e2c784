"""Where a store lives and who may write it: fsspec URLs (file://, memory://) through the real CLI,
and the driver lock (stores/lock.py) on local disk and on an fsspec filesystem."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import uuid

import fsspec
import numpy as np
import pytest
from helpers import TEACHER, empty_store, runner, small_teach_args

from kdcache.cli.main import app
from kdcache.stores.lock import LOCK_NAME, DriverLock, LockHolder, StoreLockedError, is_lock_file, read_lock
from kdcache.stores.logit_store import LogitStore


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_teach_inspect_verify_on_urls(tmp_path, scheme):
    url = f"file://{tmp_path}/u.kdc" if scheme == "file" else f"memory://kdcache-test-{uuid.uuid4().hex}/u.kdc"
    res = runner.invoke(app, small_teach_args(url))
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["inspect", url, "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["rows"] == 360 and info["teachers"]["resnet18"]["blocks_done"] == "6/6"
    res = runner.invoke(app, ["verify", url, "--teacher", TEACHER, "--samples", "8"])
    assert res.exit_code == 0, res.output
    assert "checksums match" in res.output and "top-1 agreement 100.0%" in res.output
    res = runner.invoke(app, small_teach_args(url))  # resume on a URL: nothing left to do
    assert res.exit_code == 0, res.output
    for preload in ("yes", "no"):  # stage two reads the URL store, preloaded and streamed
        res = runner.invoke(app, ["train", url, "--student", "small_cnn", "--epochs", "1", "--max-steps-per-epoch",
                                  "2", "--preload", preload, "--out", str(tmp_path / f"run-{preload}")])
        assert res.exit_code == 0, res.output
        assert (tmp_path / f"run-{preload}" / "student.pt").exists()
    if scheme == "file":  # the same bytes as through a plain path
        plain = tmp_path / "plain.kdc"
        assert runner.invoke(app, small_teach_args(plain)).exit_code == 0
        a, b = LogitStore.open(url), LogitStore.open(str(plain))
        np.testing.assert_array_equal(a.read_view("resnet18", 1)["values"], b.read_view("resnet18", 1)["values"])
    else:
        fs = fsspec.filesystem("memory")
        fs.rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def test_missing_url_store_is_one_line(tmp_path):
    res = runner.invoke(app, ["inspect", f"memory://nothing-{uuid.uuid4().hex}/x.kdc"])
    assert res.exit_code == 2 and res.output.startswith("error: no store at memory://")


@pytest.mark.parametrize(("url", "needle"), [
    ("s3://bucket/x.kdc", "kdcache[s3]"),
    ("gs://bucket/x.kdc", "kdcache[gcs]"),
    ("nosuchproto://x.kdc", "unknown or unusable location"),
])
def test_uninstalled_or_unknown_backends_are_one_line(tmp_path, url, needle):
    backend = {"s3": "s3fs", "gs": "gcsfs"}.get(url.split("://")[0])
    if backend and importlib.util.find_spec(backend):
        pytest.skip(f"{backend} is installed here: the missing-backend message cannot be shown")
    for args in (["inspect", url], ["teach", "digits", "--split", "test", "--teacher", "torchvision:resnet18:none",
                                    "--out", url]):
        res = runner.invoke(app, args)
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output


# ------------------------------------------------------------------ the lock


def test_lock_is_exclusive_and_released(tmp_path):
    out = tmp_path / "s.kdc"
    with DriverLock(out) as lock:
        holder = read_lock(out)
        assert holder == lock.holder and holder.pid == os.getpid() and holder.host == socket.gethostname()
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()} on host"):
            DriverLock(out).acquire()  # a second driver, even in the same process
    assert read_lock(out) is None
    assert not out.exists(), "a lock that created the directory removes it when nothing else was written"


def test_lock_on_an_fsspec_filesystem():
    url = f"memory://kdcache-lock-{uuid.uuid4().hex}/s.kdc"
    with DriverLock(url):
        assert read_lock(url).pid == os.getpid()
        with pytest.raises(StoreLockedError):
            DriverLock(url).acquire()
    assert read_lock(url) is None


def test_a_path_that_is_a_file_is_refused_and_kept(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("keep")
    with pytest.raises(Exception, match="existing file"):
        DriverLock(target).acquire()
    assert target.read_text() == "keep"


def _write_lock(path, **fields) -> None:
    path.mkdir(exist_ok=True)
    base = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01T00:00:00Z",
            "command": "kdcache teach", "token": "t0"}
    (path / LOCK_NAME).write_text(json.dumps({**base, **fields}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_locks_are_taken_over_on_the_same_host(tmp_path):
    out = tmp_path / "s.kdc"
    _write_lock(out, pid=_dead_pid())
    with DriverLock(out) as lock:
        assert lock.taken_over is not None and lock.taken_over.token == "t0"
        assert read_lock(out).token == lock.holder.token
    # a live pid whose start time differs was reused by another process: also stale
    _write_lock(out, pid=os.getpid(), pid_start=1)
    with DriverLock(out) as lock:
        assert lock.taken_over is not None
    # a live holder (this very process, right start time) is not
    _write_lock(out, pid=os.getpid(), pid_start=LockHolder.me().pid_start)
    with pytest.raises(StoreLockedError, match="--break-lock"):
        DriverLock(out).acquire()
    with DriverLock(out, break_lock=True) as lock:
        assert lock.broken is not None and lock.broken.token == "t0"


def test_other_hosts_and_unreadable_locks_need_break_lock(tmp_path):
    out = tmp_path / "s.kdc"
    _write_lock(out, host="elsewhere", pid=_dead_pid())
    with pytest.raises(StoreLockedError, match="on host elsewhere"):
        DriverLock(out).acquire()
    (out / LOCK_NAME).write_text("garbage")
    with pytest.raises(StoreLockedError, match="unreadable lock file"):
        DriverLock(out).acquire()
    with DriverLock(out, break_lock=True) as lock:
        assert lock.broken is None  # nothing readable was there
    assert out.exists() and not (out / LOCK_NAME).exists()


def test_the_lock_file_is_invisible_to_the_store(tmp_path):
    """The lock must not break `exists`, `nbytes_stored`, `verify`, `--overwrite` or the refusal
    of foreign non-empty directories."""
    out = tmp_path / "s.kdc"
    with DriverLock(out):
        assert not LogitStore.exists(out), "a directory holding only a lock is not a store"
        res = runner.invoke(app, small_teach_args(out))
        assert res.exit_code == 2 and "being written by another kdcache driver" in res.output
    assert runner.invoke(app, small_teach_args(out)).exit_code == 0
    with DriverLock(out) as lock:
        store = LogitStore.open(str(out))
        assert store.verify() == []
        assert not any(is_lock_file(node) for node in store.nbytes_stored())
        res = runner.invoke(app, ["inspect", str(out), "--json"])
        assert res.exit_code == 0, res.output
        # the driver holding the lock may overwrite the store; the lock survives it
        empty_store(out, overwrite=True)
        assert read_lock(out).token == lock.holder.token
        assert LogitStore.open(str(out)).num_rows == 4
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with DriverLock(foreign), pytest.raises(Exception, match="not a zarr store"):
        empty_store(foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_failed_first_run_leaves_no_directory(tmp_path):
    """The lock creates the store directory; when the run then fails it must not stay behind."""
    out = tmp_path / "bad.kdc"
    res = runner.invoke(app, ["teach", "digits", "--split", "test", "--teacher", TEACHER, "--k", "5",
                              "--chunk-rows", "0", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert not out.exists()
