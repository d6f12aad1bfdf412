#!/usr/bin/env bash
# Train shapes reference models side by side on the lent GPU (one H200 fits them all), results into $OUT.
#   bash scripts/device_train_shapes.sh MINUTES "KIND[:LABEL] [train.py options]" ...
#   e.g. bash scripts/device_train_shapes.sh 9 "video --compile --seed 20 --motion-trail --high-noise-share 0.25 --batch-size 256 --lr 6e-4"
#   (the shipped shapes-video run: its card)
# A LABEL names a run (video:a -> run video-a) so that two runs of one kind can go side by side.
# Needs the device wheels in .whl/ (bash ../shared/tools/device-wheels.sh). Each model comes back as
# $OUT/<run>.tar (the save_pretrained folder + training.json); logs as $OUT/<run>.log. A second call with the same
# options on a machine still held resumes /tmp/runs/<run> for MINUTES more (other options: train.py refuses).
set -euo pipefail
minutes=$1; shift
run_name() { local name=${1%% *}; echo "${name/:/-}"; }  # "video:a --seed 1" -> video-a
runs=$(for spec in "$@"; do run_name "$spec"; done)
[ -z "$(sort <<<"$runs" | uniq -d)" ] || { echo "each run needs its own name (they share /tmp/runs/RUN and \$OUT/RUN.*)" >&2; exit 2; }
source scripts/device_env.sh
mkdir -p /tmp/runs
cd /tmp  # the repo's ./accel folder would shadow the assembled package
pids=()
for spec in "$@"; do
  read -r name options <<<"$spec"
  run=$(run_name "$spec")
  # shellcheck disable=SC2086  # options are words
  python -m accel.pipelines.shapes.train "${name%%:*}" --out "/tmp/runs/$run" --max-minutes "$minutes" $options >"$OUT/$run.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  run=$(run_name "${@:i+1:1}")
  if wait "${pids[$i]}"; then
    tar -C "/tmp/runs/$run" -cf "$OUT/$run.tar" model training.json
  else  # never pack an earlier run's model as this one's
    echo "training $run failed: see $run.log" >&2; tail -5 "$OUT/$run.log" >&2; failed=1
  fi
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$OUT/gpu.txt"
exit $failed
