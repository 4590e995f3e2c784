#!/usr/bin/env bash
# The GPU bars of docs/architecture.md ("Quality bars") on one CUDA GPU, within a fixed time limit
# (LIMIT_S, default 480 s). benchmarks/README.md, "gpu.sh", says what each step measures.
#
#   bash benchmarks/gpu.sh             # one CUDA GPU; JSON (and a log per step) into ${OUT:-benchmarks/gpu}
#   bash benchmarks/gpu.sh --dry-run   # every step at toy size on the CPU, into ${OUT:-benchmarks/gpu-dry-run}: a check
#
# Steps: env (GPU, versions) -> a synthetic JPEG ImageFolder -> loader workers tuned (kdcache's replay loader
# alone, a few worker counts, the fastest kept) -> stage one, benchmarks/teach.py: `teach` against a bare
# teacher forward, ResNet-50 at 224^2, bf16 autocast, pinned memory, channels_last -> stage two,
# benchmarks/train.py: ResNet-50 -> ResNet-18 steps from the cache against hard labels and against
# --online-teacher -> the record path, benchmarks/record_path.py, once it takes --device. A step that fails
# or runs out of time is reported and the next one still runs; the exit code is 1 when any step failed.
# Wheels in .whl/ are installed (pip --no-index --no-deps) into /tmp/site when the image lacks zarr or kdcache.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
# dry runs write where git does not look
if [ "$DRY" = 1 ]; then OUT="${OUT:-benchmarks/gpu-dry-run}"; else OUT="${OUT:-benchmarks/gpu}"; fi
LIMIT_S="${LIMIT_S:-480}"
PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
START=$SECONDS

