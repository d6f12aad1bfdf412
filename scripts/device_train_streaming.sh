#!/usr/bin/env bash
# StreamingT2V on the lent GPU: the open_clip shapes model, then CAM + APM on the shipped shapes-video reading it,
# then (optionally) the GPU benchmark; results into $OUT.
#   bash scripts/device_train_streaming.sh CLIP_MINUTES STREAMING_MINUTES [BENCHMARK_SECONDS [benchmark options]]
# Needs the device wheels in .whl/ (bash ../shared/tools/device-wheels.sh). Each model comes back as $OUT/<run>.tar
# (its model folder + training.json), logs as $OUT/<run>.log, the benchmark as $OUT/streaming_t2v_gpu.json.
set -euo pipefail
clip_minutes=$1; streaming_minutes=$2; benchmark_seconds=${3:-0}; shift $(( $# < 3 ? $# : 3 ))
source scripts/device_env.sh
cd /tmp  # the repo's ./accel folder would shadow the assembled package
train() { python -m accel.pipelines.streaming_t2v.train "$@"; }
train clip --out /tmp/runs/shapes-clip --max-minutes "$clip_minutes" >"$OUT/clip.log" 2>&1
tar -C /tmp/runs/shapes-clip -cf "$OUT/shapes-clip.tar" model training.json
train streaming --out /tmp/runs/shapes-streaming --max-minutes "$streaming_minutes" --steps 100000 \
  --clip shapes-clip:/tmp/runs/shapes-clip/model/open_clip_model.safetensors >"$OUT/streaming.log" 2>&1
tar -C /tmp/runs/shapes-streaming -cf "$OUT/shapes-streaming.tar" model training.json
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$OUT/gpu.txt"
if [ "$benchmark_seconds" -gt 0 ]; then
  timeout "$benchmark_seconds" python "$REPO/benchmarks/streaming_t2v_gpu.py" --out "$OUT/streaming_t2v_gpu.json" "$@" \
    >"$OUT/benchmark.log" 2>&1 || echo "benchmark failed or ran out of time: see benchmark.log" >&2
fi
