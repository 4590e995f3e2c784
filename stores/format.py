"""The store's schema (format 1): names, dtypes, chunking, codecs, attrs and the block checksum.

Everything that defines what is on disk lives here, so a reader can check a store against it and
a future format 2 has one place to change.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec

from .codecs import check_encoding, index_dtype, value_dtype
from .errors import StoreError

FORMAT = 1
ATTR_KEY = "kdcache"  # root attrs["kdcache"] holds the store-level metadata

LABELS = "labels"
VIEWS = "views"
TEACHERS = "teachers"
MANIFEST = "manifest.parquet"
CHECKSUM = "checksum"
DONE = "done"
BLOCK_STATS = "block_stats"
STATS_NAMES = "block_stats_names"
# A file at the store's root while LogitStore.create runs (JSON: the creator's attrs); removed last, after the
# root attrs. A store holding it is not a store yet: the same creator starts it again (stores/logit_store.py).
CREATING = "kdcache.creating"
TEACHER_CREATING = "creating"  # teacher attr: true until add_teacher has made every array of the teacher
CHECKSUM_COVERS = "checksum_covers"  # teacher attr: the arrays each block checksum walks, in order

# Keys of root attrs["kdcache"] owned by the store; callers may add others but not these.
ROOT_KEYS = ("format", "num_rows", "num_views", "shard_rows", "chunk_rows", "num_shards", "manifest_sha256",
             "root_checksums")
# Keys of a teacher group's attrs fixed by add_teacher; set_teacher_attrs may not change them.
TEACHER_KEYS = ("num_classes", "k", "encoding", "layout", "temperatures")
# Optional teacher attrs the store owns (written by add_teacher; callers may neither pass nor change them).
TEACHER_STORE_KEYS = (STATS_NAMES, CHECKSUM_COVERS, TEACHER_CREATING)

# Per-(view, row) arrays of a teacher, in the fixed order the block checksum walks them.
# ("counts" is last so adding it left the checksums of topk/dense blocks unchanged.)
BLOCK_ORDER = ("values", "indices", "label_logit", "tail", "value_offset", "value_scale", "counts")
# What a block checksum covers: the block's arrays, then its block_stats row. Teachers added before the stats
# were covered have no CHECKSUM_COVERS attr: their checksums walk BLOCK_ORDER alone (checksum_covers()).
CHECKSUM_ORDER = (*BLOCK_ORDER, BLOCK_STATS)
COUNTS_MAX = 255  # sampled layout: draws per row, stored as uint8 counts
SLOT_ARRAYS = ("values", "indices", "counts")  # the (V, N, k) arrays a record layout may store
# The dtypes read_block decodes to: what a decoded block costs in RAM (kdcache.records decoded_bytes_per_row).
DECODED_DTYPES = {name: np.dtype(np.int64 if name in ("indices", "counts") else np.float32)
                  for name in ("values", "indices", "counts", "label_logit", "tail")}

BLOSC_ZSTD_LEVEL = 5


@dataclass(frozen=True)
class RecordSchema:
    """Which (V, N, k) arrays a record layout stores, as plain data.

    The store knows a layout (teacher attrs "layout") only through this, so stores/ stays free of torch
    and of the pipeline; ``kdcache.records.Layout`` carries one and registers it. Every record also
    stores ``label_logit`` and ``tail`` (and the uint8 encoding's offset and scale).
    """

    layout: str
    slot_arrays: tuple[str, ...]  # subset of SLOT_ARRAYS, "values" first
    every_class: bool = False  # the slots are all classes in class order: k must equal num_classes


RECORD_SCHEMAS: dict[str, RecordSchema] = {}


def register_record_schema(schema: RecordSchema) -> RecordSchema:
    """Make a layout's arrays known to the store (idempotent; a different schema under a taken name is refused)."""
    if schema.slot_arrays[:1] != ("values",) or not set(schema.slot_arrays) <= set(SLOT_ARRAYS):
        raise StoreError(f"layout {schema.layout!r} stores {schema.slot_arrays}; it must store 'values' first and "
                         f"only arrays of {SLOT_ARRAYS}")
    known = RECORD_SCHEMAS.setdefault(schema.layout, schema)
    if known != schema:
        raise StoreError(f"layout {schema.layout!r} is already registered with another schema; pick another name")
    return schema


def record_schema(layout: str) -> RecordSchema:
    """The schema of a layout name; StoreError naming the known layouts otherwise."""
    if layout not in RECORD_SCHEMAS:
        raise StoreError(f"unknown layout {layout!r}; use one of {', '.join(RECORD_SCHEMAS)}")
    return RECORD_SCHEMAS[layout]


# Format 1's layouts (their arrays are on disk, so they are defined here, next to the rest of the format).
TOPK = register_record_schema(RecordSchema("topk", ("values", "indices")))
DENSE = register_record_schema(RecordSchema("dense", ("values",), every_class=True))
SAMPLED = register_record_schema(RecordSchema("sampled", ("values", "indices", "counts")))


def chunking(num_rows: int, chunk_rows: int, shard_rows: int) -> tuple[int, int, int]:
    """(C, S, num_shards): C = min(chunk_rows, N); S = smallest multiple of C >= min(shard_rows, N)."""
    if num_rows < 1:
        raise StoreError("a store needs at least one row; the dataset is empty")
    if chunk_rows < 1 or shard_rows < 1:
        raise StoreError(f"chunk_rows ({chunk_rows}) and shard_rows ({shard_rows}) must be >= 1")
    c = min(chunk_rows, num_rows)
    s = math.ceil(min(shard_rows, num_rows) / c) * c
    return c, s, math.ceil(num_rows / s)


def compressor(dtype: np.dtype) -> BloscCodec:
    """blosc-zstd; byte-shuffle for multi-byte floats, bit-shuffle for 1-byte types and integers
    (bit-shuffle packs small class ids to their bit width; byte-shuffle wins on float16)."""
    dtype = np.dtype(dtype)
    shuffle = "shuffle" if dtype.kind == "f" and dtype.itemsize > 1 else "bitshuffle"
    return BloscCodec(cname="zstd", clevel=BLOSC_ZSTD_LEVEL, shuffle=shuffle)


def teacher_schema(
    num_classes: int, k: int, encoding: str, layout: str, num_temperatures: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The per-(view, row) arrays of a teacher: name -> (trailing shape after (V, N), dtype)."""
    slot_dtypes = {"values": value_dtype(encoding), "indices": index_dtype(num_classes),
                   "counts": np.dtype(np.uint8)}  # counts: draws per stored class (sampled records)
    schema: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        name: ((k,), slot_dtypes[name]) for name in record_schema(layout).slot_arrays
    }
    schema["label_logit"] = ((), np.dtype(np.float16))
    schema["tail"] = ((num_temperatures,), np.dtype(np.float32))
    if encoding == "uint8":
        schema["value_offset"] = ((), np.dtype(np.float32))
        schema["value_scale"] = ((), np.dtype(np.float32))
    return schema


def check_teacher_spec(num_classes: int, k: int, encoding: str, layout: str, temperatures) -> None:
    """Refuse a teacher spec that could not be stored or read back consistently."""
    check_encoding(encoding)
    every_class = record_schema(layout).every_class
    if not isinstance(num_classes, int) or num_classes < 1:
        raise StoreError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(k, int) or not 1 <= k <= num_classes:
        raise StoreError(f"k must be an int in [1, num_classes={num_classes}], got {k!r}")
    if every_class and k != num_classes:
        raise StoreError(f"layout {layout!r} stores every class: k must equal num_classes ({num_classes})")
    temps = list(temperatures)
    if not temps or not all(isinstance(t, int | float) and math.isfinite(t) and t > 0 for t in temps):
        raise StoreError(f"temperatures must be a non-empty list of positive numbers, got {temps!r}")


def check_node_name(name: str, what: str) -> None:
    """Names become zarr path segments: keep them to one non-hidden segment."""
    if not isinstance(name, str) or not name or "/" in name or name.startswith((".", "__")):
        raise StoreError(f"invalid {what} name {name!r}: use a non-empty name without '/' or leading '.'")


def check_format(attrs: Mapping, url: str) -> dict:
    """Return root attrs["kdcache"], refusing stores that are not kdcache's or are newer than us."""
    meta = attrs.get(ATTR_KEY)
    if not isinstance(meta, Mapping):
        raise StoreError(
            f"{url} is not a kdcache store (no attrs['{ATTR_KEY}']; perhaps a half-written one): "
            "check the path, or recreate it with --overwrite"
        )
    fmt = meta.get("format")
    if not isinstance(fmt, int):
        raise StoreError(f"{url}: attrs['{ATTR_KEY}'] has no integer 'format'; recreate the store")
    if fmt > FORMAT:
        raise StoreError(f"store format {fmt} is newer than this kdcache (format {FORMAT}); upgrade kdcache")
    if fmt < 1:
        raise StoreError(f"{url}: unknown store format {fmt}; recreate the store")
    missing = [key for key in ROOT_KEYS if key not in meta]
    if missing:
        raise StoreError(f"{url}: attrs['{ATTR_KEY}'] lacks {', '.join(missing)}; recreate the store")
    return dict(meta)


def block_checksum(encoded: Mapping[str, np.ndarray], covers: tuple[str, ...] = BLOCK_ORDER) -> int:
    """crc32 over the encoded (on-disk dtype, little-endian, C order) bytes of one block's arrays (and, when
    ``covers`` names it, its ``block_stats`` row), walked in ``covers`` order, so writer and verifier agree
    byte for byte. Names absent from ``encoded`` are skipped."""
    crc = 0
    for name in covers:
        if name in encoded:
            crc = array_checksum(encoded[name], crc)
    return crc


def checksum_covers(teacher_attrs: Mapping, schema: Mapping) -> tuple[str, ...]:
    """The arrays a teacher's block checksums walk: its CHECKSUM_COVERS attr, or for a teacher written before
    that attr existed, its arrays of BLOCK_ORDER (block_stats not covered)."""
    covers = teacher_attrs.get(CHECKSUM_COVERS)
    if covers is None:
        return tuple(name for name in BLOCK_ORDER if name in schema)
    if not isinstance(covers, list) or not set(covers) <= set(CHECKSUM_ORDER):
        raise StoreError(f"teacher attr {CHECKSUM_COVERS!r} is {covers!r}, not a list of {CHECKSUM_ORDER}: the "
                         "store is damaged; re-teach with --overwrite")
    return tuple(covers)


def array_checksum(arr: np.ndarray, crc: int = 0) -> int:
    """crc32 of an array's bytes as stored (its dtype, little-endian, C order), continuing from ``crc``."""
    arr = np.asarray(arr)
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return zlib.crc32(arr.view(np.uint8).reshape(-1), crc) & 0xFFFFFFFF
