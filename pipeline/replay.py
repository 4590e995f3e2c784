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
from typing import NamedTuple

import numpy as np
import torch

from kdcache.data import ImageDataset
from kdcache.stores.errors import KdcacheError, SpecError


def pairs(views, rows) -> np.ndarray:
    """(n, 2) int64 (view, row) pairs from two equal-length sequences (or scalars broadcast)."""
    views, rows = np.broadcast_arrays(np.asarray(views, dtype=np.int64), np.asarray(rows, dtype=np.int64))
    return np.stack([views.ravel(), rows.ravel()], axis=1)


class Mix(NamedTuple):
    """How the views of a batch mix (``None`` in ``ViewBatch.mix`` when the policy never mixes): each row's
    partner label and the weight of the row's own label (1 where the view did not mix)."""

    partner_labels: torch.Tensor  # (B,) int64
    weights: torch.Tensor  # (B,) float32

    def targets(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """(B, num_classes) float targets w * onehot(y) + (1 - w) * onehot(y_partner), as timm's mixup
        labels (``F.cross_entropy`` takes them as class probabilities)."""
        w = self.weights.to(labels.device, torch.float32)[:, None]
        own = torch.nn.functional.one_hot(labels, num_classes).float()
        theirs = torch.nn.functional.one_hot(self.partner_labels.to(labels.device), num_classes).float()
        return w * own + (1 - w) * theirs


class ViewBatch(NamedTuple):
    """A rendered batch: normalised images (B, C, H, W), the rows' int64 labels, their views and rows,
    and ``mix`` (``Mix``) when the policy mixes views."""

    images: torch.Tensor
    labels: torch.Tensor
    views: torch.Tensor
    rows: torch.Tensor
    mix: Mix | None = None


class ViewedRows(torch.utils.data.Dataset):
    """(view, row) -> normalised image of store row ``row`` under view ``view``'s stored parameters.

    ``view_params[name][view, row]`` are the policy's parameters (``kdcache.views``), and
    ``dataset_index[row]`` the dataset item behind store row ``row``. A mixing view also reads its
    partner row's image (the partner is a store row, stored with the view). ``transform`` (optional) runs
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
        batch = self.__getitems__(pairs([item[0]], [item[1]]))
        return batch.images[0], int(batch.labels[0]), int(batch.views[0]), int(batch.rows[0])

    def __getitems__(self, items) -> ViewBatch:
        """A whole batch at once (the DataLoader calls this)."""
        items = np.asarray(items, dtype=np.int64).reshape(-1, 2)
        views, rows = items[:, 0], items[:, 1]
        params = {name: arr[views, rows] for name, arr in self.view_params.items()}
        partner_rows = self.policy.partner_rows(params)
        # every row is decoded once, however many of its views (view groups) or partners the batch holds
        wanted = np.unique(rows if partner_rows is None else np.concatenate([rows, partner_rows[partner_rows >= 0]]))
        decoded = {int(r): self.dataset[int(self.dataset_index[r])] for r in wanted}
        samples = [decoded[r] for r in rows.tolist()]
        labels = torch.as_tensor([label for _, label in samples], dtype=torch.int64)
        partners, mix = None, None
        if partner_rows is not None:
            partners = [decoded[p][0] if p >= 0 else None for p in partner_rows.tolist()]
            partner_labels = [decoded[p][1] if p >= 0 else y
                              for p, y in zip(partner_rows.tolist(), labels.tolist(), strict=True)]
            weights = self.policy.mix_weights(params, self.size)
            mix = Mix(torch.as_tensor(partner_labels, dtype=torch.int64), torch.as_tensor(weights, dtype=torch.float32))
        if self.dataset.image_size is None:  # images of many sizes: replay one by one, then stack
            x = torch.stack([self.policy.apply(image, {k: v[i].item() for k, v in params.items()}, self.size,
                                               None if partners is None else partners[i])
                             for i, (image, _) in enumerate(samples)])
        else:
            x = self.policy.apply_batch(torch.stack([image for image, _ in samples]), params, self.size, partners)
        x = (x - self.mean).div_(self.std)  # one new tensor: the policy's output may alias its input
        if self.transform is not None:
            x = self.transform(x)
        return ViewBatch(x, labels, torch.from_numpy(views), torch.from_numpy(rows), mix)


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
    ``offsets`` (view groups, ``kdcache.views.ViewGroups``): each slice is served once per offset, its
    views shifted by it, in one batch (group g's rows after group g-1's).
    """

    def __init__(self, batch_size: int, offsets: Sequence[int] = (0,)):
        self.batch_size = batch_size
        self.offsets = np.asarray(offsets, dtype=np.int64)
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
            views, rows = self.views[i * b : i * b + size], self.rows[i * b : i * b + size]
            yield pairs((views[None, :] + self.offsets[:, None]).ravel(), np.tile(rows, len(self.offsets)))


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
