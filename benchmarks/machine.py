"""What every benchmark JSON records about the machine it ran on (these boxes are shared and noisy)."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import numpy as np
import torch
import zarr


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Versions, cores, torch threads, load average now (and the GPU when ``device`` is CUDA)."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
            info["cuda"] = torch.version.cuda
    return info
