#!/usr/bin/env bash
# The SP proof on one multi-GPU host (nvidia-h200-x2 / -x4), in one device call: bench_sp eager and compiled
# (SP 1 vs every SP layout that fits, parity and speed-up), then the Serve app with an SP config over HTTP.
# Usage (after the bundle line): bash benchmarks/gpu_sp_proof.sh <commit> <sp-config.yaml> <layouts> [degrees]
# Writes $OUT/sp-eager.json, $OUT/sp-compiled.json, $OUT/serve-sp.json and their logs.
set -uo pipefail
commit=$1 config=$2 layouts=$3 degrees=${4:-1,2}
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
export GIT_COMMIT=$commit
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpus.txt
nvidia-smi topo -m >> $OUT/gpus.txt 2>&1
timeout 150 python benchmarks/bench_sp.py --out $OUT/sp-eager.json --degrees $degrees --layouts $layouts \
    --repeats 8 --denoise-repeats 2 > $OUT/sp-eager.log 2>&1; echo "bench_sp eager rc=$?"
tail -n 6 $OUT/sp-eager.log
timeout 190 python benchmarks/bench_sp.py --out $OUT/sp-compiled.json --degrees $degrees --layouts $layouts --compile \
    --warmup 3 --repeats 8 --denoise-repeats 2 > $OUT/sp-compiled.log 2>&1; echo "bench_sp compiled rc=$?"
tail -n 6 $OUT/sp-compiled.log
timeout 230 python benchmarks/compare.py --config $config --only server --commit $commit --label "serve $config" \
    --c1-requests 6 --cn-requests 16 --concurrency 8 --cn-warmup 2 --output-format jpeg \
    --out $OUT/serve-sp.json > $OUT/serve-sp.log 2>&1; echo "serve rc=$?"
tail -n 25 $OUT/serve-sp.log
