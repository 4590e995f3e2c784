"""The driver lock: one writing driver per store.

Workers write disjoint whole shards, which is safe (``logit_store`` module docstring), but two
*drivers* on one store would race on metadata (creating the store, adding a teacher, summary
attrs) and double the work. So a driver (``kdcache teach``, single-process or on dask) holds
``<store>/kdcache.lock`` while it runs. The file is plain JSON naming its holder::

    {"host": "node7", "pid": 4242, "pid_start": 81234567, "started": "2026-...Z",
     "command": "kdcache teach ...", "token": "<uuid4 hex>"}

- **Creation is atomic** where the filesystem allows it: on local disks (and NFS v3+)
  ``os.open(O_CREAT | O_EXCL)``; on other fsspec filesystems an exclusive ``"xb"`` open when the
  implementation supports it, else best effort (check, write, read back our token).
- **Stale locks are taken over automatically** when the holder ran on *this* host and its process
  is gone (no such pid, a zombie, or a pid reused by a newer process: its start time differs).
  A takeover runs under a short-lived guard file so two drivers cannot both take over.
- A lock held from **another host** cannot be checked from here: the driver is refused with a
  message naming the holder. If that driver is really gone, rerun with ``--break-lock`` (or
  delete ``<store>/kdcache.lock``).
- Releasing removes the file only if it still holds our token (a lock broken by someone else is
  theirs now), and removes the store directory again when the lock alone created it.

Readers (``inspect``, ``verify``, stage two) never look at the lock. The store itself ignores
files named ``kdcache.lock*`` (see :func:`is_lock_file`): they are not counted in
``nbytes_stored``, do not make a directory count as an existing store, and survive ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from .errors import StoreError

LOCK_NAME = "kdcache.lock"
_GUARD_NAME = LOCK_NAME + ".takeover"
_GUARD_WAIT_S = 5.0

log = logging.getLogger("kdcache")


def is_lock_file(name: str) -> bool:
    """True for the lock file and its takeover guard (a basename, or a path ending in one)."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base == LOCK_NAME or base.startswith(LOCK_NAME + ".")


def clear_store(fs, root: str) -> None:
    """Remove a store's contents; the directory and a driver lock in it stay when a lock is there
    (the driver holding it is the one clearing the store)."""
    entries = fs.ls(root, detail=False)
    if not any(is_lock_file(p) for p in entries):
        fs.rm(root, recursive=True)
        return
    for path in entries:
        if not is_lock_file(path):
            fs.rm(path, recursive=True)


class StoreLockedError(StoreError):
    """Another live driver holds the store's lock."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a lock, as written in the lock file."""

    host: str
    pid: int
    started: str
    command: str
    token: str
    pid_start: int | None = None

    @classmethod
    def me(cls) -> LockHolder:
        pid = os.getpid()
        command = " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300]
        return cls(socket.gethostname(), pid, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), command,
                   uuid.uuid4().hex, _process_start(pid))

    @classmethod
    def parse(cls, data: bytes) -> LockHolder | None:
        try:
            d = json.loads(data)
            return cls(str(d["host"]), int(d["pid"]), str(d.get("started", "?")), str(d.get("command", "?")),
                       str(d["token"]), None if d.get("pid_start") is None else int(d["pid_start"]))
        except (ValueError, TypeError, KeyError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.started} ({self.command})"

    def is_stale(self) -> bool:
        """True only when we can tell the holder is gone: same host, and its process is not running."""
        return self.host == socket.gethostname() and not _process_alive(self.pid, self.pid_start)


