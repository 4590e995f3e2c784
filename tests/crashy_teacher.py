"""A teacher for tests/test_distributed.py that kills the dask worker process running it, once.

Spec ``crashy_teacher:crash_once_teacher``. While the file named by ``$KDCACHE_TEST_CRASH_ARM``
exists, the third forward inside a dask worker (mid-way through its second block) removes it and
``os._exit``s that worker process
(removal is atomic, so exactly one worker dies). Outside dask workers it is a plain seeded CNN,
so a single-process run gives the reference store.
"""

from __future__ import annotations

import os

from torch import nn

from kdcache.models import build_model

ARM_ENV = "KDCACHE_TEST_CRASH_ARM"


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


# Forwards a worker's teacher runs before it may die: tests/test_distributed.py uses 64-row blocks and
# 32-row batches, so the third forward is the first batch of that worker's second block. The worker dies
# mid-task, after it finished (and wrote) at least one block of its own.
FORWARDS_BEFORE_CRASH = 2


class CrashOnce(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.forwards = 0

    def forward(self, x):
        arm = os.environ.get(ARM_ENV)
        self.forwards += 1
        if arm and self.forwards > FORWARDS_BEFORE_CRASH and _in_dask_worker():
            try:
                os.unlink(arm)
            except FileNotFoundError:
                pass
            else:
                os._exit(17)  # the worker process dies mid-task, like an OOM kill or a lost GPU
        return self.inner(x)


def crash_once_teacher(num_classes: int = 10) -> nn.Module:
    return CrashOnce(build_model("tiny_cnn", num_classes, seed=3))
