#!/usr/bin/env bash
# Train the shapes VAR tokenizer, VAR and HMAR one after another on the lent GPU, results into $OUT.
#   bash scripts/device_train_hmar.sh "TOKENIZER OPTIONS" "VAR OPTIONS" "HMAR OPTIONS"
#   e.g. bash scripts/device_train_hmar.sh "--steps 4000 --batch-size 128" "--steps 6000 --batch-size 128" \
#            "--steps 6000 --next-scale-steps 4000 --batch-size 128"
# Options are accel.pipelines.hmar.train's. Needs the device wheels in .whl/ (bash ../shared/tools/device-wheels.sh).
# Each stage comes back as $OUT/<stage>.tar (its save_pretrained folder + training.json), its log as $OUT/<stage>.log.
set -euo pipefail
source scripts/device_env.sh
cd /tmp  # the repo's ./accel folder would shadow the assembled package
init=()
for stage in tokenizer var hmar; do
  options=$1; shift
  # shellcheck disable=SC2086  # options are words
  python -m accel.pipelines.hmar.train "$stage" --out "/tmp/runs/$stage" --device cuda ${init[@]+"${init[@]}"} $options \
    >"$OUT/$stage.log" 2>&1 || { echo "training $stage failed: see $stage.log" >&2; tail -5 "$OUT/$stage.log" >&2; exit 1; }
  tar -C "/tmp/runs/$stage" -cf "$OUT/$stage.tar" model training.json
  init=(--init "/tmp/runs/$stage/model")
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >"$OUT/gpu.txt"
