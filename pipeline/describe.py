"""`kdcache inspect`: what a store holds, what it costs on disk, and how far its records are from dense."""

from __future__ import annotations

from typing import Any

from kdcache.stores.logit_store import LogitStore


def describe(store: LogitStore) -> dict[str, Any]:
    """A JSON-able summary of a store and each teacher in it."""
    attrs = store.attrs
    sizes = store.nbytes_stored()
    num_classes = attrs["num_classes"]
    records = store.num_rows * store.num_views
    out: dict[str, Any] = {
        "url": store.url,
        "format": attrs["format"],
        "dataset": attrs["dataset"],
        "rows": store.num_rows,
        "views": store.num_views,
        "view_policy": attrs["view_policy"],
        "shards": store.num_shards,
        "bytes_total": int(sum(sizes.values())),
        "teachers": {},
    }
    for name in store.teachers:
        t = store.teacher_attrs(name)
        done = store.done(name)
        prefix = f"teachers/{name}/"
        tbytes = int(sum(b for p, b in sizes.items() if p.startswith(prefix)))
        summary = t.get("summary", {})
        out["teachers"][name] = {
            "spec": t["spec"],
            "weights_sha256": t.get("weights_sha256"),
            "k": t["k"],
            "layout": t["layout"],
            "encoding": t["encoding"],
            "temperatures": t["temperatures"],
            "correction": t.get("correction"),
            "blocks_done": f"{int(done.sum())}/{done.size}",
            "bytes": tbytes,
            "bytes_per_record": tbytes / max(records, 1),
            "dense_float32_bytes_per_record": 4 * num_classes,
            "teacher_top1": summary.get("teacher_top1"),
            "changed_by_correction": summary.get("changed_by_correction"),
            # record error: means over a sample of each block's rows (error_rows of them; every row in stores
            # made before the sample), with standard errors (*_se; None in stores without sums of squares)
            "kl_by_temperature": summary.get("kl_by_temperature"),
            "kl_by_temperature_se": summary.get("kl_by_temperature_se"),
            "error_rows": summary.get("error_rows", summary.get("rows_done")),
            # top-k: KL at undeclared temperatures (uniform tail from the T=1 mass), on probe_rows sampled rows
            "kl_at_other_temperatures": summary.get("kl_at_other_temperatures"),
            "kl_at_other_temperatures_se": summary.get("kl_at_other_temperatures_se"),
            "probe_rows": summary.get("probe_rows"),
            # sampled records: KL is infinite (p̂ = 0 off the sample); the KD gradient error instead
            "grad_sq_error_by_temperature": summary.get("grad_sq_error_by_temperature"),
            "grad_sq_error_by_temperature_se": summary.get("grad_sq_error_by_temperature_se"),
            # --k auto: budget, sample size, measured KL per declared T of the chosen k (and every k tried)
            "fidelity": t.get("fidelity"),
            "sampling": t.get("sampling"),
        }
    return out


def format_error(means: dict[str, float] | None, ses: dict[str, float] | None = None) -> str:
    """'T=1: 1.2e-04 ± 3.1e-06  T=4: ...' (no ± for stores without standard errors); '-' when nothing."""
    ses = ses or {}
    return "  ".join(f"T={t}: {v:.2e}" + (f" ± {ses[t]:.1e}" if ses.get(t) is not None else "")
                     for t, v in (means or {}).items()) or "-"