def _process_start(pid: int) -> int | None:
    """The process start time in clock ticks since boot (Linux /proc), to tell pid reuse apart."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
        fields = text[text.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])  # state, starttime (fields 3 and 22 of proc(5))
    except (OSError, ValueError, IndexError):
        return None


def _process_alive(pid: int, pid_start: int | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return True  # cannot tell: assume alive (never take over a live lock)
    stat = _proc_stat(pid)
    if stat is not None:
        state, start = stat
        if state in ("Z", "X"):  # exited, not yet reaped
            return False
        if pid_start is not None and start != pid_start:  # the pid now belongs to a newer process
            return False
    return True


class _Files:
    """The few file operations a lock needs, atomic on local disks, best effort elsewhere."""

    def __init__(self, fs, root: str):
        self.fs = fs
        self.root = root
        protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
        self.local = "file" in protocols or "local" in protocols

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def create(self, name: str, data: bytes) -> bool:
        """Create ``name`` holding ``data`` unless it exists; True when we created it."""
        path = self.path(name)
        if self.local:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):
            pass  # no exclusive mode on this filesystem: check, write, read back
        if self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return self.read(name) == data

    def read(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(name))
        except (FileNotFoundError, OSError):
            return None

    def remove(self, name: str) -> None:
        try:
            if self.local:
                os.unlink(self.path(name))
            else:
                self.fs.rm(self.path(name))
        except FileNotFoundError:
            pass

    def empty_root(self) -> bool:
        try:
            return not self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return False


class DriverLock:
    """``with DriverLock(url):`` — hold ``<url>/kdcache.lock`` for the duration of a driver run.

    ``break_lock=True`` removes any existing lock first (the holder is reported in ``broken``).
    ``taken_over`` is the stale holder replaced automatically, if any.
    """

    def __init__(self, url: str | os.PathLike, *, break_lock: bool = False):
        from .logit_store import open_location  # lazy: logit_store imports this module

        self.url = os.fspath(url)
        fs, root, _ = open_location(self.url, read_only=False)
        self.files = _Files(fs, root)
        self.break_lock = break_lock
        self.holder = LockHolder.me()
        self.broken: LockHolder | None = None
        self.taken_over: LockHolder | None = None
        self._created_root = False
        self._held = False

    @property
    def path(self) -> str:
        return self.files.path(LOCK_NAME)

    def acquire(self) -> DriverLock:
        fs, root = self.files.fs, self.files.root
        if fs.isfile(root):
            raise StoreError(f"{self.url} is an existing file; choose a directory path for the store")
        self._created_root = not fs.exists(root)
        try:
            fs.makedirs(root, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create {self.url} ({err.strerror or err}); check the path and permissions") \
                from None
        if self.break_lock:
            data = self.files.read(LOCK_NAME)
            if data is not None:
                self.broken = LockHolder.parse(data)
                self.files.remove(LOCK_NAME)
                log.warning("kdcache: broke the lock of %s on %s",
                            self.broken.describe() if self.broken else "an unreadable holder", self.url)
        mine = self.holder.to_bytes()
        other: LockHolder | None = None
        for attempt in range(10):
            try:
                created = self.files.create(LOCK_NAME, mine)
            except OSError as err:
                self._cleanup_root()
                raise StoreError(f"cannot create the driver lock {self.path} ({type(err).__name__}: {err}); "
                                 "is the store location writable?") from None
            if created:
                self._held = True
                return self
            data = self.files.read(LOCK_NAME)
            if data is None:
                continue  # released between our create and read: try again
            other = LockHolder.parse(data)
            if other is None and attempt < 9:
                time.sleep(0.1)  # created but not yet written by its holder: look again
                continue
            if other is not None and other.is_stale() and self._take_over(other):
                continue
            break
        self._cleanup_root()
        raise StoreLockedError(self._refusal(other))

    def _refusal(self, other: LockHolder | None) -> str:
        who = other.describe() if other else "an unreadable lock file"
        return (f"{self.url} is being written by another kdcache driver ({who[:80]}); wait, or if it is gone: "
                f"--break-lock or delete {self.path}")

    def _take_over(self, stale: LockHolder) -> bool:
        """Remove a stale lock under a guard, so only one driver replaces it. True when removed."""
        guard = LockHolder.me()
        deadline = time.monotonic() + _GUARD_WAIT_S
        while not self.files.create(_GUARD_NAME, guard.to_bytes()):
            data = self.files.read(_GUARD_NAME)
            other = LockHolder.parse(data) if data is not None else None
            if other is not None and other.is_stale():
                self.files.remove(_GUARD_NAME)  # a driver died mid-takeover (a window of microseconds)
                continue
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        try:
            data = self.files.read(LOCK_NAME)
            current = LockHolder.parse(data) if data is not None else None
            if current is None or current.token != stale.token:
                return data is None  # gone already (retry), or someone else's lock now (refuse)
            self.files.remove(LOCK_NAME)
            self.taken_over = stale
            log.warning("kdcache: took over the stale lock of %s on %s (that process is gone)",
                        stale.describe(), self.url)
            return True
        finally:
            self.files.remove(_GUARD_NAME)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        data = self.files.read(LOCK_NAME)
        holder = LockHolder.parse(data) if data is not None else None
        if holder is not None and holder.token == self.holder.token:
            self.files.remove(LOCK_NAME)
        self._cleanup_root()

    @property
    def created_root(self) -> bool:
        """True when this driver made the store's directory: it is a first run."""
        return self._created_root

    def discard_new_store(self) -> None:
        """Remove everything under a root this driver created, but the lock (``release`` then removes the
        lock and the empty root): a first run that failed before any work counted leaves nothing behind."""
        if self._created_root:
            with contextlib.suppress(FileNotFoundError):
                clear_store(self.files.fs, self.files.root)

    def _cleanup_root(self) -> None:
        """A failed first run leaves no empty store directory behind."""
        if self._created_root and self.files.empty_root():
            with contextlib.suppress(OSError):
                self.files.fs.rmdir(self.files.root)

    def __enter__(self) -> DriverLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_lock(url: str | os.PathLike) -> LockHolder | None:
    """The current holder of a store's lock, or None when it is not locked (or unreadable)."""
    from .logit_store import open_location

    fs, root, _ = open_location(os.fspath(url), read_only=True)
    data = _Files(fs, root).read(LOCK_NAME)
    return None if data is None else LockHolder.parse(data)
