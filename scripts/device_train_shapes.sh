#!/usr/bin/env bash
# Train shapes reference models side by side on the lent GPU (one H200 fits them all), results into $OUT.
#   bash scripts/device_train_shapes.sh MINUTES "KIND [train.py options]" ...
#   e.g. bash scripts/device_train_shapes.sh 9 "video --compile --seed 1 --init $PWD/pipelines/weights/shapes-video"
# Needs the device wheels in .whl/ (bash ../shared/tools/device-wheels.sh). Each model comes back as
# $OUT/<kind>.tar (the save_pretrained folder + training.json); logs as $OUT/<kind>.log. A second call with the same
# options on a machine still held resumes /tmp/runs/KIND for MINUTES more (other options: train.py refuses).
set -euo pipefail
minutes=$1; shift
kinds=$(for spec in "$@"; do read -r kind _ <<<"$spec"; echo "$kind"; done)
[ -z "$(sort <<<"$kinds" | uniq -d)" ] || { echo "one run per kind (they share /tmp/runs/KIND and \$OUT/KIND.*)" >&2; exit 2; }
source scripts/device_env.sh
mkdir -p /tmp/runs
cd /tmp  # the repo's ./accel folder would shadow the assembled package
pids=()
for spec in "$@"; do
  read -r kind options <<<"$spec"
  # shellcheck disable=SC2086  # options are words
  python -m accel.pipelines.shapes.train "$kind" --out "/tmp/runs/$kind" --max-minutes "$minutes" $options >"$OUT/$kind.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  read -r kind _ <<<"${@:i+1:1}"
  if wait "${pids[$i]}"; then
    tar -C "/tmp/runs/$kind" -cf "$OUT/$kind.tar" model training.json
  else  # never pack an earlier run's model as this one's
    echo "training $kind failed: see $kind.log" >&2; tail -5 "$OUT/$kind.log" >&2; failed=1
  fi
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$OUT/gpu.txt"
exit $failed
