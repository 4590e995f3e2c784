"""Stage two's soft-label source: the epoch's (view, row) order and the cached records in that order.

Two modes, one interface (``order(epoch)`` then ``batches(order, batch_size)``):

* **preload** — every view of the teacher's arrays is read once into RAM; a batch is a numpy
  fancy-index (millions of rows/s). The epoch order is a full random permutation.
* **stream** — for stores larger than RAM: chunk order is shuffled, ``buffer_chunks`` chunks are
  read at once (whole chunks, one zarr call each, on a background thread), rows are permuted
  inside the buffer, and the image loader is driven in that same order (engineering.md §3).

The view of each row in an epoch is ``cycle`` (epoch e reads view (e-1) mod V, so an epoch touches
one view's chunks) or ``random`` (per row when preloaded, per chunk when streamed).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kdcache.stores.errors import SpecError
from kdcache.stores.logit_store import LogitStore


@dataclass
class EpochOrder:
    """The rows and views of one epoch, in training order."""

    rows: np.ndarray
    views: np.ndarray
    buffers: list[Buffer] | None = None  # stream mode: what to read, in order

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Buffer:
    """Stream mode: whole chunks read together, then permuted (rows = concat(chunk ranges)[perm])."""

    chunks: np.ndarray
    views: np.ndarray
    perm: np.ndarray


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """Every epoch's order depends only on (seed, epoch): resumes replay it exactly."""
    return np.random.default_rng([seed, epoch])


class SoftLabels:
    """Records of one teacher in a store, served in epoch order."""

    def __init__(self, store: LogitStore, teacher: str, preload: str = "auto", view_schedule: str = "cycle",
                 seed: int = 0, buffer_chunks: int = 16, ram_budget_bytes: int = 8 << 30, rank: int = 0,
                 world: int = 1):
        if view_schedule not in ("cycle", "random"):
            raise SpecError(f"--view-schedule must be cycle or random; got '{view_schedule}'")
        if preload not in ("auto", "yes", "no"):
            raise SpecError(f"--preload must be auto, yes or no; got '{preload}'")
        self.store = store
        self.teacher = teacher
        self.seed = seed
        self.view_schedule = view_schedule
        self.buffer_chunks = buffer_chunks
        self.rank, self.world = rank, world
        self.num_rows, self.num_views = store.num_rows, store.num_views
        self.chunk = store.chunk_rows
        if preload == "auto":
            preload = "yes" if self.nbytes_decoded() <= ram_budget_bytes else "no"
        self.preloaded = self._preload() if preload == "yes" else None

    def nbytes_decoded(self) -> int:
        """RAM the decoded arrays of every view would take."""
        attrs = self.store.teacher_attrs(self.teacher)
        slot = {"dense": 4, "topk": 12, "sampled": 20}[attrs["layout"]]  # value f32 (+ index i64, + count i64)
        per_row = attrs["k"] * slot + 4 + 4 * len(attrs["temperatures"])
        return per_row * self.num_rows * self.num_views

    def _preload(self) -> dict[str, np.ndarray]:
        views = [self.store.read_view(self.teacher, v) for v in range(self.num_views)]
        return {key: np.stack([v[key] for v in views]) for key in views[0]}

    def order(self, epoch: int) -> EpochOrder:
        """This rank's (rows, views) for the epoch; ranks take disjoint shares of the chunk order."""
        rng = epoch_rng(self.seed, epoch)
        if self.preloaded is not None:
            # views are drawn for the whole order, then sharded: rank r's rows and views are positions
            # r, r + world, ... of the single-process order (so DDP replays the same (view, row) pairs)
            rows = rng.permutation(self.num_rows)
            views = self._views(rng, len(rows), epoch)
            return EpochOrder(rows[self.rank :: self.world], views[self.rank :: self.world])
        num_chunks = -(-self.num_rows // self.chunk)
        chunks = rng.permutation(num_chunks)
        chunk_views = self._views(rng, len(chunks), epoch)[self.rank :: self.world]
        chunks = chunks[self.rank :: self.world]
        rows, views, buffers = [], [], []
        for b in range(0, len(chunks), self.buffer_chunks):
            group, group_views = chunks[b : b + self.buffer_chunks], chunk_views[b : b + self.buffer_chunks]
            ranges = [np.arange(c * self.chunk, min((c + 1) * self.chunk, self.num_rows)) for c in group]
            r = np.concatenate(ranges)
            v = np.concatenate([np.full(len(rg), cv) for rg, cv in zip(ranges, group_views, strict=True)])
            perm = rng.permutation(len(r))
            rows.append(r[perm])
            views.append(v[perm])
            buffers.append(Buffer(group, group_views, perm))
        return EpochOrder(np.concatenate(rows), np.concatenate(views), buffers)

    def _views(self, rng: np.random.Generator, n: int, epoch: int) -> np.ndarray:
        if self.view_schedule == "cycle":
            return np.full(n, (epoch - 1) % self.num_views, dtype=np.int64)
        return rng.integers(0, self.num_views, size=n)

    def batches(self, order: EpochOrder, batch_size: int, drop_last: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """Records for consecutive ``batch_size`` slices of the order (same slices as the image loader)."""
        n = len(order) - (len(order) % batch_size if drop_last and len(order) >= batch_size else 0)
        if self.preloaded is not None:
            for a in range(0, n, batch_size):
                rows, views = order.rows[a : a + batch_size], order.views[a : a + batch_size]
                yield {key: arr[views, rows] for key, arr in self.preloaded.items()}
            return
        yield from _slices(self._stream_buffers(order), n, batch_size)

    def _stream_buffers(self, order: EpochOrder) -> Iterator[dict[str, np.ndarray]]:
        """Each buffer's records in epoch order, read ahead on a thread."""
        out: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()  # set when the consumer stops early (max steps, an error): the reader exits

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for buf in order.buffers:
                    if stop.is_set():
                        return
                    blocks = [
                        self.store.read_block(self.teacher, int(v), int(c * self.chunk),
                                              int(min((c + 1) * self.chunk, self.num_rows)))
                        for c, v in zip(buf.chunks, buf.views, strict=True)
                    ]
                    if not put({key: np.concatenate([blk[key] for blk in blocks])[buf.perm] for key in blocks[0]}):
                        return
                put(None)
            except BaseException as err:  # surfaced in the training loop
                put(err)

        reader = threading.Thread(target=read, name="kdcache-soft-labels", daemon=True)
        reader.start()
        try:
            while (item := out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()


def _slices(buffers: Iterator[dict[str, np.ndarray]], n: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Cut a stream of variable-size buffers into consecutive batches of ``batch_size`` rows."""
    pending: list[dict[str, np.ndarray]] = []
    have, emitted = 0, 0
    for buf in buffers:
        pending.append(buf)
        have += len(next(iter(buf.values())))
        while have >= batch_size and emitted < n:
            joined = {key: np.concatenate([p[key] for p in pending]) for key in pending[0]}
            yield {key: arr[:batch_size] for key, arr in joined.items()}
            emitted += batch_size
            rest = {key: arr[batch_size:] for key, arr in joined.items()}
            have -= batch_size
            pending = [rest] if have else []
    if have and emitted < n:
        joined = {key: np.concatenate([p[key] for p in pending]) for key in pending[0]}
        yield {key: arr[: n - emitted] for key, arr in joined.items()}
