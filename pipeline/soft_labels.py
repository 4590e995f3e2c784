"""Stage two's soft-label source: the epoch's (view, row) order and the cached records in that order.

Two modes, one interface (``order(epoch)`` then ``batches(order, batch_size)``):

* **preload** — every view of the teacher's arrays is read once into RAM, as one (views x rows)
  array per field; a batch is one ``np.take`` of flat (view, row) indices (millions of rows/s). The
  epoch order is a full random permutation.
* **stream** — for stores larger than RAM. Each epoch the chunk ids, rotated by a random offset,
  form a ring; rank r takes the r-th of ``world`` arcs, cut into buffers of ``buffer_chunks``
  consecutive chunks, served in random order with rows permuted inside each buffer. Stage one stores
  rows in a seeded permutation of the dataset (pipeline/teach.py), so consecutive chunks are a random
  sample and the batches are class-mixed. Consecutive chunks are read with one zarr call per field
  (zarr's per-call cost, about 1 ms, dominates a chunk's read: one call per buffer is the fastest
  order found, benchmarks/RESULTS.md "Loader"). A reader thread hands each buffer over in
  chunk-sized pieces as soon as it is read and reads the next one meanwhile; it holds about one
  buffer and a few pieces, so memory does not grow with the store. The image loader is driven in
  the same order.

The view of each row in an epoch is ``cycle`` (epoch e reads view (e-1) mod V, so an epoch touches
one view's chunks) or ``random`` (per row when preloaded, per chunk when streamed).

Every read is checked (``LogitStore.read_block(checked=True)``): the blocks it touches must be done,
and each block is checked against its crc32 the first time the store instance reads it (read whole
once, so the check costs one extra read of a block at most, in its first epoch). ``shards`` limits the
rows served to some shards (``CachedLoader(allow_partial=True)``: those done in every view).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kdcache.stores.errors import SpecError
from kdcache.stores.logit_store import LogitStore

Record = dict[str, np.ndarray]  # field -> (rows, ...) decoded arrays, as LogitStore.read_block returns
# Pieces (a chunk's rows each) the reader may queue: it reads the next buffer while the consumer eats
# the last few pieces of this one, and holds about one buffer plus these, whatever the store's size.
PIECES_AHEAD = 4


@dataclass
class EpochOrder:
    """The rows and views of one epoch, in training order."""

    rows: np.ndarray
    views: np.ndarray
    buffers: list[Buffer] | None = None  # stream mode: what to read, in order

    def __len__(self) -> int:
        return len(self.rows)

    def shifted(self, offset: int) -> EpochOrder:
        """The same rows with every view moved by ``offset`` (view group g's views start at g * V)."""
        if not offset:
            return self
        buffers = None if self.buffers is None else [
            Buffer(b.chunks, b.views + offset, b.start, b.stop) for b in self.buffers]
        return EpochOrder(self.rows, self.views + offset, buffers)


@dataclass
class Buffer:
    """Stream mode: whole chunks read together; positions [start, stop) of the order permute their rows.

    ``chunks`` are sorted (so consecutive ones are read with one zarr call) and ``views[i]`` is the
    view read for ``chunks[i]``.
    """

    chunks: np.ndarray
    views: np.ndarray
    start: int
    stop: int


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """Every epoch's order depends only on (seed, epoch): resumes replay it exactly."""
    return np.random.default_rng([seed, epoch])


class SoftLabels:
    """Records of one teacher in a store, served in epoch order."""

    def __init__(self, store: LogitStore, teacher: str, preload: str = "auto", view_schedule: str = "cycle",
                 seed: int = 0, buffer_chunks: int = 16, ram_budget_bytes: int = 8 << 30, rank: int = 0,
                 world: int = 1, shards: np.ndarray | list[int] | None = None, checked: bool = True,
                 view_slots: int | None = None):
        if view_schedule not in ("cycle", "random"):
            raise SpecError(f"--view-schedule must be cycle or random; got '{view_schedule}'")
        if preload not in ("auto", "yes", "no"):
            raise SpecError(f"--preload must be auto, yes or no; got '{preload}'")
        if isinstance(buffer_chunks, bool) or not isinstance(buffer_chunks, int) or buffer_chunks < 1:
            raise SpecError(f"buffer_chunks must be an integer >= 1; got {buffer_chunks!r}")
        if not 0 <= rank < world:
            raise SpecError(f"rank must be in 0..{world - 1} for world {world}; got {rank}")
        self.store = store
        self.teacher = teacher
        self.seed = seed
        self.view_schedule = view_schedule
        self.buffer_chunks = buffer_chunks
        self.rank, self.world = rank, world
        self.num_rows, self.num_views = store.num_rows, store.num_views
        # the views an epoch order draws from: all of them, or (view groups) the slots 0..V-1 of one group,
        # shifted to each group's views by ``EpochOrder.shifted``
        self.view_slots = self.num_views if view_slots is None else int(view_slots)
        self.chunk = store.chunk_rows
        self.num_chunks = -(-self.num_rows // self.chunk)
        self.checked = checked  # False only to measure what the checks cost (benchmarks/loader.py)
        self.shards, self.chunks, self.row_mask = self._served_shards(shards)
        if preload == "auto":
            preload = "yes" if self.nbytes_decoded() <= ram_budget_bytes else "no"
        self.preloaded = self._preload() if preload == "yes" else None

    def nbytes_decoded(self) -> int:
        """RAM the decoded arrays of every view would take."""
        attrs = self.store.teacher_attrs(self.teacher)
        slot = {"dense": 4, "topk": 12, "sampled": 20}[attrs["layout"]]  # value f32 (+ index i64, + count i64)
        per_row = attrs["k"] * slot + 4 + 4 * len(attrs["temperatures"])
        return per_row * self.num_rows * self.num_views

    def _served_shards(self, shards) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The shards served, their chunk ids, and a row mask (None when every row is served)."""
        every = np.arange(self.store.num_shards)
        if shards is None:
            return every, np.arange(self.num_chunks), None
        shards = np.unique(np.asarray(shards, dtype=np.int64))
        if not len(shards) or shards[0] < 0 or shards[-1] >= len(every):
            raise SpecError(f"shards must be a non-empty subset of 0..{len(every) - 1}; got {shards.tolist()}")
        per_shard = self.store.shard_rows // self.chunk
        chunks = (shards[:, None] * per_shard + np.arange(per_shard)).reshape(-1)
        mask = np.zeros(self.num_rows, dtype=bool)
        for shard in shards:
            mask[slice(*self.store.shard_bounds(int(shard)))] = True
        return shards, chunks[chunks < self.num_chunks], None if mask.all() else mask

    def _shard_runs(self) -> list[tuple[int, int]]:
        """Rows [a, b) of each run of consecutive served shards (one checked read each)."""
        breaks = np.flatnonzero(np.diff(self.shards) != 1) + 1
        return [(self.store.shard_bounds(int(run[0]))[0], self.store.shard_bounds(int(run[-1]))[1])
                for run in np.split(self.shards, breaks)]

    def _preload(self) -> Record:
        """Every view in RAM as (views * rows, ...) arrays: record (v, r) is at flat index v * rows + r.
        Rows of shards not served stay zero and are never in an order."""
        flat: Record = {}
        n = self.num_rows
        for v in range(self.num_views):
            for a, b in self._shard_runs():
                part = self.store.read_block(self.teacher, v, a, b, checked=self.checked)
                for key, arr in part.items():
                    if key not in flat:
                        flat[key] = np.zeros((self.num_views * n, *arr.shape[1:]), dtype=arr.dtype)
                    flat[key][v * n + a : v * n + b] = arr
        return flat

    # ------------------------------------------------------------------ the epoch order

    def _rank_chunks(self, epoch: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
        """Stream mode: this rank's chunks and their views, and the rng that then orders its buffers.

        The chunk ids, rotated by a random offset, form a ring; rank r takes the r-th of ``world``
        equal arcs. An arc is consecutive chunks (wrapping once at most), so buffers of it are read
        with one zarr call each, and the offset moves every buffer's boundaries from epoch to epoch.
        """
        rng = epoch_rng(self.seed, epoch)
        ring = self._ring(rng)
        views = self._views(rng, len(ring), epoch)
        a, b = self._arc(self.rank)
        return rng, ring[a:b], views[a:b]

    def _ring(self, rng: np.random.Generator) -> np.ndarray:
        """The served chunk ids rotated by the epoch's random offset (its first draw)."""
        m = len(self.chunks)
        return self.chunks[(np.arange(m) + rng.integers(m)) % m]

    def _arc(self, rank: int) -> tuple[int, int]:
        """Positions [a, b) of the ring that ``rank`` takes: arcs differ by one chunk at most."""
        m = len(self.chunks)
        return rank * m // self.world, (rank + 1) * m // self.world

    def _chunk_sizes(self, chunks: np.ndarray) -> np.ndarray:
        """Rows of each chunk (only the store's last chunk may be short)."""
        return np.minimum(self.chunk, self.num_rows - chunks * self.chunk)

    def order(self, epoch: int) -> EpochOrder:
        """This rank's (rows, views) for the epoch; ranks take disjoint shares that cover the epoch."""
        if self.preloaded is not None:
            # views are drawn for the whole order, then sharded: rank r's rows and views are positions
            # r, r + world, ... of the single-process order (so DDP replays the same (view, row) pairs)
            rng = epoch_rng(self.seed, epoch)
            rows = rng.permutation(self.num_rows)
            if self.row_mask is not None:  # allow_partial: only rows of the served shards
                rows = rows[self.row_mask[rows]]
            views = self._views(rng, len(rows), epoch)
            return EpochOrder(rows[self.rank :: self.world], views[self.rank :: self.world])
        rng, chunks, chunk_views = self._rank_chunks(epoch)
        total = int(self._chunk_sizes(chunks).sum())
        rows, views = np.empty(total, dtype=np.int64), np.empty(total, dtype=np.int64)
        starts = np.arange(0, len(chunks), self.buffer_chunks)
        buffers, at = [], 0
        for b in rng.permutation(starts):  # buffers in random order, rows permuted inside each
            group = chunks[b : b + self.buffer_chunks]
            by_chunk = np.argsort(group)
            group, group_views = group[by_chunk], chunk_views[b : b + self.buffer_chunks][by_chunk]
            sizes = self._chunk_sizes(group)
            # the buffer's rows in chunk order: chunk ids repeated, plus the offset inside each chunk
            offsets = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
            buffer_rows = np.repeat(group * self.chunk, sizes) + offsets
            perm = rng.permutation(len(buffer_rows))
            stop = at + len(perm)
            rows[at:stop] = buffer_rows[perm]
            views[at:stop] = np.repeat(group_views, sizes)[perm]
            buffers.append(Buffer(group, group_views, at, stop))
            at = stop
        return EpochOrder(rows, views, buffers)

    def share_rows(self, epoch: int) -> list[int]:
        """Rows in each rank's share of the epoch (``len(order(epoch))`` of ranks 0..world-1), without
        building the orders: DDP runs the same number of steps on every rank."""
        if self.preloaded is not None:
            n = self.num_rows if self.row_mask is None else int(self.row_mask.sum())
            return [len(range(r, n, self.world)) for r in range(self.world)]
        sizes = self._chunk_sizes(self._ring(epoch_rng(self.seed, epoch)))  # the first draw of _rank_chunks
        return [int(sizes[slice(*self._arc(r))].sum()) for r in range(self.world)]

    def _views(self, rng: np.random.Generator, n: int, epoch: int) -> np.ndarray:
        if self.view_schedule == "cycle":
            return np.full(n, (epoch - 1) % self.view_slots, dtype=np.int64)
        return rng.integers(0, self.view_slots, size=n)

    # ------------------------------------------------------------------ serving

    def batches(self, order: EpochOrder, batch_size: int, drop_last: bool = True,
                skip: int = 0) -> Iterator[Record]:
        """Records for consecutive ``batch_size`` slices of the order (the image loader's slices).

        ``drop_last`` serves full batches only (one short batch when the order is smaller than a
        batch); ``skip`` leaves out the first ``skip`` batches (a mid-epoch resume), and the stream
        does not read buffers that lie wholly inside them.
        """
        if batch_size < 1 or skip < 0:
            raise SpecError(f"batch_size must be >= 1 and skip >= 0; got {batch_size} and {skip}")
        n = len(order) - (len(order) % batch_size if drop_last and len(order) >= batch_size else 0)
        first = skip * batch_size
        if first >= n:
            return
        if self.preloaded is not None:
            yield from self._preloaded_batches(order, first, n, batch_size)
            return
        yield from _cut(self._stream_pieces(order, first, n), n - first, batch_size)

    def _preloaded_batches(self, order: EpochOrder, first: int, n: int, batch_size: int) -> Iterator[Record]:
        # one 1-D np.take of flat (view, row) indices: 1.7-2.3x faster than arr[views, rows], and faster
        # than gathering per view (benchmarks/RESULTS.md, "Loader")
        for a in range(first, n, batch_size):
            flat = order.views[a : a + batch_size] * self.num_rows + order.rows[a : a + batch_size]
            yield {key: np.take(arr, flat, axis=0) for key, arr in self.preloaded.items()}

    def _read_buffer(self, buf: Buffer) -> Record:
        """A buffer's records in chunk order: one read_block per run of consecutive chunks of one view."""
        breaks = np.flatnonzero((np.diff(buf.chunks) != 1) | (np.diff(buf.views) != 0)) + 1
        blocks = []
        for run, run_views in zip(np.split(buf.chunks, breaks), np.split(buf.views, breaks), strict=True):
            start, stop = int(run[0]) * self.chunk, min((int(run[-1]) + 1) * self.chunk, self.num_rows)
            blocks.append(self.store.read_block(self.teacher, int(run_views[0]), start, stop, checked=self.checked))
        if len(blocks) == 1:
            return blocks[0]
        return {key: np.concatenate([blk[key] for blk in blocks]) for key in blocks[0]}

    def _stream_pieces(self, order: EpochOrder, first: int, n: int) -> Iterator[Record]:
        """Records of order positions [first, n) in chunk-sized pieces, read ahead on a thread."""
        out: queue.Queue = queue.Queue(maxsize=PIECES_AHEAD)
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
                    if buf.stop <= first:  # wholly inside the skipped batches: never read
                        continue
                    if buf.start >= n:  # only rows that drop_last leaves out
                        break
                    record = self._read_buffer(buf)
                    local = self._positions_in_buffer(order.rows[max(first, buf.start) : min(n, buf.stop)], buf)
                    for a in range(0, len(local), self.chunk):
                        if not put({key: np.take(arr, local[a : a + self.chunk], axis=0)
                                    for key, arr in record.items()}):
                            return
                    del record
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

    def _positions_in_buffer(self, rows: np.ndarray, buf: Buffer) -> np.ndarray:
        """Where each of ``rows`` lies in the buffer's records as read (chunks in sorted order, each
        full-size but the store's last, which sorts last)."""
        if buf.chunks[-1] - buf.chunks[0] == len(buf.chunks) - 1:  # one run of chunks: a plain offset
            return rows - int(buf.chunks[0]) * self.chunk
        chunk = rows // self.chunk
        return np.searchsorted(buf.chunks, chunk) * self.chunk + (rows - chunk * self.chunk)


def _cut(pieces: Iterator[Record], total: int, batch_size: int) -> Iterator[Record]:
    """Consecutive ``batch_size``-row batches (the last one shorter) of the first ``total`` rows of a
    stream of pieces. A cursor walks each piece: a batch inside one piece is a view of it, only a batch
    that straddles pieces is copied."""
    parts: list[Record] = []  # the pending batch's leading parts, from earlier pieces
    have = served = 0
    for piece in pieces:
        size, at = len(next(iter(piece.values()))), 0
        while at < size and served < total:
            want = min(batch_size, total - served) - have
            take = min(want, size - at)
            part = {key: arr[at : at + take] for key, arr in piece.items()}
            at += take
            if take < want:  # the batch continues in the next piece
                parts.append(part)
                have += take
                continue
            if parts:
                part = {key: np.concatenate([p[key] for p in parts] + [part[key]]) for key in part}
                parts, have = [], 0
            served += len(next(iter(part.values())))
            yield part
        if served >= total:
            return
