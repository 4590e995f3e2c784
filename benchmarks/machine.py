"""What every benchmark JSON records about the machine it ran on (these boxes are shared and noisy)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
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


def finish(result: dict[str, Any], out: str | None, markdown: Callable[[dict[str, Any]], str], t_start: float,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Close a benchmark run: wall time and load average in the JSON, the RESULTS.md tables on stdout,
    the JSON written to ``out`` (when given)."""
    result["wall_s"] = time.perf_counter() - t_start
    result["machine"]["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(markdown(result))
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out} ({result['wall_s']:.0f} s)")
    return result


def student_run(cfg) -> tuple[list[dict[str, Any]], float]:
    """One student (a ``kdcache.train.TrainConfig``) in a worker process, on one thread: its numbers do not
    depend on the machine's load or on how many runs share it (torch's result changes with the thread count;
    2 threads on a busy 2-core box also run ~10x slower than 1). Returns its metrics and seconds; its run
    directory is removed."""
    from kdcache.train import run_train

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    metrics = run_train(cfg)
    seconds = time.perf_counter() - t0
    shutil.rmtree(cfg.out, ignore_errors=True)
    return metrics, seconds
