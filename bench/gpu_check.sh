#!/usr/bin/env bash
# The GPU checklist: run this on a machine with an NVIDIA GPU (driver only; the CUDA
# libraries come with the `gpu` extra) from the repository root:
#
#     bash bench/gpu_check.sh [OUT]        # OUT defaults to ./gpu-check (deleted first)
#
# It installs the GPU extra, runs the cupy tests, trains 20 steps and resumes, packs
# synthetic ImageNet-64-like shards in more files than a common `ulimit -n` (1,125 files),
# trains on them with worker processes, and prints the step rate, the host reads per
# step and the loader rate. Every command's output goes to OUT/*.log and the summary to
# the terminal; it stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
rm -rf "$OUT" && mkdir -p "$OUT"
step() { echo "== $1"; shift; "$@" 2>&1 | tee "$OUT/$(date +%s%N).log" | tail -n 12; }

step "install (CUDA libraries from the gpu extra)" pip install -q -e ".[gpu,test]"
step "GPU and CUDA libraries (smoke test: GEMM, LU solve, kernel, RNG)" \
    python -c "import cupy; from gait_ref.backend import get_backend; get_backend('cupy'); \
print(cupy.__version__, cupy.cuda.runtime.getDeviceProperties(0)['name'].decode())"
step "cupy tests" python -m pytest -q -m gpu -p no:cacheprovider
step "train 10 steps" python run.py --backend cupy --task synthetic --rule gait --max-steps 10 --quiet --out "$OUT/run"
step "resume to 20 steps" python run.py --backend cupy --task synthetic --rule gait --max-steps 20 --quiet \
    --out "$OUT/run" --resume
tail -n 2 "$OUT/run/metrics.jsonl"
step "pack 36,000 synthetic 64 px images in 1,125 shards" \
    python bench/loader.py --pack-only "$OUT/shards" --images 36000 --per-shard 32
step "train conv7 GP on them (4 loader workers, ulimit -n $(ulimit -n))" \
    python run.py --backend cupy --task imagenet --data "$OUT/shards" --rule gait --batch-size 256 \
    --max-steps 100 --log-every 20 --loader-workers 4 --quiet --out "$OUT/imagenet"
grep '"train"' "$OUT/imagenet/metrics.jsonl" | tail -n 2
step "host reads per step and step rate (GP, conv7, 64 px)" \
    python bench/device_traffic.py --backend cupy --task imagenet --data "$OUT/shards" --rule gait --arch conv7 \
    --batch 256 --steps 60 --loader-workers 4
step "host reads per step (L-DRL, SimpleVGG)" \
    python bench/device_traffic.py --backend cupy --task imagenet --data "$OUT/shards" --rule ldrl \
    --arch simple-vgg --batch 128 --steps 20
step "loader rate against the step rate" python bench/loader.py --backend cupy --data "$OUT/shards" \
    --workers 0,2,4,8
step "renewing layers: float64 row solve against the residual (decides whether it pays on this card)" \
    python bench/row_solve.py --backend cupy
step "performance benchmarks" python bench/perf.py --backend cupy
echo "done: logs in $OUT"
