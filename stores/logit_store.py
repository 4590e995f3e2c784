"""``LogitStore``: the Zarr v3 store of teacher outputs (format 1; schema in ``stores/format.py``).

Who writes what (write safety, docs/architecture.md "Writing the store safely"): the driver creates the store
(labels, views, manifest, root attrs) and adds teachers; workers then write whole shards with
``write_block``, each setting its own ``checksum`` and ``done`` cell last. Nothing else is written
concurrently, because zarr has no locking and partial shard writes lose data.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import zarr
from zarr.storage import FsspecStore, LocalStore

from . import format as fmt
from . import manifest as mf
from .codecs import decode_values, encode_values, to_float16
from .errors import CorruptionError, StoreError
from .lock import clear_store, is_lock_file

_WRITE_CONFIG = {"write_empty_chunks": True}  # store every chunk, so -0.0 / NaN payloads survive

# Test hook: ``KDCACHE_CRASH_AT=<step>`` SIGKILLs this process at that step of creating a store or adding a
# teacher, so tests/test_integrity.py can stop creation at every step deterministically. Unset, it costs a lookup.
CRASH_ENV = "KDCACHE_CRASH_AT"
CREATION_STEPS = ("create:start", "create:marker", "create:labels", "create:views", "create:manifest",
                  "create:attrs", "create:done", "teacher:group", "teacher:arrays")


def _crash_point(step: str) -> None:
    assert step in CREATION_STEPS, step
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def open_location(url: str | os.PathLike, *, read_only: bool) -> tuple[fsspec.AbstractFileSystem, str, object]:
    """Turn a local path or fsspec URL (file://, memory://, s3://, ...) into
    (filesystem, root path on it, zarr store). The one place stores are located, so every
    backend fsspec knows works the same way."""
    url = os.fspath(url)
    if "://" not in url or url.startswith("file://"):
        path = os.path.abspath(os.path.expanduser(url.removeprefix("file://")))
        return fsspec.filesystem("file"), path, LocalStore(path, read_only=read_only)
    protocol = url.split("://", 1)[0]
    try:
        fs, root = fsspec.core.url_to_fs(url)
        store = FsspecStore.from_url(url, read_only=read_only)
    except ImportError as err:
        extra = {"s3": "kdcache[s3] (s3fs)", "gs": "kdcache[gcs] (gcsfs)", "gcs": "kdcache[gcs] (gcsfs)"}
        raise StoreError(f"{url}: the fsspec backend for '{protocol}://' is not installed ({err}); "
                         f"pip install {extra.get(protocol, 'the fsspec implementation for ' + protocol)}") from None
    except ValueError as err:
        raise StoreError(f"{url}: unknown or unusable location '{protocol}://' ({err}); use a local path, file://, "
                         "memory://, s3:// or gs://") from None
    return fs, root.rstrip("/"), store


def _check_json(attrs: Mapping, what: str) -> dict:
    """Attrs live in zarr.json: refuse anything that is not plain JSON (no pickles, no numpy)."""
    if not isinstance(attrs, Mapping):
        raise StoreError(f"{what} must be a dict, got {type(attrs).__name__}")
    try:
        json.dumps(attrs, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StoreError(f"{what} must be plain JSON (convert numpy scalars to int/float): {err}") from None
    return dict(attrs)


@dataclass
class _Teacher:
    """What write_block/read_block need about one teacher, read once from its group."""

    name: str
    num_classes: int
    k: int
    encoding: str
    layout: str
    temperatures: tuple[float, ...]
    schema: dict[str, tuple[tuple[int, ...], np.dtype]]
    arrays: dict[str, zarr.Array]  # block arrays, opened with _WRITE_CONFIG
    checksum: zarr.Array
    done: zarr.Array
    stats: zarr.Array
    covers: tuple[str, ...] = fmt.BLOCK_ORDER  # what its block checksums walk (fmt.checksum_covers)


@dataclass(frozen=True)
class BadBlock:
    """A block marked done that cannot be trusted, and why (checksum, unreadable chunk, done byte not 0/1)."""

    teacher: str
    view: int
    shard: int
    why: str

    def __str__(self) -> str:
        return f"view {self.view} shard {self.shard} of teacher {self.teacher}: {self.why}"


@dataclass
class Integrity:
    """What ``LogitStore.integrity`` found. ``root`` (labels, views, manifest) and ``teachers`` (a teacher
    group's structure) cannot be mended block by block; ``blocks`` can: clear their done flags and redo them."""

    root: list[str] = field(default_factory=list)
    teachers: dict[str, list[str]] = field(default_factory=dict)
    blocks: dict[str, list[BadBlock]] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = list(self.root)
        for name in sorted(set(self.teachers) | set(self.blocks)):
            out += self.teachers.get(name, []) + [str(b) for b in self.blocks.get(name, [])]
        return out

    @property
    def repairable(self) -> bool:
        """True when every problem is a bad block (or there is none)."""
        return not self.root and not any(self.teachers.values())


class LogitStore:
    """A kdcache store. Build one with :meth:`create` or :meth:`open`, not the constructor."""

    def __init__(self, url: str, fs, root: str, store, group: zarr.Group, meta: dict, mode: str):
        self.url = url
        self.mode = mode
        self._fs = fs
        self._root = root
        self._store = store
        self._group = group
        self._meta = meta
        self._teachers: dict[str, _Teacher] = {}
        # (teacher, view, shard) blocks a checked read found done and matching their crc32: checked once per
        # instance (read_block(checked=True)); set.add is atomic, so reader threads may share it
        self._verified: set[tuple[str, int, int]] = set()

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(
        cls,
        url: str | os.PathLike,
        *,
        labels: np.ndarray,
        views: Mapping[str, np.ndarray],
        attrs: Mapping,
        manifest: pa.Table | Mapping,
        shard_rows: int = 65536,
        chunk_rows: int = 8192,
        overwrite: bool = False,
        num_views: int | None = None,
    ) -> LogitStore:
        """Write a new store (labels, views, manifest, root attrs) and return it open in "r+".

        Every input is validated before anything is written, and a failure part way removes
        what was written, so a bad input never leaves a partial store. ``num_views`` is needed
        only when ``views`` is empty (a policy without parameters).
        """
        url = os.fspath(url)
        labels = cls._check_labels(labels)
        n = len(labels)
        views, v = cls._check_views(views, n, num_views)
        attrs = _check_json(attrs, "store attrs")
        clash = sorted(set(attrs) & set(fmt.ROOT_KEYS))
        if clash:
            raise StoreError(f"store attrs may not set {', '.join(clash)}: the store computes them")
        table = mf.build_manifest(manifest, labels)
        c, s, num_shards = fmt.chunking(n, chunk_rows, shard_rows)
        manifest_bytes = mf.to_parquet_bytes(table)

        fs, root, store = open_location(url, read_only=False)
        _prepare_output(fs, root, url, overwrite, attrs)
        marker = f"{root}/{fmt.CREATING}"
        try:
            fs.makedirs(root, exist_ok=True)
            _crash_point("create:start")
            # The marker goes first and is removed last: a kill anywhere in between leaves a store that reads as
            # "being created", which the same creator starts again (_prepare_output), never a half-made store.
            fs.pipe_file(marker, json.dumps(attrs, sort_keys=True).encode())
            _crash_point("create:marker")
            # _prepare_output left the location empty; create_group (not mode="w") keeps a driver lock there
            group = zarr.create_group(store, zarr_format=3)
            group.create_group(fmt.TEACHERS)
            arr = group.create_array(
                fmt.LABELS,
                shape=(n,),
                dtype=np.int32,
                chunks=(c,),
                shards=(s,),
                compressors=fmt.compressor(np.int32),
                dimension_names=("row",),
            )
            arr[:] = labels
            _crash_point("create:labels")
            view_group = group.create_group(fmt.VIEWS)
            for name, data in views.items():
                arr = view_group.create_array(
                    name,
                    shape=(v, n),
                    dtype=data.dtype,
                    chunks=(1, c),
                    shards=(1, s),
                    compressors=fmt.compressor(data.dtype),
                    dimension_names=("view", "row"),
                )
                arr[:] = data
                _crash_point("create:views")
            fs.pipe_file(f"{root}/{fmt.MANIFEST}", manifest_bytes)
            _crash_point("create:manifest")
            meta = {
                **attrs,
                "format": fmt.FORMAT,
                "num_rows": n,
                "num_views": v,
                "shard_rows": s,
                "chunk_rows": c,
                "num_shards": num_shards,
                "manifest_sha256": mf.sha256(manifest_bytes),
                # labels and view parameters are written once, here: their crc32 lets verify catch a flipped byte
                "root_checksums": {fmt.LABELS: fmt.array_checksum(labels),
                                   **{f"{fmt.VIEWS}/{name}": fmt.array_checksum(data) for name, data in views.items()}},
            }
            group.update_attributes({fmt.ATTR_KEY: meta})
            _crash_point("create:attrs")
            fs.rm(marker)  # the commit: from here on the store is complete
            _crash_point("create:done")
        except BaseException:
            if fs.exists(root):
                clear_store(fs, root)
            raise
        return cls(url, fs, root, store, group, meta, "r+")

    @classmethod
    def open(cls, url: str | os.PathLike, mode: str = "r") -> LogitStore:
        """Open an existing store; "r" refuses writes, "r+" allows add_teacher/write_block."""
        url = os.fspath(url)
        if mode not in ("r", "r+"):
            raise StoreError(f"mode must be 'r' or 'r+', got {mode!r}")
        fs, root, store = open_location(url, read_only=mode == "r")
        if fs.isfile(root):
            raise StoreError(f"{url} is a file, not a kdcache store; pass the store directory")
        if not fs.exists(root):
            raise StoreError(f"no store at {url}; check the path, or create one with `kdcache teach`")
        if fs.exists(f"{root}/{fmt.CREATING}"):
            raise StoreError(f"{url} is still being created, or its creation was interrupted; rerun the same "
                             "`kdcache teach` command (it creates the store again) or pass --overwrite")
        if not fs.exists(f"{root}/zarr.json"):  # zarr's own error would say "group not found"
            if _looks_like_store(fs, root):
                raise StoreError(f"{url} is not a kdcache store (zarr.json missing): re-teach with --overwrite")
            raise StoreError(f"{url} is not a kdcache store (no zarr.json); check the path (a new store needs an "
                             "empty or new directory)")
        try:
            group = zarr.open_group(store, mode=mode, zarr_format=3)
        except (OSError, ValueError, KeyError) as err:
            raise StoreError(
                f"{url} is not a kdcache store (no Zarr v3 group: {type(err).__name__}); check the path"
            ) from None
        meta = fmt.check_format(group.attrs, url)
        return cls(url, fs, root, store, group, meta, mode)

    @staticmethod
    def exists(url: str | os.PathLike) -> bool:
        """True when something (a store, a half-made store, or a file) is at the location.
        A directory holding only a driver lock (``stores/lock.py``) does not count."""
        fs, root, _ = open_location(os.fspath(url), read_only=True)
        return fs.exists(root) and (fs.isfile(root) or bool(_entries(fs, root)))

    @staticmethod
    def in_creation(url: str | os.PathLike) -> bool:
        """True when a ``create`` at the location has not finished (running, or killed): ``create`` with the
        same attrs starts it again, ``open`` refuses it."""
        fs, root, _ = open_location(os.fspath(url), read_only=True)
        return fs.exists(f"{root}/{fmt.CREATING}")

    @staticmethod
    def _check_labels(labels) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise StoreError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
            raise StoreError("labels must be class ids in [0, 2**31); found a negative or huge label")
        return labels.astype(np.int32)

    @staticmethod
    def _check_views(views: Mapping, n: int, num_views: int | None) -> tuple[dict[str, np.ndarray], int]:
        out = {}
        for name, data in views.items():
            fmt.check_node_name(name, "view parameter")
            data = np.asarray(data)
            if data.ndim != 2 or data.shape[1] != n or data.dtype.kind not in "biuf":
                raise StoreError(
                    f"view parameter {name!r} must be a numeric (views, {n}) array, got {data.dtype} {data.shape}"
                )
            out[name] = data
        counts = {data.shape[0] for data in out.values()} | ({num_views} if num_views is not None else set())
        if len(counts) != 1:
            why = "pass num_views" if not counts else f"got {sorted(counts)}"
            raise StoreError(f"view parameters must agree on the number of views ({why})")
        v = counts.pop()
        if not isinstance(v, int | np.integer) or v < 1:
            raise StoreError(f"the number of views must be >= 1, got {v}")
        return out, int(v)

    # ------------------------------------------------------------------ store-level reads

    @property
    def attrs(self) -> dict:
        """Root attrs["kdcache"]: the store's own keys plus what the creator passed."""
        return dict(self._meta)

    @property
    def num_rows(self) -> int:
        return self._meta["num_rows"]

    @property
    def num_views(self) -> int:
        return self._meta["num_views"]

    @property
    def num_shards(self) -> int:
        return self._meta["num_shards"]

    @property
    def shard_rows(self) -> int:
        return self._meta["shard_rows"]

    @property
    def chunk_rows(self) -> int:
        return self._meta["chunk_rows"]

    @property
    def teachers(self) -> list[str]:
        """Teacher names, read from the store (another process may have added one). A teacher whose
        ``add_teacher`` has not finished is left out: it has no data yet, and adding it again replaces it."""
        return sorted(name for name, group in self._group[fmt.TEACHERS].groups()
                      if not group.attrs.get(fmt.TEACHER_CREATING))

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """Rows [start, stop) of a shard: the unit of writing."""
        if not 0 <= shard < self.num_shards:
            raise StoreError(f"shard {shard} out of range: the store has {self.num_shards} shards")
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.num_rows)

    def labels(self) -> np.ndarray:
        return np.asarray(self._group[fmt.LABELS][:], dtype=np.int32)

    def views(self, view: int | None = None) -> dict[str, np.ndarray]:
        """View parameters: {param: (V, N)}, or {param: (N,)} for one view."""
        if view is not None:
            self._check_view(view)
        group = self._group[fmt.VIEWS]
        return {name: group[name][:] if view is None else group[name][view] for name in sorted(group.array_keys())}

    def manifest_column(self, name: str) -> np.ndarray:
        """One manifest column as a numpy array (e.g. ``dataset_index``: row -> dataset item)."""
        return self.manifest().column(name).to_numpy()

    def manifest(self) -> pa.Table:
        path = f"{self._root}/{fmt.MANIFEST}"
        if not self._fs.exists(path):
            raise StoreError(f"{self.url} has no {fmt.MANIFEST}; the store is incomplete, recreate it")
        return mf.from_parquet_bytes(self._fs.cat_file(path), f"{self.url}/{fmt.MANIFEST}")

    def nbytes_stored(self) -> dict[str, int]:
        """Bytes on storage per node path ("teachers/t/values", "labels", "manifest.parquet", ...),
        metadata included, from the filesystem listing (no data is read)."""
        sizes: dict[str, int] = {}
        for path, info in self._fs.find(self._root, detail=True).items():
            rel = path[len(self._root) :].lstrip("/")
            if is_lock_file(rel):  # the driver's lock, not part of the store
                continue
            node = rel.split("/c/")[0] if "/c/" in rel else rel.removesuffix("/zarr.json")
            sizes[node] = sizes.get(node, 0) + int(info.get("size") or 0)
        return dict(sorted(sizes.items()))

    # ------------------------------------------------------------------ teachers

    def add_teacher(
        self,
        name: str,
        *,
        num_classes: int,
        k: int,
        encoding: str = "float16",
        layout: str = "topk",
        temperatures=(1.0,),
        attrs: Mapping | None = None,
        replace: bool = False,
        stats_names: tuple[str, ...] = (),
    ) -> None:
        """Create teachers/<name> with empty arrays and all-False done flags (driver only).

        ``stats_names`` names a float64 vector of per-block sums (e.g. rows, top-1 hits, KL) that
        ``write_block`` stores with each block, so summaries survive resumed and distributed runs.
        """
        self._require_writable()
        fmt.check_node_name(name, "teacher")
        fmt.check_teacher_spec(num_classes, k, encoding, layout, temperatures)
        attrs = _check_json(attrs or {}, "teacher attrs")
        clash = sorted(set(attrs) & {*fmt.TEACHER_KEYS, fmt.CHECKSUM_COVERS, fmt.TEACHER_CREATING})
        if clash:
            raise StoreError(f"teacher attrs may not set {', '.join(clash)}: pass them as arguments")
        temps = [float(t) for t in temperatures]
        parent = self._group[fmt.TEACHERS]
        if name in parent:
            if not replace and not parent[name].attrs.get(fmt.TEACHER_CREATING):  # an unfinished add is replaced
                raise StoreError(
                    f"teacher {name!r} already exists in {self.url}; pick another name or pass replace=True "
                    "(the CLI: --overwrite)"
                )
            del parent[name]
        self._teachers.pop(name, None)
        spec = {"num_classes": num_classes, "k": k, "encoding": encoding, "layout": layout, "temperatures": temps}
        schema = fmt.teacher_schema(num_classes, k, encoding, layout, len(temps))
        covers = [arr for arr in fmt.CHECKSUM_ORDER if arr in schema or arr == fmt.BLOCK_STATS]
        attrs = {**attrs, fmt.STATS_NAMES: list(stats_names), fmt.CHECKSUM_COVERS: covers, **spec}
        # Marked as being created until its last array exists: a kill in between leaves a teacher that
        # ``teachers`` leaves out and the next add_teacher of that name replaces (none of its blocks can be done).
        group = parent.create_group(name, attributes={**attrs, fmt.TEACHER_CREATING: True})
        _crash_point("teacher:group")
        v, n, c, s = self.num_views, self.num_rows, self.chunk_rows, self.shard_rows
        for arr_name, (trail, dtype) in schema.items():
            group.create_array(
                arr_name,
                shape=(v, n, *trail),
                dtype=dtype,
                chunks=(1, c, *trail),
                shards=(1, s, *trail),
                compressors=fmt.compressor(dtype),
                dimension_names=("view", "row", "slot")[: 2 + len(trail)],
            )
        # One cell per chunk, so concurrent per-shard commits never share a chunk; too small to compress.
        group.create_array(
            fmt.CHECKSUM,
            shape=(v, self.num_shards),
            dtype=np.uint32,
            chunks=(1, 1),
            compressors=None,
            fill_value=0,
            dimension_names=("view", "shard"),
        )
        group.create_array(
            fmt.BLOCK_STATS,
            shape=(v, self.num_shards, max(len(stats_names), 1)),
            dtype=np.float64,
            chunks=(1, 1, max(len(stats_names), 1)),
            compressors=None,
            fill_value=0.0,
            dimension_names=("view", "shard", "stat"),
        )
        group.create_array(
            fmt.DONE,
            shape=(v, self.num_shards),
            dtype=bool,
            chunks=(1, 1),
            compressors=None,
            fill_value=False,
            dimension_names=("view", "shard"),
        )
        _crash_point("teacher:arrays")
        group.attrs.put(attrs)  # one write of zarr.json: the teacher exists from here on

    def teacher_attrs(self, name: str) -> dict:
        """The teacher group's attrs, read fresh (the driver may have added eval results)."""
        self._teacher(name)
        return self._group[f"{fmt.TEACHERS}/{name}"].attrs.asdict()

    def set_teacher_attrs(self, name: str, **kv) -> None:
        """Merge kv into the teacher's attrs. Driver only: attrs updates rewrite zarr.json and race."""
        self._require_writable()
        self._teacher(name)
        kv = _check_json(kv, "teacher attrs")
        clash = sorted(set(kv) & {*fmt.TEACHER_KEYS, *fmt.TEACHER_STORE_KEYS})
        if clash:
            raise StoreError(f"cannot change {', '.join(clash)} of teacher {name!r}: re-add it with replace=True")
        self._group[f"{fmt.TEACHERS}/{name}"].update_attributes(kv)

    def block_stats(self, name: str) -> np.ndarray:
        """(V, num_shards, n) float64 per-block sums, zero for blocks not written (see add_teacher)."""
        t = self._teacher(name)
        return np.asarray(t.stats[:], dtype=np.float64) * self.done(name)[..., None]

    def block_stat_totals(self, name: str) -> dict[str, float]:
        """The teacher's per-block stats summed over its done blocks, by column name (``stats_names``)."""
        names = self.teacher_attrs(name).get(fmt.STATS_NAMES, [])
        if not names:
            return {}
        stats = self.block_stats(name)
        return dict(zip(names, (float(v) for v in stats.reshape(-1, stats.shape[-1]).sum(0)), strict=True))

    def done(self, name: str) -> np.ndarray:
        """(V, num_shards) bool: which blocks are completely written (read fresh). Only a flag byte of 1 counts:
        any other non-zero byte is a damaged flag (``bad_blocks``), redone like an unfinished block."""
        return np.asarray(self._teacher(name).done[:], dtype=bool).view(np.uint8) == 1

    def _teacher(self, name: str) -> _Teacher:
        if name in self._teachers:
            return self._teachers[name]
        parent = self._group[fmt.TEACHERS]
        if name not in parent:
            known = ", ".join(sorted(parent.group_keys())) or "none"
            raise StoreError(f"no teacher {name!r} in {self.url} (teachers: {known}); check --teacher")
        group = parent[name]
        a = group.attrs.asdict()
        if a.get(fmt.TEACHER_CREATING):
            raise StoreError(f"teacher {name!r} of {self.url} is still being added, or adding it was interrupted; "
                             "rerun the same `kdcache teach` command (it adds the teacher again)")
        missing = [key for key in fmt.TEACHER_KEYS if key not in a]
        if missing:
            raise StoreError(f"teacher {name!r} of {self.url} lacks attrs {', '.join(missing)}: the store is damaged; "
                             "run `kdcache verify`, then re-teach that teacher with --overwrite")
        temps = tuple(a["temperatures"])
        schema = fmt.teacher_schema(a["num_classes"], a["k"], a["encoding"], a["layout"], len(temps))
        try:
            arrays = {arr: group[arr].with_config(_WRITE_CONFIG) for arr in schema}
            checksum, done = group[fmt.CHECKSUM].with_config(_WRITE_CONFIG), group[fmt.DONE]
            stats = group[fmt.BLOCK_STATS]
        except KeyError as err:
            raise StoreError(f"teacher {name!r} of {self.url} is missing array {err}: the store is damaged; "
                             "run `kdcache verify`, then re-teach that teacher with --overwrite") from None
        t = _Teacher(name, a["num_classes"], a["k"], a["encoding"], a["layout"], temps, schema, arrays, checksum,
                     done, stats, fmt.checksum_covers(a, schema))
        self._teachers[name] = t
        return t

    # ------------------------------------------------------------------ blocks

    def write_block(
        self, name: str, view: int, shard: int, record: Mapping[str, np.ndarray], stats: np.ndarray | None = None
    ) -> None:
        """Write one (view, shard) block: every array's whole-shard region, its stats (zeros when None), then
        its checksum (over both), then its done flag. Rewriting a block is idempotent and replaces its old
        shards (``_drop_shards``), damaged or not; an interrupted rewrite reads as not done."""
        self._require_writable()
        t = self._teacher(name)
        self._check_view(view)
        start, stop = self.shard_bounds(shard)
        encoded = self._encode(t, record, stop - start, f"view {view} shard {shard} of teacher {name!r}")
        if stats is None:  # a block written without stats has zero stats (the checksum covers them)
            stats = np.zeros(t.stats.shape[-1])
        stats = np.asarray(stats, dtype=np.float64)
        if stats.shape != (t.stats.shape[-1],):
            raise StoreError(f"block stats of teacher {name!r} must have shape {(t.stats.shape[-1],)}, "
                             f"got {stats.shape}")
        t.done[view, shard] = False
        self._drop_shards(t, view, shard)
        for arr_name in fmt.BLOCK_ORDER:
            if arr_name in encoded:
                t.arrays[arr_name][view : view + 1, start:stop] = encoded[arr_name][None]
        t.stats[view, shard] = stats
        t.checksum[view, shard] = fmt.block_checksum({**encoded, fmt.BLOCK_STATS: stats}, t.covers)
        t.done[view, shard] = True

    def _drop_shards(self, t: _Teacher, view: int, shard: int) -> None:
        """Delete the block's stored shards before rewriting them: zarr merges a write that does not fill a
        whole shard (the store's last one) into the old shard, which fails when that shard is the damaged one."""
        for arr in t.arrays.values():
            key = arr.metadata.encode_chunk_key((view, shard) + (0,) * (arr.ndim - 2))
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(f"{self._root}/{arr.path}/{key}")

    def _block_crc(self, t: _Teacher, view: int, shard: int, raw: Mapping[str, np.ndarray]) -> int:
        """The crc32 of block (view, shard) as stored: its rows ``raw`` (on-disk dtypes, as ``_read_raw``
        returns them) and, when the teacher's checksums cover it, its block_stats row (read here)."""
        if fmt.BLOCK_STATS in t.covers:
            raw = {**raw, fmt.BLOCK_STATS: np.asarray(t.stats[view, shard], dtype=np.float64)}
        return fmt.block_checksum(raw, t.covers)

    @staticmethod
    def _encode(t: _Teacher, record: Mapping, rows: int, where: str) -> dict[str, np.ndarray]:
        """Validate a record against the teacher's schema and return the on-disk arrays."""
        expected = {name: (rows, t.k) for name in fmt.record_schema(t.layout).slot_arrays}
        expected |= {"label_logit": (rows,), "tail": (rows, len(t.temperatures))}
        unknown, missing = sorted(set(record) - set(expected)), sorted(set(expected) - set(record))
        if unknown or missing:
            raise StoreError(
                f"record for {where} has keys {sorted(record)}; expected {sorted(expected)} (layout {t.layout!r})"
            )
        arrays = {key: np.asarray(record[key]) for key in expected}
        for key, shape in expected.items():
            if arrays[key].shape != shape:
                raise StoreError(f"record {key!r} for {where} has shape {arrays[key].shape}, expected {shape}")
            kinds = "iu" if key in ("indices", "counts") else "iuf"
            if arrays[key].dtype.kind not in kinds:
                raise StoreError(f"record {key!r} for {where} has dtype {arrays[key].dtype}; expected numbers")
        encoded = encode_values(arrays["values"], t.encoding)
        if "indices" in arrays:
            idx = arrays["indices"]
            if idx.size and (idx.min() < 0 or idx.max() >= t.num_classes):
                raise StoreError(f"record 'indices' for {where} outside [0, {t.num_classes}); check num_classes")
            encoded["indices"] = idx.astype(t.schema["indices"][1])
        if "counts" in arrays:
            cnt = arrays["counts"]
            if cnt.size and (cnt.min() < 0 or cnt.max() > fmt.COUNTS_MAX):
                raise StoreError(f"record 'counts' for {where} outside [0, {fmt.COUNTS_MAX}]; sample at most "
                                 f"{fmt.COUNTS_MAX} classes per row")
            encoded["counts"] = cnt.astype(np.uint8)
        encoded["label_logit"] = to_float16(arrays["label_logit"], "label_logit")
        encoded["tail"] = arrays["tail"].astype(np.float32)
        return encoded

    def _read_raw(self, t: _Teacher, view: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """The stored arrays of rows [start, stop) of a view, in their on-disk dtypes (one slice each)."""
        return {arr_name: arr[view, start:stop] for arr_name, arr in t.arrays.items()}

    def _read_raw_or_raise(self, t: _Teacher, view: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """``_read_raw``, a decode error deep in zarr/blosc reported as one-line corruption."""
        try:
            return self._read_raw(t, view, start, stop)
        except Exception as err:
            why = " ".join(f"{type(err).__name__}: {err}".split())[:200]
            raise CorruptionError(f"teacher {t.name!r} view {view} rows {start}:{stop}: unreadable chunk ({why}); "
                                  f"run `kdcache verify {self.url}`") from err

    def _read_raw_checked(self, t: _Teacher, view: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """Raw rows [start, stop) of a view, every block they touch done and matching its crc32.

        A block not yet checked by this instance is read whole (shard-aligned) once, checked, and the
        requested rows are cut from those bytes, so first touch costs one read of the block and later
        reads only the rows asked for. Consecutive shards of the same status are read with one call.
        """
        if start == stop:
            return self._read_raw_or_raise(t, view, start, stop)
        s = self.shard_rows
        shards = range(start // s, (stop - 1) // s + 1)
        runs: list[list[int]] = []
        for shard in shards:
            checked = (t.name, view, shard) in self._verified
            if runs and checked == ((t.name, view, runs[-1][-1]) in self._verified):
                runs[-1].append(shard)
            else:
                runs.append([shard])
        pieces = []
        for run in runs:
            a, b = max(start, run[0] * s), min(stop, (run[-1] + 1) * s)
            if (t.name, view, run[0]) in self._verified:
                pieces.append(self._read_raw_or_raise(t, view, a, b))
                continue
            lo, hi = self.shard_bounds(run[0])[0], self.shard_bounds(run[-1])[1]
            crcs, stats = self._done_checksums(t, view, run)
            raw = self._read_raw_or_raise(t, view, lo, hi)
            for shard in run:
                x, y = (i - lo for i in self.shard_bounds(shard))
                block = {key: arr[x:y] for key, arr in raw.items()}
                if fmt.BLOCK_STATS in t.covers:  # as _block_crc, with the run's stats read at once
                    block[fmt.BLOCK_STATS] = stats[shard - run[0]]
                if fmt.block_checksum(block, t.covers) != int(crcs[shard - run[0]]):
                    raise CorruptionError(f"view {view} shard {shard} of teacher {t.name!r}: checksum mismatch "
                                          f"(a chunk is missing or damaged); run `kdcache verify {self.url}`")
                self._verified.add((t.name, view, shard))
            pieces.append({key: arr[a - lo : b - lo] for key, arr in raw.items()})
        if len(pieces) == 1:
            return pieces[0]
        return {key: np.concatenate([p[key] for p in pieces]) for key in pieces[0]}

    def _done_checksums(self, t: _Teacher, view: int, shards: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The recorded crc32s and block stats of consecutive ``shards`` (indexed by shard - shards[0]),
        refusing any that is not done (an unfinished block may hold anything). One zarr call per array for
        the run, not three per block (those took ~8 % of a first streamed epoch in a profile)."""
        sel = (view, slice(shards[0], shards[-1] + 1))
        try:
            done, crcs, stats = np.asarray(t.done[sel], dtype=bool), np.asarray(t.checksum[sel]), t.stats[sel]
        except Exception as err:
            why = " ".join(f"{type(err).__name__}: {err}".split())[:200]
            raise CorruptionError(f"view {view} shards {shards[0]}-{shards[-1]} of teacher {t.name!r}: unreadable "
                                  f"done flags, checksums or block stats ({why}); run `kdcache verify {self.url}`"
                                  ) from err
        if not done.all():
            shard = shards[int(np.flatnonzero(~done)[0])]
            raise StoreError(f"view {view} shard {shard} of teacher {t.name!r} is unfinished (its `kdcache teach` "
                             f"run stopped early); rerun the `kdcache teach` command that made {self.url} "
                             "(same --out) to finish it")
        return crcs, np.asarray(stats, dtype=np.float64)

    def read_block(self, name: str, view: int, start: int, stop: int, *,
                   checked: bool = False) -> dict[str, np.ndarray]:
        """Decoded rows [start, stop) of a view: values f32 (R, k), indices int64 (R, k; not for
        dense), counts int64 (R, k; sampled only), label_logit f32 (R,), tail f32 (R, T). Any row
        range; chunk-aligned ranges are fastest.

        ``checked`` (what stage two reads with): every block the rows touch must be done, and is
        checked against its crc32 the first time this instance reads it (see ``_read_raw_checked``),
        so a missing or damaged chunk is a ``CorruptionError``, never zeros or garbage. Class ids
        outside [0, num_classes) are refused either way.
        """
        t = self._teacher(name)
        self._check_view(view)
        if not 0 <= start <= stop <= self.num_rows:
            raise StoreError(f"rows {start}:{stop} out of range for a store of {self.num_rows} rows")
        raw = (self._read_raw_checked if checked else self._read_raw_or_raise)(t, view, start, stop)
        decoded = fmt.DECODED_DTYPES
        out = {"values": decode_values(raw, t.encoding)}
        if "indices" in raw:
            idx = raw["indices"]
            if idx.size and (int(idx.max()) >= t.num_classes or int(idx.min()) < 0):
                raise CorruptionError(f"teacher {name!r} view {view} rows {start}:{stop}: class ids outside "
                                      f"[0, {t.num_classes}) (a damaged chunk); run `kdcache verify {self.url}`")
            out["indices"] = idx.astype(decoded["indices"])
        if "counts" in raw:
            out["counts"] = raw["counts"].astype(decoded["counts"])
        out["label_logit"] = raw["label_logit"].astype(decoded["label_logit"])
        out["tail"] = raw["tail"].astype(decoded["tail"], copy=False)
        return out

    def read_view(self, name: str, view: int, *, checked: bool = False) -> dict[str, np.ndarray]:
        """A whole view, decoded (preload into RAM for training); ``checked`` as in ``read_block``."""
        return self.read_block(name, view, 0, self.num_rows, checked=checked)

    # ------------------------------------------------------------------ integrity

    def verify(self, name: str | None = None) -> list[str]:
        """Check structure, done flags and every done block's checksum; return problems (empty means ok)."""
        return self.integrity(name).problems()

    def integrity(self, names: str | list[str] | None = None) -> Integrity:
        """``verify`` of the root and of ``names`` (default: every teacher), sorted by what can be mended: root
        arrays, teacher structure, bad blocks."""
        found = Integrity(self._verify_root())
        names = self.teachers if names is None else [names] if isinstance(names, str) else list(names)
        for name in set(names) - set(self.teachers):
            self._teacher(name)  # raises: an unknown name is a user error, not a problem of the store
        for teacher in names:
            try:
                found.teachers[teacher] = self._verify_teacher(teacher)
                if not found.teachers[teacher]:
                    found.blocks[teacher] = self.bad_blocks(teacher)
            except StoreError as err:  # e.g. a teacher group that lost its attrs or an array
                found.teachers[teacher] = [str(err)]
        return found

    def _verify_root(self) -> list[str]:
        n, v = self.num_rows, self.num_views
        crcs = self._meta["root_checksums"]
        problems = _check_array(self._group.get(fmt.LABELS), "labels", (n,), np.dtype(np.int32))
        if not problems:
            problems += self._verify_written_once(fmt.LABELS, self._group[fmt.LABELS], crcs)
            if not problems and self.labels().min() < 0:
                problems.append("labels: negative class id")
        if fmt.VIEWS in self._group:
            arrays = dict(self._group[fmt.VIEWS].arrays())
            for path in sorted(set(crcs) - {fmt.LABELS} - {f"{fmt.VIEWS}/{p}" for p in arrays}):
                problems.append(f"{path}: missing")
            for param, arr in sorted(arrays.items()):
                if arr.shape != (v, n):
                    problems.append(f"views/{param}: shape {arr.shape}, expected {(v, n)}")
                else:
                    problems += self._verify_written_once(f"{fmt.VIEWS}/{param}", arr, crcs)
        else:
            problems.append("views: missing")
        try:
            data = self._fs.cat_file(f"{self._root}/{fmt.MANIFEST}")
        except FileNotFoundError:
            return [*problems, f"{fmt.MANIFEST}: missing"]
        if mf.sha256(data) != self._meta["manifest_sha256"]:
            problems.append(f"{fmt.MANIFEST}: sha256 differs from the one recorded at creation")
        return problems

    @staticmethod
    def _verify_written_once(path: str, arr: zarr.Array, crcs: Mapping[str, int]) -> list[str]:
        """An array the driver wrote once at creation (labels, views/*) against its recorded crc32."""
        try:
            data = arr[...]
        except Exception as err:
            return [f"{path}: unreadable chunk ({type(err).__name__}: {err})"]
        if path not in crcs:
            return [f"{path}: not recorded at creation (an array added later?)"]
        if fmt.array_checksum(data) != crcs[path]:
            return [f"{path}: checksum mismatch (crc32 differs from the one recorded at creation)"]
        return []

    def _verify_teacher(self, name: str) -> list[str]:
        self._teachers.pop(name, None)  # check what is on storage now, not what was cached
        t = self._teacher(name)
        group = self._group[f"{fmt.TEACHERS}/{name}"]
        v, n, shards = self.num_views, self.num_rows, self.num_shards
        expected = {arr: ((v, n, *trail), dtype) for arr, (trail, dtype) in t.schema.items()}
        expected[fmt.CHECKSUM] = ((v, shards), np.dtype(np.uint32))
        expected[fmt.DONE] = ((v, shards), np.dtype(bool))
        problems = []
        for arr_name, (shape, dtype) in expected.items():
            problems += _check_array(group.get(arr_name), f"teacher {name}/{arr_name}", shape, dtype)
        if problems:
            return problems
        try:
            labels = self.labels()
            if labels.max() >= t.num_classes:
                problems.append(f"teacher {name}: labels reach {labels.max()} but num_classes is {t.num_classes}")
        except Exception:
            pass  # unreadable labels: _verify_root reports them
        return problems

    def bad_blocks(self, name: str) -> list[BadBlock]:
        """The teacher's blocks that cannot be trusted: a done byte other than 0 or 1, or a done block that is
        unreadable or fails its checksum (data and block_stats). Reads every done block: as costly as a read
        of the teacher's data. ``reset_blocks`` clears their flags, so the next run redoes them."""
        self._teachers.pop(name, None)  # check what is on storage now, not what was cached
        t = self._teacher(name)
        flags = self._raw_done(t)
        bad = [BadBlock(name, int(v), int(s), _flag_text(int(flags[v, s])))
               for v, s in np.argwhere((flags != 0) & (flags != 1))]
        for view, shard in np.argwhere(flags == 1):
            view, shard = int(view), int(shard)
            start, stop = self.shard_bounds(shard)
            try:
                stored = int(t.checksum[view, shard])
                crc = self._block_crc(t, view, shard, self._read_raw(t, view, start, stop))
            except Exception as err:
                why = " ".join(f"{type(err).__name__}: {err}".split())[:200]
                bad.append(BadBlock(name, view, shard, f"unreadable chunk ({why})"))
                continue
            if crc != stored:
                bad.append(BadBlock(name, view, shard, f"checksum mismatch (stored {stored:08x}, computed {crc:08x})"))
        return sorted(bad, key=lambda b: (b.view, b.shard))

    def _raw_done(self, t: _Teacher) -> np.ndarray:
        """(V, num_shards) int16: each done chunk's byte as stored (0 when absent, the fill value; -1 when the
        chunk is not one byte), read from storage, so a flag byte of 0xFE is not taken for true."""
        out = np.zeros((self.num_views, self.num_shards), dtype=np.int16)
        for view in range(self.num_views):
            for shard in range(self.num_shards):
                path = f"{self._root}/{t.done.path}/{t.done.metadata.encode_chunk_key((view, shard))}"
                try:
                    data = self._fs.cat_file(path)
                except FileNotFoundError:
                    continue
                out[view, shard] = data[0] if len(data) == 1 else -1
        return out

    def reset_blocks(self, name: str, blocks) -> None:
        """Clear the done flags of ``blocks`` ((view, shard) pairs, or BadBlocks) so the next run redoes them.
        Driver only (``kdcache repair``, or ``kdcache teach`` resuming a store with bad blocks)."""
        self._require_writable()
        t = self._teacher(name)
        for block in blocks:
            view, shard = (block.view, block.shard) if isinstance(block, BadBlock) else block
            t.done[int(view), int(shard)] = False

    # ------------------------------------------------------------------ helpers

    def _require_writable(self) -> None:
        if self.mode != "r+":
            raise StoreError(f"{self.url} is open read-only; open it with mode='r+' to write")

    def _check_view(self, view: int) -> None:
        if not 0 <= view < self.num_views:
            raise StoreError(f"view {view} out of range: the store has {self.num_views} views")

    def __repr__(self) -> str:
        return (
            f"LogitStore({self.url!r}, mode={self.mode!r}, rows={self.num_rows}, views={self.num_views}, "
            f"shards={self.num_shards}, teachers={self.teachers})"
        )


def _check_array(arr, what: str, shape: tuple[int, ...], dtype: np.dtype) -> list[str]:
    if not isinstance(arr, zarr.Array):
        return [f"{what}: missing" if arr is None else f"{what}: not an array"]
    problems = []
    if arr.shape != shape:
        problems.append(f"{what}: shape {arr.shape}, expected {shape}")
    if arr.dtype != dtype:
        problems.append(f"{what}: dtype {arr.dtype}, expected {dtype}")
    return problems


def _flag_text(byte: int) -> str:
    """Why a done flag is damaged (``_raw_done`` gives -1 for a chunk that is not one byte)."""
    return "done flag chunk is not one byte" if byte < 0 else f"done flag byte {byte:#04x} is neither 0 nor 1"


def _prepare_output(fs, root: str, url: str, overwrite: bool, attrs: Mapping) -> None:
    """Refuse to clobber files or foreign directories; clear an old store only when asked to, or a store whose
    creation with the same ``attrs`` was interrupted (its marker, fmt.CREATING, is still there)."""
    if fs.isfile(root):
        raise StoreError(f"{url} is an existing file; choose a directory path for the store")
    if not fs.exists(root) or not _entries(fs, root):
        return
    if fs.exists(f"{root}/{fmt.CREATING}"):
        creator = _creator(fs, root)
        if overwrite or creator is None or creator == json.loads(json.dumps(attrs)):
            clear_store(fs, root)  # nothing of it can be in use: it was never complete
            return
        raise StoreError(f"{url} is a store whose creation by another command was interrupted; pass --overwrite "
                         "to replace it or choose another path")
    if not overwrite:
        raise StoreError(f"{url} already exists; choose another path or pass --overwrite to replace it")
    if not _looks_like_store(fs, root):
        raise StoreError(f"{url} is a non-empty directory that is not a zarr store; refusing to overwrite it")
    clear_store(fs, root)


def _creator(fs, root: str) -> dict | None:
    """The attrs in a creation marker; None when it is unreadable (killed while writing it, the first step)."""
    try:
        return json.loads(fs.cat_file(f"{root}/{fmt.CREATING}"))
    except (OSError, ValueError):
        return None


def _looks_like_store(fs, root: str) -> bool:
    """A store, or what a damaged one leaves (its zarr.json gone): --overwrite may replace it, never a
    directory of other files."""
    marks = ("zarr.json", fmt.MANIFEST, f"{fmt.LABELS}/zarr.json", f"{fmt.TEACHERS}/zarr.json")
    return any(fs.exists(f"{root}/{mark}") for mark in marks)


def _entries(fs, root: str) -> list[str]:
    """What is in a store directory, the driver's lock files left out."""
    return [p for p in fs.ls(root, detail=False) if not is_lock_file(p)]

