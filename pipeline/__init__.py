"""kdcache: offline teacher-logit caching for knowledge distillation (docs/api.md).

Stage one caches what teachers say about a dataset's augmented views into a Zarr store
(``teach``); stage two trains students from it without the teacher (``CachedLoader`` in any
training loop, or ``kdcache train``)::

    import kdcache
    store = kdcache.open_store("runs/c100.kdc")
    loader = kdcache.CachedLoader(store, batch_size=64, workers=4, seed=0)
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        for images, labels, teacher in loader:
            loss = kdcache.losses.kd(model(images), teacher, labels)
"""

from kdcache import losses, records
from kdcache._version import __version__
from kdcache.corrections import CORRECTIONS, apply_correction
from kdcache.ensemble import EnsembleRecord
from kdcache.loader import CachedLoader
from kdcache.losses import LOSSES, get_loss
from kdcache.models import build_model
from kdcache.records import LAYOUTS, Layout, get_layout, register_layout
from kdcache.sampled import SampledLogits
from kdcache.sparse import SparseLogits
from kdcache.store import Store, open_store
from kdcache.stores.errors import CorruptionError, KdcacheError, SpecError, StoreError

# ``teach`` and ``verify`` are functions here, although modules of the same names exist
# (kdcache.teach, kdcache.verify): binding them after the submodule import makes ``kdcache.teach``
# the function for good (a later ``import kdcache.teach`` finds the module in sys.modules and leaves
# the attribute alone). Code that needs the module uses ``from kdcache.teach import ...``.
from kdcache.teach import teach
from kdcache.verify import verify

__all__ = [
    "CORRECTIONS",
    "LAYOUTS",
    "LOSSES",
    "CachedLoader",
    "CorruptionError",
    "EnsembleRecord",
    "KdcacheError",
    "Layout",
    "SampledLogits",
    "SparseLogits",
    "SpecError",
    "Store",
    "StoreError",
    "__version__",
    "apply_correction",
    "build_model",
    "get_layout",
    "get_loss",
    "losses",
    "open_store",
    "records",
    "register_layout",
    "teach",
    "verify",
]