if [ "$DRY" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA GPU: benchmarks/gpu.sh measures GPU bars; use --dry-run on CPU" >&2
  exit 1
fi
if ! "$PY" -c "import zarr, kdcache" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! "$PY" -c "import kdcache" 2>/dev/null; then  # no kdcache wheel in .whl/: build it from this tree
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >/dev/null 2>&1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! err=$("$PY" -c "import kdcache" 2>&1); then
    echo "kdcache does not import (${err##*$'\n'}): fill .whl/ as benchmarks/README.md (gpu.sh) says" >&2
    exit 1
  fi
fi
mkdir -p "$OUT"
if [ -z "${WORK:-}" ]; then  # images and stores; removed at the end
  WORK=$(mktemp -d /tmp/kdcache-gpu-XXXXXX)
  trap 'rm -rf "$WORK"' EXIT
fi

if [ "$DRY" = 1 ]; then  # toy sizes on the CPU
  DEVICE=cpu; IMAGES=48; CLASSES=4; IMAGE_W=40; IMAGE_H=30; SIZE=32
  TEACHER=kdcache.models:tiny_cnn; STUDENT=tiny_cnn; K=4; BATCH=16
  TEACH_ARGS=(--repeats 1 --warmup 0 --no-profile); TRAIN_ARGS=(--steps 2 --repeats 1 --serve-rows 8192)
  WORKER_CANDIDATES=0,1
else  # ImageNet-like: 1000 class folders of 500x375 JPEGs, ResNet-50 (random weights: speed does not need trained ones)
  DEVICE=cuda; IMAGES="${IMAGES:-10000}"; CLASSES=1000; IMAGE_W=500; IMAGE_H=375; SIZE=224
  TEACHER=torchvision:resnet50:none; STUDENT=resnet18; K=10; BATCH=256
  TEACH_ARGS=(--repeats 5 --warmup 1); TRAIN_ARGS=(--steps 30 --repeats 3)
  WORKER_CANDIDATES=""  # 4, 8, 12, cores - 1, cores
fi
FOLDER="$WORK/imagefolder"

STEPS=()
step() {  # step NAME BUDGET_S CMD...: run CMD with its output in $OUT/NAME.log, within BUDGET_S and the time left
  local name=$1 budget=$2 left rc t0
  shift 2
  left=$(( LIMIT_S - (SECONDS - START) ))
  (( budget > left )) && budget=$left
  if (( budget < 5 )); then
    echo "== $name: skipped, the ${LIMIT_S} s limit is spent" >&2
    STEPS+=("$name:skipped:0")
    return
  fi
  echo "== $name (at most ${budget} s)" >&2
  t0=$SECONDS
  timeout -k 10 "$budget" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  STEPS+=("$name:$rc:$(( SECONDS - t0 ))")
  if [ "$rc" = 0 ]; then
    echo "   ok, $(( SECONDS - t0 )) s" >&2
  else
    echo "   FAILED (exit $rc$( [ "$rc" = 124 ] && echo ', time limit'), $(( SECONDS - t0 )) s);" \
      "last lines of $OUT/$name.log:" >&2
    tail -n 5 "$OUT/$name.log" >&2
  fi
}

# helper.py env|images|workers: the small steps that need no benchmark script of their own
cat >"$WORK/helper.py" <<'PYEOF'
import json, os, subprocess, sys, time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

what, out = sys.argv[1], Path(os.environ["OUT"])


def jpeg(i):
    """One JPEG: a colour gradient, a few flat boxes and sensor-like noise (decodes like a photo, ~60 KB at 500x375)."""
    from PIL import Image
    w, h, classes = int(os.environ["IMAGE_W"]), int(os.environ["IMAGE_H"]), int(os.environ["CLASSES"])
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    slope = rng.uniform(-0.3, 0.3, 3).astype(np.float32)
    img = rng.uniform(0, 255, 3).astype(np.float32) + slope * (xx + yy)[..., None]
    for _ in range(4):
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        dy, dx = int(rng.integers(2, h // 2 + 3)), int(rng.integers(2, w // 2 + 3))
        img[y0:y0 + dy, x0:x0 + dx] += rng.uniform(-80, 80, 3)
    img += 12 * rng.standard_normal((h, w, 3), dtype=np.float32)
    folder = Path(os.environ["FOLDER"]) / f"n{i % classes:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:07d}.jpg", quality=90)


if what == "env":
    import torch
    info = {"dry_run": os.environ["DRY"] == "1", "device": os.environ["DEVICE"], "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip()
    print(json.dumps(info, indent=2))
    (out / "env.json").write_text(json.dumps(info, indent=2) + "\n")
elif what == "images":
    n = int(os.environ["IMAGES"])
    t0 = time.perf_counter()
    with Pool(min(os.cpu_count() or 1, 16)) as pool:
        pool.map(jpeg, range(n), chunksize=64)
    files = list(Path(os.environ["FOLDER"]).rglob("*.jpg"))
    info = {"images": len(files), "classes": int(os.environ["CLASSES"]),
            "size_wh": [int(os.environ["IMAGE_W"]), int(os.environ["IMAGE_H"])],
            "mean_bytes": sum(f.stat().st_size for f in files) / len(files), "seconds": time.perf_counter() - t0}
    print(json.dumps(info))
    (out / "images.json").write_text(json.dumps(info, indent=2) + "\n")
elif what == "workers":  # kdcache's replay loader alone (decode, rrc-flip replay, resize, pinned batches)
    import torch
    from kdcache.replay import BlockBatches, ViewedRows, replay_loader
    from kdcache.teach import TeachConfig, open_store_for, pending_blocks, prepare
    cores = len(os.sched_getaffinity(0))
    text = os.environ.get("WORKER_CANDIDATES") or ",".join(map(str, (4, 8, 12, cores - 1, cores)))
    candidates = sorted({w for w in map(int, text.split(",")) if 0 <= w <= cores})
    cfg = TeachConfig(dataset=f"imagefolder:{os.environ['FOLDER']}", teachers=[os.environ["TEACHER"]],
                      out=str(Path(os.environ["WORK"]) / "workers.kdc"), k=int(os.environ["K"]), views=1,
                      view_policy="rrc-flip", image_size=int(os.environ["SIZE"]), device=os.environ["DEVICE"],
                      batch_size=int(os.environ["BATCH"]))
    job = prepare(cfg)
    store = open_store_for(job)
    blocks = [(v, *store.shard_bounds(s)) for v, s in pending_blocks(store, [t.name for t in job.teachers])]
    rows = ViewedRows(job.dataset, job.policy, store.views(), store.manifest_column("dataset_index"), job.size)
    rates = {}
    for w in candidates:
        seen, t0 = 0, None
        for x, *_ in replay_loader(rows, BlockBatches(blocks, cfg.batch_size), w, job.device):
            x = x.to(job.device, non_blocking=True)
            if t0 is None:  # from the first batch on: worker start-up is paid once per pass, not per batch
                t0 = time.perf_counter()
                continue
            seen += len(x)
        if job.device.type == "cuda":
            torch.cuda.synchronize()
        rates[str(w)] = seen / (time.perf_counter() - t0) if seen else 0.0
        print(f"workers {w}: {rates[str(w)]:,.0f} images/s", file=sys.stderr)
    best = max(rates, key=rates.get)
    info = {"images_per_s_by_workers": rates, "best": int(best), "batch_size": cfg.batch_size,
            "image_size": int(os.environ["SIZE"]), "view_policy": "rrc-flip", "device": str(job.device)}
    (out / "tune_workers.json").write_text(json.dumps(info, indent=2) + "\n")
PYEOF

export OUT DRY DEVICE IMAGES CLASSES IMAGE_W IMAGE_H SIZE TEACHER STUDENT K BATCH FOLDER WORK WORKER_CANDIDATES
step env 60 "$PY" "$WORK/helper.py" env
step images 90 "$PY" "$WORK/helper.py" images
step tune_workers 90 "$PY" "$WORK/helper.py" workers
WORKERS=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['best'])" "$OUT/tune_workers.json" 2>/dev/null)
WORKER_ARGS=(); [ -n "$WORKERS" ] && WORKER_ARGS=(--workers "$WORKERS")
step teach 200 "$PY" benchmarks/teach.py --dataset "imagefolder:$FOLDER" --teacher "$TEACHER" --views 1 \
  --view-policy rrc-flip --image-size "$SIZE" --k "$K" --batch-size "$BATCH" --device "$DEVICE" "${WORKER_ARGS[@]}" \
  --classes '' --workdir "$WORK/teach" --out "$OUT/teach.json" "${TEACH_ARGS[@]}"
step train 220 "$PY" benchmarks/train.py --dataset "imagefolder:$FOLDER" --teacher "$TEACHER" --student "$STUDENT" \
  --k "$K" --image-size "$SIZE" --batch-size "$BATCH" --device "$DEVICE" --out "$OUT/train.json" "${TRAIN_ARGS[@]}"
# the record path at 1000 classes on the device, once benchmarks/record_path.py takes --device
if [ -f benchmarks/record_path.py ] && grep -q -- '"--device"' benchmarks/record_path.py; then
  RECORD_ARGS=()
  [ "$DRY" = 1 ] && RECORD_ARGS=(--rows 2048 --views 1 --wide-rows 512 --wide-views 1 --repeats 1 --teach-rows 0)
  step record_path 120 "$PY" benchmarks/record_path.py --device "$DEVICE" --out "$OUT/record_path.json" \
    "${RECORD_ARGS[@]}"
fi

failed=0
dry=$([ "$DRY" = 1 ] && echo true || echo false)
summary="{\"dry_run\": $dry, \"limit_s\": $LIMIT_S, \"wall_s\": $(( SECONDS - START )), \"steps\": {"
sep=""
for s in "${STEPS[@]}"; do
  IFS=: read -r name rc secs <<<"$s"
  [ "$rc" = 0 ] || failed=1
  [[ "$rc" =~ ^[0-9]+$ ]] || rc="\"$rc\""
  summary+="$sep\"$name\": {\"exit\": $rc, \"seconds\": $secs}"
  sep=", "
done
summary+="}}"
echo "$summary" >"$OUT/summary.json"
echo "wrote $OUT/summary.json: $summary" >&2
exit $failed
