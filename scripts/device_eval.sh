#!/usr/bin/env bash
# The eval harness on the lent GPU(s): the quickstart itself, then its methods on both shipped pipelines (more
# seeds) on one GPU and, when the machine has two, sharded over two processes with `accelerate launch`; then the
# two runs' metrics side by side (everything but timings must agree). Run from the repo root with ".whl" carried:
#   bash scripts/device_eval.sh [--no-quickstart]  -> $OUT/eval.tar (results.md / results.json and the timed repeats of
#   each run: timing/), $OUT/compare.json
# eval.tar is rewritten after each run, so a call cut short by its time limit still brings back the runs it finished.
set -euo pipefail
case "${1:-}" in
  "") quickstart=1 ;;
  --no-quickstart) quickstart=0 ;;
  *) echo "usage: bash scripts/device_eval.sh [--no-quickstart]" >&2; exit 2 ;;
esac
source scripts/device_env.sh
runs=/tmp/evalruns && rm -rf $runs && mkdir -p $runs && cd /tmp  # never resume an earlier call's samples
python - <<'PY' >$runs/args.sh
from accel.eval.harness.cli import QUICKSTART_IMAGE_PROMPTS, QUICKSTART_METHODS, QUICKSTART_VIDEO_PROMPTS
open("/tmp/evalruns/shapes-image.txt", "w").write("\n".join(QUICKSTART_IMAGE_PROMPTS) + "\n")
open("/tmp/evalruns/shapes-video.txt", "w").write("\n".join(QUICKSTART_VIDEO_PROMPTS) + "\n")
print("methods=(--method baseline " + " ".join(f"--method '{m}'" for m in QUICKSTART_METHODS) + ")")
PY
source $runs/args.sh
pack() {  # a new archive beside the old, then renamed over it: a kill mid-write keeps the previous one whole
  local files
  files=$(cd $runs && ls -d */results.md */results.json */pareto.png */timing quickstart/*/results.md quickstart/*/results.json quickstart/*/timing 2>/dev/null || true)
  [ -n "$files" ] || return 0
  tar -C $runs -cf "$OUT/eval.tar.tmp" $files && mv "$OUT/eval.tar.tmp" "$OUT/eval.tar"
}
gpus=$(nvidia-smi -L | wc -l)
if [ $quickstart = 1 ]; then python -m accel.eval quickstart --device cuda --out $runs/quickstart; pack; fi
for pipe in shapes-image shapes-video; do
  common=(--pipeline $pipe --prompts $runs/$pipe.txt --seeds 4 --device cuda "${methods[@]}")
  python -m accel.eval run "${common[@]}" --out $runs/$pipe-1gpu; pack
  if [ "$gpus" -ge 2 ]; then
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
      -m accel.eval run "${common[@]}" --out $runs/$pipe-2gpu; pack
  fi
done
python - <<'PY' >"$OUT/compare.json"
import glob, json, os
timing = {"latency_s", "speedup", "peak_memory_gb"}
out = {}
for one in sorted(glob.glob("/tmp/evalruns/*-1gpu")):
    two = one.replace("-1gpu", "-2gpu")
    rows = lambda d: {r["config"]: {k: v for k, v in r.items() if k not in timing} for r in json.load(open(f"{d}/results.json"))["rows"]}  # noqa: E731
    out[os.path.basename(one)] = {"one_gpu": json.load(open(f"{one}/results.json"))["rows"]}
    if os.path.isdir(two):
        out[os.path.basename(one)]["two_gpus_same_quality"] = rows(one) == rows(two)
print(json.dumps(out, indent=1))
PY
