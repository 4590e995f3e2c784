"""kdcache's store: a Zarr v3 group of teacher outputs (format: docs/store_format.md). No torch here."""

from .codecs import (
    decode_uint8,
    decode_values,
    encode_uint8,
    encode_values,
    index_dtype,
    to_float16,
)
from .errors import CorruptionError, KdcacheError, SpecError, StoreError
from .format import FORMAT
from .logit_store import LogitStore, open_location

__all__ = [
    "FORMAT",
    "CorruptionError",
    "KdcacheError",
    "LogitStore",
    "SpecError",
    "StoreError",
    "decode_uint8",
    "decode_values",
    "encode_uint8",
    "encode_values",
    "index_dtype",
    "open_location",
    "to_float16",
]
