"""``open_store``: a store as users see it — what it holds, without the write-path machinery."""

from __future__ import annotations

import os
from typing import Any

from kdcache.describe import describe
from kdcache.stores.errors import StoreError
from kdcache.stores.logit_store import LogitStore


class Store:
    """A read-only view of a kdcache store: rows, views, teachers and what ``kdcache inspect`` shows.

    ``logit_store`` is the underlying ``kdcache.stores.LogitStore`` (block reads, done flags)."""

    def __init__(self, logit_store: LogitStore):
        self.logit_store = logit_store

    @property
    def url(self) -> str:
        return self.logit_store.url

    @property
    def rows(self) -> int:
        """Dataset rows in the store (one per item of the cached split)."""
        return self.logit_store.num_rows

    @property
    def views(self) -> int:
        """Cached augmentation views per row."""
        return self.logit_store.num_views

    @property
    def teachers(self) -> list[str]:
        return self.logit_store.teachers

    @property
    def num_classes(self) -> int:
        return int(self.logit_store.attrs["num_classes"])

    @property
    def attrs(self) -> dict[str, Any]:
        """The store's root attributes (dataset, view policy, input size, identity, versions)."""
        return self.logit_store.attrs

    def teacher(self, name: str) -> dict[str, Any]:
        """One teacher's attributes (spec, layout, k, temperatures, correction, summary)."""
        if name not in self.teachers:
            raise StoreError(f"{self.url} has no teacher '{name}' (it has: {', '.join(self.teachers) or 'none'})")
        return self.logit_store.teacher_attrs(name)

    def describe(self) -> dict[str, Any]:
        """What ``kdcache inspect --json`` prints: sizes, bytes per record, accuracy, record error."""
        return describe(self.logit_store)

    def __repr__(self) -> str:
        return f"Store({self.url!r}, rows={self.rows}, views={self.views}, teachers={self.teachers})"


def open_store(url: str | os.PathLike) -> Store:
    """Open the store at a path or fsspec URL (file://, s3://, gs://, memory://) for reading."""
    if not LogitStore.exists(url):
        raise StoreError(f"no store at {url}; check the path, or make one with `kdcache teach`")
    return Store(LogitStore.open(url))
