"""View replay benchmark: stage two's replay of stored view parameters against the same augmentation sampled
fresh by torchvision v2, per policy, and the bytes a view's parameters take in a store.

1. **Replay vs fresh.** For each policy, on the same uint8 images (32x32 "CIFAR-like" images for crop-flip
   policies; 160x200 images rendered at 128x128 for rrc-flip policies; drawn with torch, no downloads):
   (a) ``policy.apply(image, params, size[, partner=...])`` per image from parameters sampled beforehand (the
   per-image dict of scalars is built inside the timed loop, as ``ViewPolicy.apply_batch`` does in stage two),
   and (b) the same augmentation from ``torchvision.transforms.v2`` with fresh random draws, then
   ``ToDtype(float32, scale=True)``, per image. Mixing policies render two fresh views per image (own and a
   random partner's) and mix them per sample (timm's ``rand_bbox`` / blend, ``switch_prob=0.5``).
   Interleaved: per repeat and policy, replay then fresh (fresh first on odd repeats); the ratio is per repeat
   (replay images/s / fresh images/s of the same pair), then min / median / max. Target >= 0.9.
2. **Where the time goes.** One extra pass per policy timing each op of the chain (replay) and each torchvision
   transform (fresh) with plain timers; policies under the target also get a cProfile of the replay loop.
3. **Bytes per view.** The sum of ``policy.param_dtypes`` item sizes, and the bytes on disk of ``views/`` in a
   real store (``LogitStore.create`` with V x N sampled parameters) divided by V * N, metadata included and
   chunk payload alone.

    .venv/bin/python benchmarks/views.py --out benchmarks/views.json          # ~40 s on 2 CPU cores
    .venv/bin/python benchmarks/views.py --quick --out /tmp/views-quick.json  # toy sizes, < 30 s (tests run it)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2 as v2
from machine import finish, machine_info  # benchmarks/machine.py

from kdcache.stores.logit_store import LogitStore
from kdcache.views import policy_from_spec
from kdcache.views.base import resize, to_float
from kdcache.views.policy import MIX, PARTNER

TARGET = 0.9
SLD_STRONG = "crop-flip | randaugment:n=2,magnitude=uniform | cutout:0.5"
POLICIES = (
    SLD_STRONG,
    "crop-flip | randaugment:n=2,magnitude=9",
    "rrc-flip | trivialaugment",
    "rrc-flip | autoaugment",
    "rrc-flip | random-erasing:p=0.25",
    "crop-flip | cutout:0.5",
    "rrc-flip | cutmix:alpha=1.0,p=0.5 | mixup:alpha=0.8",
)
SMALL_HW, LARGE_HW, LARGE_OUT = (32, 32), (160, 200), (128, 128)
FULL = {"small_images": 1024, "large_images": 256, "repeats": 9, "block": 16, "store_rows": 50_000, "store_views": 4,
        "breakdown_images": 512}
QUICK = {"small_images": 96, "large_images": 24, "repeats": 2, "block": 16, "store_rows": 4_000, "store_views": 2,
         "breakdown_images": 48}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_repeat": values}


# ---------------------------------------------------------------------------------------- images


def make_images(n: int, hw: tuple[int, int], seed: int) -> torch.Tensor:
    """(n, 3, H, W) uint8 images that look like pictures to the ops (not flat noise): a colour gradient,
    a few filled boxes and pixel noise, so equalize / autocontrast / posterize do real work."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    yy = torch.linspace(0, 1, h).view(1, 1, h, 1)
    xx = torch.linspace(0, 1, w).view(1, 1, 1, w)
    a, b, c = (torch.rand(n, 3, 1, 1, generator=g) for _ in range(3))
    x = 40 + 150 * (a * yy + b * xx + c * yy * xx) / 2
    for _ in range(4):
        y0 = torch.randint(0, h - 2, (n,), generator=g)
        x0 = torch.randint(0, w - 2, (n,), generator=g)
        colour = 255 * torch.rand(n, 3, generator=g)
        for i in range(n):
            y1, x1 = int(y0[i]) + max(2, h // 4), int(x0[i]) + max(2, w // 4)
            x[i, :, int(y0[i]):y1, int(x0[i]):x1] = colour[i].view(3, 1, 1)
    x = x + 12 * torch.randn(x.shape, generator=g)
    return x.round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------- torchvision side


class UniformRandAugment(v2.RandAugment):
    """torchvision has no ``magnitude=uniform``: a fresh bin per image (kdcache draws one per op; the ops cost the
    same at any magnitude)."""

    def forward(self, *inputs):
        self.magnitude = int(torch.randint(self.num_magnitude_bins, ()))
        return super().forward(*inputs)


class SLDCutout:
    """SLD's ``CutoutAbs`` on a uint8 tensor with Python ``random`` draws: side ``U[0, size) * W``, centre uniform
    over (1, W], fill (125, 123, 114); the same clone + fill as kdcache's ``cutout`` (torchvision has no Cutout)."""

    def __init__(self, size: float = 0.5, fill=(125, 123, 114)):
        self.size, self.fill = size, torch.tensor(fill, dtype=torch.uint8).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        v = random.random() * self.size * w
        if v <= 0:
            return img
        cy, cx = random.uniform(1, h), random.uniform(1, w)
        y0, x0 = int(max(0.0, cy - v / 2)), int(max(0.0, cx - v / 2))
        y1, x1 = min(h, int(min(h, y0 + v)) + 1), min(w, int(min(w, x0 + v)) + 1)
        out = img.clone()
        out[:, y0:y1, x0:x1] = self.fill
        return out

    def __repr__(self) -> str:
        return f"SLDCutout(size={self.size}, fill={tuple(self.fill.flatten().tolist())})"


def timm_mix(own: torch.Tensor, theirs: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """timm's per-sample mix (``Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, mode='elem')``): CutMix
    with ``rand_bbox`` half the time, else a Beta(0.8, 0.8) blend."""
    if rng.random() < 0.5:
        lam = rng.beta(1.0, 1.0)
        h, w = own.shape[-2:]
        ratio = math.sqrt(1 - lam)
        ch, cw = int(h * ratio), int(w * ratio)
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
        x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
        out = own.clone()
        out[:, y0:y1, x0:x1] = theirs[:, y0:y1, x0:x1]
        return out
    lam = float(rng.beta(0.8, 0.8))
    return own * lam + theirs * (1 - lam)


def fresh_stages(spec: str, out_hw: tuple[int, int]) -> list[tuple[str, Any]]:
    """The torchvision v2 transforms of the policy's pre-mix ops, one stage per kdcache op, in order."""
    stages: list[tuple[str, Any]] = []
    for op in (s.strip() for s in spec.split("|")):
        name = op.split(":")[0]
        if name == "crop-flip":
            stages.append((name, v2.Compose([v2.RandomCrop(out_hw[0], padding=4), v2.RandomHorizontalFlip()])))
        elif name == "rrc-flip":
            stages.append((name, v2.Compose([v2.RandomResizedCrop(out_hw, antialias=True),
                                             v2.RandomHorizontalFlip()])))
        elif op == "randaugment:n=2,magnitude=uniform":
            stages.append((name, UniformRandAugment(num_ops=2)))
        elif op == "randaugment:n=2,magnitude=9":
            stages.append((name, v2.RandAugment(num_ops=2, magnitude=9)))
        elif name == "trivialaugment":
            stages.append((name, v2.TrivialAugmentWide()))
        elif name == "autoaugment":
            stages.append((name, v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)))
        elif op == "random-erasing:p=0.25":
            stages.append((name, v2.RandomErasing(p=0.25, value=0)))
        elif op == "cutout:0.5":
            stages.append((name, SLDCutout(0.5)))
        elif name in ("cutmix", "mixup"):
            continue  # mixing: timm_mix after the float conversion
        else:
            raise ValueError(f"no torchvision equivalent written for {op!r}")
    return stages


# ---------------------------------------------------------------------------------------- one case


def _add(acc: dict[str, float], key: str, seconds: float) -> None:
    acc[key] = acc.get(key, 0.0) + seconds


class Case:
    """One policy on its images: the stored parameters and both ways to render them."""

    def __init__(self, spec: str, images: torch.Tensor, out_hw: tuple[int, int], seed: int = 0):
        self.spec, self.images, self.size = spec, images, out_hw
        self.policy = policy_from_spec(spec)
        n = len(images)
        params = self.policy.sample(1, n, image_size=tuple(images.shape[-2:]), seed=seed)
        self.params = {k: v[0] for k, v in params.items()}  # {param: (N,)} of view 0
        self.stages = fresh_stages(spec, out_hw)
        self.fresh = v2.Compose([t for _, t in self.stages] + [v2.ToDtype(torch.float32, scale=True)])
        self.to_float = v2.ToDtype(torch.float32, scale=True)
        self.rng = np.random.default_rng(seed + 1)

    def replay(self, a: int, b: int) -> None:
        """Replay images a..b-1 from their stored parameters (what stage two does per image)."""
        images, size, policy = self.images, self.size, self.policy
        params = {k: v[a:b] for k, v in self.params.items()}
        partners = policy.partner_rows(params)
        for i in range(b - a):
            own = {k: v[i].item() for k, v in params.items()}
            partner = images[int(partners[i])] if partners is not None and partners[i] >= 0 else None
            policy.apply(images[a + i], own, size, partner=partner)

    def fresh_pass(self, a: int, b: int) -> None:
        """Render images a..b-1 with fresh torchvision draws (two views and a per-sample mix when mixing)."""
        images, fresh = self.images, self.fresh
        if self.policy.mixes:
            rng, total = self.rng, len(images)
            for i in range(a, b):
                j = int(rng.integers(0, total - 1))
                timm_mix(fresh(images[i]), fresh(images[j + (j >= i)]), rng)
        else:
            for i in range(a, b):
                fresh(images[i])

    def fresh_mirror(self, a: int, b: int) -> None:
        """Mixing only: timm's batch mixing as it is used (one fresh render per image; the partner is the block's
        mirror element, already rendered): a cheaper baseline than replay can be, since replay renders the partner."""
        images, fresh, rng = self.images, self.fresh, self.rng
        rendered = [fresh(images[i]) for i in range(a, b)]
        for i in range(b - a):
            timm_mix(rendered[i], rendered[b - a - 1 - i], rng)

    # ------------------------------------------------------------------ where the time goes
    def breakdown(self, n: int) -> dict[str, dict[str, float]]:
        """Microseconds per image in each step of replay (each op, the final resize + float, the mix) and of the
        fresh torchvision chain (each stage, ToDtype, the mix), with plain timers; image by image, replay and
        fresh alternating who goes first."""
        replay: dict[str, float] = {}
        fresh: dict[str, float] = {}
        partners = self.policy.partner_rows(self.params)
        for i in range(n):
            if i % 2 == 0:
                self._replay_steps(i, partners, replay)
                self._fresh_steps(i, fresh)
            else:
                self._fresh_steps(i, fresh)
                self._replay_steps(i, partners, replay)
        return {"replay_us_per_image": {k: 1e6 * v / n for k, v in replay.items()},
                "fresh_us_per_image": {k: 1e6 * v / n for k, v in fresh.items()}}

    def _replay_steps(self, i: int, partners, acc: dict[str, float]) -> None:
        policy, size, pre = self.policy, self.size, self.policy.pre
        t_all = time.perf_counter()
        own = {k: v[i].item() for k, v in self.params.items()}
        _add(acc, "params dict", time.perf_counter() - t_all)
        renders = [("", self.images[i])]
        if partners is not None and partners[i] >= 0:
            renders.append((PARTNER + ".", self.images[int(partners[i])]))
        out = []
        for who, x in renders:
            tag = " (partner)" if who else ""
            for j, op in enumerate(pre):
                prefix = who + policy.prefixes[j]
                t0 = time.perf_counter()
                x = op.transform(x, {k: own[prefix + k] for k in op.param_dtypes}, size)
                _add(acc, f"{j}-{op.name}{tag}", time.perf_counter() - t0)
            t0 = time.perf_counter()
            x = to_float(resize(x, size)).clamp_(0.0, 1.0)
            _add(acc, f"resize + to float{tag}", time.perf_counter() - t0)
            out.append(x)
        if len(out) == 2:
            fired = int(own[MIX]) - 1
            m, prefix = policy.mix_ops[fired], policy.prefixes[len(pre) + fired]
            t0 = time.perf_counter()
            m.mix(out[0], out[1], {k: own[prefix + k] for k in m.param_dtypes})
            _add(acc, "mix", time.perf_counter() - t0)
        _add(acc, "total", time.perf_counter() - t_all)

    def _fresh_steps(self, i: int, acc: dict[str, float]) -> None:
        t_all = time.perf_counter()
        sources = [self.images[i]] + ([self.images[(i + 1) % len(self.images)]] if self.policy.mixes else [])
        out = []
        for tag, x in zip(("", " (partner)"), sources, strict=False):
            for j, (name, tf) in enumerate(self.stages):
                t0 = time.perf_counter()
                x = tf(x)
                _add(acc, f"{j}-{name}{tag}", time.perf_counter() - t0)
            t0 = time.perf_counter()
            x = self.to_float(x)
            _add(acc, f"ToDtype{tag}", time.perf_counter() - t0)
            out.append(x)
        if len(out) == 2:
            t0 = time.perf_counter()
            timm_mix(out[0], out[1], self.rng)
            _add(acc, "mix", time.perf_counter() - t0)
        _add(acc, "total", time.perf_counter() - t_all)

    def profile(self, n: int, top: int = 15) -> list[dict[str, Any]]:
        """cProfile of the replay loop: the functions with the most cumulative time (seconds per image)."""
        prof = cProfile.Profile()
        prof.enable()
        self.replay(0, n)
        prof.disable()
        stats = pstats.Stats(prof, stream=io.StringIO())
        rows = []
        for (file, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
            rows.append({"function": f"{Path(file).name}:{line}:{func}", "calls_per_image": calls / n,
                         "cum_us_per_image": 1e6 * cumtime / n, "own_us_per_image": 1e6 * tottime / n})
        return sorted(rows, key=lambda r: -r["cum_us_per_image"])[:top]


# ---------------------------------------------------------------------------------------- parts


def replay_vs_fresh(cfg: dict) -> dict[str, Any]:
    small = make_images(cfg["small_images"], SMALL_HW, seed=0)
    large = make_images(cfg["large_images"], LARGE_HW, seed=1)
    cases = {spec: (Case(spec, large, LARGE_OUT) if spec.startswith("rrc") else Case(spec, small, SMALL_HW))
             for spec in POLICIES}
    for case in cases.values():  # untimed warm-up: imports, first-call dispatch, allocator
        n = min(16, len(case.images))
        case.replay(0, n)
        case.fresh_pass(0, n)
    sides = ("replay", "fresh", "fresh_mirror")
    rates = {clock: {s: {side: [] for side in sides} for s in cases} for clock in ("wall", "cpu")}
    utilisation: dict[str, list[float]] = {s: [] for s in cases}
    block = cfg["block"]
    for rep in range(cfg["repeats"]):
        for spec, case in cases.items():
            n = len(case.images)
            fns = {"replay": case.replay, "fresh": case.fresh_pass}
            if case.policy.mixes:
                fns["fresh_mirror"] = case.fresh_mirror
            wall = dict.fromkeys(fns, 0.0)
            cpu = dict.fromkeys(fns, 0.0)
            # side by side in blocks of `block` images, who goes first alternating per block: both sides see the
            # same contention from the machine's other processes
            for k, a in enumerate(range(0, n, block)):
                names = list(fns) if (k + rep) % 2 == 0 else list(reversed(fns))
                for name in names:
                    c0, w0 = time.process_time(), time.perf_counter()
                    fns[name](a, min(a + block, n))
                    wall[name] += time.perf_counter() - w0
                    cpu[name] += time.process_time() - c0
            for name in fns:
                rates["wall"][spec][name].append(n / wall[name])
                rates["cpu"][spec][name].append(n / cpu[name])
            utilisation[spec].append(sum(cpu.values()) / sum(wall.values()))
        log(f"  repeat {rep}: " + ", ".join(
            f"{s.split('|')[1].strip()[:14]} {rates['wall'][s]['replay'][-1] / rates['wall'][s]['fresh'][-1]:.2f}"
            for s in cases))
    out: dict[str, Any] = {}
    for spec, case in cases.items():
        entry: dict[str, Any] = {
            "images": len(case.images), "source_hw": list(case.images.shape[-2:]), "out_hw": list(case.size),
            "canonical_spec": case.policy.spec,
            "fresh_transforms": [" ".join(repr(t).split()) for _, t in case.stages] + ["ToDtype(float32, scale=True)"]
            + (["timm_mix (per-sample CutMix p=0.5 / Mixup)"] if case.policy.mixes else [])}
        for clock in ("wall", "cpu"):
            r = rates[clock][spec]
            entry[clock] = {"images_per_s": {k: spread(v) for k, v in r.items() if v},
                            "replay_over_fresh": spread([a / b for a, b in zip(r["replay"], r["fresh"], strict=True)])}
            if r["fresh_mirror"]:
                entry[clock]["replay_over_fresh_mirror"] = spread(
                    [a / b for a, b in zip(r["replay"], r["fresh_mirror"], strict=True)])
        entry["meets_target"] = entry["wall"]["replay_over_fresh"]["median"] >= TARGET
        entry["cpu_utilisation"] = spread(utilisation[spec])
        log(f"  breakdown: {spec}")
        entry["breakdown"] = case.breakdown(min(cfg["breakdown_images"], len(case.images)))
        mirror = entry["wall"].get("replay_over_fresh_mirror", {"median": TARGET})["median"]
        if not entry["meets_target"] or mirror < TARGET:  # also below timm's cheaper batch mirror
            log(f"  below target: profiling {spec}")
            entry["replay_profile"] = case.profile(min(cfg["breakdown_images"], len(case.images)))
        out[spec] = entry
    return out


def stored_bytes(cfg: dict, work: Path) -> dict[str, Any]:
    """Bytes per (view, row) of every policy's parameters: item sizes, and views/ of a real store on disk."""
    n, v = cfg["store_rows"], cfg["store_views"]
    out = {}
    for spec in POLICIES:
        policy = policy_from_spec(spec)
        hw = LARGE_HW if spec.startswith("rrc") else SMALL_HW
        params = policy.sample(v, n, image_size=hw, seed=0)
        labels = np.random.default_rng(0).integers(0, 10, n).astype(np.int32)
        path = work / f"views-{len(out)}.kdc"
        store = LogitStore.create(path, labels=labels, views=params, attrs={"view_policy": policy.record()},
                                  manifest={"dataset_index": np.arange(n), "sample_id": [str(i) for i in range(n)],
                                            "label": labels}, num_views=v, overwrite=True)
        nodes = store.nbytes_stored()
        views_total = sum(b for node, b in nodes.items() if node == "views" or node.startswith("views/"))
        payload = sum(f.stat().st_size for f in (path / "views").rglob("*") if f.is_file() and "c" in f.parts)
        item = sum(d.itemsize for d in policy.param_dtypes.values())
        out[spec] = {"params": len(policy.param_dtypes), "itemsize_bytes_per_view": item,
                     "disk_bytes_per_view": views_total / (v * n), "chunk_payload_bytes_per_view": payload / (v * n),
                     "compression": item / (payload / (v * n)) if payload else None, "views": v, "rows": n}
        log(f"  bytes: {spec}: {item} B raw, {views_total / (v * n):.2f} B on disk")
    return out


# ---------------------------------------------------------------------------------------- report


def markdown(res: dict[str, Any]) -> str:
    rf, by = res["replay_vs_fresh"], res["bytes"]
    lines = [
        f"Replay vs fresh torchvision v2, {res['settings']['repeats']} interleaved repeats, 1 torch thread "
        f"(crop-flip policies: {res['settings']['small_images']} images 32x32; rrc-flip: "
        f"{res['settings']['large_images']} images 160x200 -> 128x128):",
        "",
        "| policy | replay img/s | fresh img/s | replay / fresh, wall: median (min–max) | CPU time: median "
        "(min–max) | >= 0.9 |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for spec, e in rf.items():
        ips, q, c = e["wall"]["images_per_s"], e["wall"]["replay_over_fresh"], e["cpu"]["replay_over_fresh"]
        lines.append(f"| `{spec}` | {ips['replay']['median']:,.0f} | {ips['fresh']['median']:,.0f} | "
                     f"{q['median']:.2f} ({q['min']:.2f}–{q['max']:.2f}) | {c['median']:.2f} ({c['min']:.2f}–"
                     f"{c['max']:.2f}) | {'yes' if e['meets_target'] else 'no'} |")
    for spec, e in rf.items():
        if "replay_over_fresh_mirror" in e["wall"]:
            q, c = e["wall"]["replay_over_fresh_mirror"], e["cpu"]["replay_over_fresh_mirror"]
            lines += ["", f"`{spec}` against timm's batch mirror (one fresh render per image, "
                          f"{e['wall']['images_per_s']['fresh_mirror']['median']:,.0f} img/s): replay / mirror "
                          f"{q['median']:.2f} ({q['min']:.2f}–{q['max']:.2f}), CPU time {c['median']:.2f} "
                          f"({c['min']:.2f}–{c['max']:.2f})"]
    lines += ["", "| policy | params | item bytes / view | on disk / view (with metadata) | chunk payload / view |",
              "|---|---:|---:|---:|---:|"]
    for spec, b in by.items():
        lines.append(f"| `{spec}` | {b['params']} | {b['itemsize_bytes_per_view']} | {b['disk_bytes_per_view']:.2f} | "
                     f"{b['chunk_payload_bytes_per_view']:.2f} |")
    lines += ["", "Where the time goes (µs per image, replay | fresh):", ""]
    for spec, e in rf.items():
        r, f = e["breakdown"]["replay_us_per_image"], e["breakdown"]["fresh_us_per_image"]
        lines.append(f"- `{spec}`: replay " + ", ".join(f"{k} {v:.0f}" for k, v in r.items())
                     + " | fresh " + ", ".join(f"{k} {v:.0f}" for k, v in f.items()))
    for spec, e in rf.items():
        if "replay_profile" in e:
            lines += ["", f"cProfile of the replay of `{spec}` (cumulative µs per image):", "",
                      "| function | calls / image | cumulative µs | own µs |", "|---|---:|---:|---:|"]
            lines += [f"| `{r['function']}` | {r['calls_per_image']:.1f} | {r['cum_us_per_image']:.0f} | "
                      f"{r['own_us_per_image']:.0f} |" for r in e["replay_profile"][:12]]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes (< 30 s): a smoke test, not a measurement")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7; quick 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (both sides use the same)")
    p.add_argument("--out", default=None, help="write the results JSON here")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats:
        cfg["repeats"] = args.repeats
    torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "views", "quick": args.quick, "machine": machine_info(),
                              "settings": {**cfg, "threads": args.threads, "policies": list(POLICIES)},
                              "target_replay_over_fresh": TARGET}
    log("replay vs fresh torchvision (interleaved)")
    result["replay_vs_fresh"] = replay_vs_fresh(cfg)
    log("stored bytes per view")
    with tempfile.TemporaryDirectory() as tmp:
        result["bytes"] = stored_bytes(cfg, Path(tmp))
    result["below_target"] = [s for s, e in result["replay_vs_fresh"].items() if not e["meets_target"]]
    return finish(result, args.out, markdown, t_start, log)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
