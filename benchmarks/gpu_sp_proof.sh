#!/usr/bin/env bash
# The SP proof on one multi-GPU host (nvidia-h200-x2 / -x4), in one device call: bench_sp (SP 1 vs the SP
# layouts, parity and speed-up; eager and/or compiled), then the Serve app over HTTP for each config given.
# Usage (after the bundle line):
#   MODES="eager compiled" LAYOUTS=u2,u2+nr DEGREES=1,2 bash benchmarks/gpu_sp_proof.sh <commit> configs/a.yaml [configs/b.yaml ...]
# The packed Ulysses exchange on vs off (no configs: bench_sp only):
#   MODES="eager compiled" LAYOUTS=u2,u2+packed,u2+nr,u2+nr+packed DEGREES=1,2 BENCH_TIMEOUT=280 bash benchmarks/gpu_sp_proof.sh <commit>
# Writes $OUT/sp-<mode>.json, $OUT/serve-<config>.json and their logs.
set -uo pipefail
commit=$1; shift
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
export GIT_COMMIT=$commit
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpus.txt
for mode in ${MODES-eager compiled}; do  # MODES="": the configs alone
  flag=""; [ "$mode" = compiled ] && flag=--compile
  timeout ${BENCH_TIMEOUT:-190} python benchmarks/bench_sp.py --out $OUT/sp-$mode.json --degrees ${DEGREES:-1,2} \
      --layouts ${LAYOUTS:-u2,u2+nr} $flag --repeats 8 --denoise-repeats 2 > $OUT/sp-$mode.log 2>&1
  echo "bench_sp $mode rc=$?"; grep -a "forward .* ms" $OUT/sp-$mode.log | tail -n 12
done
for config in "$@"; do
  name=$(basename $config .yaml)
  # a 1-GPU config sees one GPU, as on a 1-GPU host (else Ray spreads its stages over the host's GPUs)
  case $name in *1gpu*) export CUDA_VISIBLE_DEVICES=0 ;; *) unset CUDA_VISIBLE_DEVICES ;; esac
  timeout ${SERVE_TIMEOUT:-200} python benchmarks/compare.py --config $config --only server --commit $commit --label "serve $config" \
      --c1-requests 6 --cn-requests 16 --concurrency 8 --cn-warmup 2 --output-format jpeg --ray-logs \
      --out $OUT/serve-$name.json > $OUT/serve-$name.log 2>&1
  echo "serve $name rc=$?"; grep -a "server c=\|Traceback\|Error:" $OUT/serve-$name.log | sort | uniq -c | sort -rn | head -n 8
  pkill -f "ray::" 2>/dev/null; ray stop --force > /dev/null 2>&1; sleep 2
done
