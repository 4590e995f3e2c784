"""The one image path of both stages: render stored views of dataset rows, in batches, in workers.

Stage one (``kdcache.teach``), ``verify``, stage two (``kdcache.train``) and the public
``kdcache.CachedLoader`` all read images through ``ViewedRows`` and ``replay_loader``, so a cached
logit always belongs to the exact input a student is shown (docs/architecture.md, "one data path").

A batch is addressed by an (n, 2) int64 array of (view, row) pairs (``pairs``): the batch sampler
hands that array to the worker, which renders the whole batch with one vectorised view replay.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from kdcache.data import ImageDataset
from kdcache.stores.errors import KdcacheError, SpecError


def pairs(views, rows) -> np.ndarray:
    """(n, 2) int64 (view, row) pairs from two equal-length sequences (or scalars broadcast)."""
    views, rows = np.broadcast_arrays(np.asarray(views, dtype=np.int64), np.asarray(rows, dtype=np.int64))
    return np.stack([views.ravel(), rows.ravel()], axis=1)


class ViewedRows(torch.utils.data.Dataset):
    """(view, row) -> normalised image of store row ``row`` under view ``view``'s stored parameters.

    ``view_params[name][view, row]`` are the policy's parameters (``kdcache.views``), and
    ``dataset_index[row]`` the dataset item behind store row ``row``. ``transform`` (optional) runs
    after replay and normalisation on the whole batch (B, C, H, W) and must keep the batch size.
    """

    def __init__(self, dataset: ImageDataset, policy, view_params, dataset_index: np.ndarray,
                 size: tuple[int, int], transform=None):
        self.dataset = dataset
        self.policy = policy
        self.view_params = view_params
        self.dataset_index = dataset_index
        self.size = size
        self.transform = transform
        self.mean = torch.tensor(dataset.mean).view(-1, 1, 1)
        self.std = torch.tensor(dataset.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int, int]:
        """One (view, row): its image (C, H, W), label, view and row."""
        x, y, v, r = self.__getitems__(pairs([item[0]], [item[1]]))
        return x[0], int(y[0]), int(v[0]), int(r[0])

    def __getitems__(self, items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole batch at once (the DataLoader calls this): images, labels, views, rows."""
        items = np.asarray(items, dtype=np.int64).reshape(-1, 2)
        views, rows = items[:, 0], items[:, 1]
        samples = [self.dataset[int(i)] for i in self.dataset_index[rows]]
        labels = torch.as_tensor([label for _, label in samples], dtype=torch.int64)
        params = {name: arr[views, rows] for name, arr in self.view_params.items()}
        if self.dataset.image_size is None:  # images of many sizes: replay one by one, then stack
            x = torch.stack([self.policy.apply(image, {k: v[i].item() for k, v in params.items()}, self.size)
                             for i, (image, _) in enumerate(samples)])
        else:
            x = self.policy.apply_batch(torch.stack([image for image, _ in samples]), params, self.size)
        x = (x - self.mean).div_(self.std)  # one new tensor: the policy's output may alias its input
        if self.transform is not None:
            x = self.transform(x)
        return x, labels, torch.from_numpy(views), torch.from_numpy(rows)


def already_batched(batch):
    """collate_fn for ``ViewedRows.__getitems__``, which returns a finished batch."""
    return batch


class BlockBatches(torch.utils.data.Sampler):
    """Stage one: batches of (view, row) pairs that never straddle a block, in block order."""

    def __init__(self, blocks: Sequence[tuple[int, int, int]], batch_size: int):
        self.blocks = list(blocks)  # (view, start, stop)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[np.ndarray]:
        for view, start, stop in self.blocks:
            for a in range(start, stop, self.batch_size):
                yield pairs(view, np.arange(a, min(a + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(-(-(b - a) // self.batch_size) for _, a, b in self.blocks)


class OrderBatches(torch.utils.data.Sampler):
    """Stage two: consecutive ``batch_size`` slices of an epoch order (arrays of views and rows).

    The order is swapped in by ``set_order`` each epoch while persistent workers stay up; only full
    batches are served (one short batch when the epoch is smaller than a batch), at most ``steps``.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.views = self.rows = np.zeros(0, dtype=np.int64)
        self.steps: int | None = None
        self.skip = 0

    def set_order(self, views: np.ndarray, rows: np.ndarray, steps: int | None = None, skip: int = 0) -> None:
        self.views, self.rows, self.steps, self.skip = views, rows, steps, skip

    def __len__(self) -> int:
        full = len(self.rows) // self.batch_size
        n = full if full else int(len(self.rows) > 0)
        return max(0, (n if self.steps is None else min(n, self.steps)) - self.skip)

    def __iter__(self) -> Iterator[np.ndarray]:
        b = self.batch_size
        size = b if len(self.rows) >= b else len(self.rows)
        for i in range(self.skip, self.skip + len(self)):
            yield pairs(self.views[i * b : i * b + size], self.rows[i * b : i * b + size])


def worker_context(workers: int):
    """fork where the platform has it (workers start in well under a second; they touch no zarr or
    CUDA state, only the dataset and view parameters), spawn elsewhere."""
    if workers == 0:
        return None
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return multiprocessing.get_context(method)


class ReplayLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers' user errors stay one line: PyTorch re-raises a worker's exception with the
    worker's whole traceback in its message; a ``KdcacheError`` (an unreadable image, a bad item of the user's
    dataset) comes back here as the same error with its own message."""

    def __iter__(self):
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except KdcacheError as err:
                raise type(err)(worker_message(str(err))) from None
            yield batch


def worker_message(text: str) -> str:
    """The original message of an error PyTorch re-raised from a worker ("Caught X in DataLoader worker
    process 0.\nOriginal Traceback ...\nkdcache.stores.errors.SpecError: MESSAGE"), else ``text``."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not text.startswith("Caught ") or len(lines) < 2:
        return text
    head, sep, message = lines[-1].partition(": ")
    return message if sep and head.replace(".", "").replace("_", "").isalnum() else lines[-1]


def replay_loader(rows: ViewedRows, batch_sampler, workers: int, device: torch.device,
                  persistent: bool = False, prefetch: int | None = None) -> torch.utils.data.DataLoader:
    """The one DataLoader over ``ViewedRows``: batch sampler of (view, row) pairs, pinned memory on
    CUDA, and (stage two) persistent workers that survive across epochs."""
    return ReplayLoader(
        rows,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=already_batched,
        pin_memory=device.type == "cuda",
        multiprocessing_context=worker_context(workers),
        persistent_workers=persistent and workers > 0,
        prefetch_factor=prefetch if workers > 0 else None,
    )


def default_workers(dataset: ImageDataset) -> int:
    """In-memory toy data decodes faster in-process than through worker processes."""
    if getattr(dataset, "in_memory", False):
        return 0
    return min(8, max(1, (torch.get_num_threads() or 2) - 1))


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' is CUDA when there is one, else the CPU; a device this machine lacks is a SpecError."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SpecError(f"--device must be auto, cpu, cuda or cuda:N; got '{device}'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"--device {device}: this machine has no CUDA GPU; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SpecError(f"--device {device}: there are {torch.cuda.device_count()} GPUs; pick cuda:0..")
    return dev
