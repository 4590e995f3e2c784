"""The Parquet manifest: store row -> dataset index, sample id, label (plus any extra columns).

Strings stay out of zarr; the manifest is small, written once by the driver, and its sha256 goes
into the root attrs so ``verify`` can tell when it changed.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CorruptionError, StoreError

REQUIRED = {
    "row": pa.int64(),
    "dataset_index": pa.int64(),
    "sample_id": pa.string(),
    "label": pa.int32(),
}


def build_manifest(manifest: pa.Table | Mapping, labels: np.ndarray) -> pa.Table:
    """Validate and normalise a manifest (columns dict or Table) for a store with these labels.

    ``row`` may be omitted (then 0..N-1); rows are sorted and must be exactly 0..N-1, and the
    ``label`` column must equal the store's labels, so the two can never disagree.
    """
    try:
        table = manifest if isinstance(manifest, pa.Table) else pa.table(dict(manifest))
    except (pa.ArrowException, TypeError, ValueError) as err:
        msg = f"manifest columns could not be made into a table ({err}); pass equal-length columns"
        raise StoreError(msg) from None
    n = len(labels)
    if table.num_rows != n:
        raise StoreError(f"manifest has {table.num_rows} rows but the store has {n}; pass one row per sample")
    if "row" not in table.column_names:
        table = table.append_column("row", pa.array(np.arange(n, dtype=np.int64)))
    missing = [name for name in REQUIRED if name not in table.column_names]
    if missing:
        raise StoreError(f"manifest lacks column(s) {', '.join(missing)}; required: {', '.join(REQUIRED)}")
    try:
        for name, typ in REQUIRED.items():
            i = table.column_names.index(name)
            table = table.set_column(i, name, table.column(name).cast(typ))
    except pa.ArrowException as err:
        raise StoreError(f"manifest column has the wrong type ({err}); see stores/manifest.py REQUIRED") from None
    table = table.sort_by("row")
    others = [c for c in table.column_names if c not in REQUIRED]
    table = table.select([*REQUIRED, *others])
    if table.column("row").null_count or not np.array_equal(table.column("row").to_numpy(), np.arange(n)):
        raise StoreError("manifest 'row' must hold each store row 0..N-1 exactly once")
    label = table.column("label")
    if label.null_count or not np.array_equal(label.to_numpy(), np.asarray(labels)):
        raise StoreError("manifest 'label' disagrees with the store's labels; build both from the same rows")
    return table


def to_parquet_bytes(table: pa.Table) -> bytes:
    """Serialise with zstd; the caller writes the bytes through the store's filesystem."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def from_parquet_bytes(data: bytes, where: str = "the manifest") -> pa.Table:
    """The manifest table; bytes that are not a whole Parquet file (truncated, overwritten) are corruption,
    named in one line (``where``: the manifest's location), not pyarrow's traceback."""
    try:
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError):
        raise CorruptionError(f"{where} is damaged ({len(data)} bytes, not a whole Parquet file); the store cannot "
                              "map rows to images: re-teach it with --overwrite") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
