#!/usr/bin/env bash
# The one-GPU fast-path measurements in one device call (each part has its own time limit, writes its JSON
# to $OUT, and a failed part does not stop the next):
#   PARTS="fp8 bf16 b512" bash benchmarks/gpu_fast_path.sh <commit>
#   fp8   diffusers ZImagePipeline vs our pipeline vs our server (c=1, c=20), FP8 DiT, 1024²
#   fp8srv  only the server part of fp8
#   bf16  the same without FP8 (pipeline and server only: diffusers is the same as in fp8); bf16srv: its server part
#   b512  the FP8 server at 512², c=32, one fresh server for each of B512_RUNS (default "4 1 8"): 4 = DiT
#         batches as configured (max_batch_pixels 1024²: fours), 1 = every stage at max_batch_size 1,
#         8 = DiT batches of up to 8 (max_batch_pixels raised to 2 x 1024²), u = as 4 without the config's CUDA
#         graphs (denoiser.cuda_graph_max_pixels: the 512² forwards at batch 1), G = as 4 with graphs at batches 1-4
#   b1024 the FP8 server at 1024², c=20, DiT batches of up to 2 (max_batch_pixels 2 x 1024²): against fp8srv
#   tput  fp8srv with Ray Serve's throughput-optimized mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: gRPC between
#         replicas, direct ingress, user code on the replica's event loop)
#   tputobj  the same with RAY_SERVE_USE_GRPC_BY_DEFAULT=0: results through the object store as by default
#   attn  bench_attention.py: 1024² batch 1; 512² batch 8 and 1024² batch 2 with padded captions
#   cold  cold start of the FP8 server (start_to_healthy_s, each replica's build / warmup): a fresh, empty
#         compile cache, then the same server restarted on that cache; with COLD_NEW="--set ..." also the config
#         with those switches ("new" against "base"), both empty, then both warm, each on its own cache
#   stages  engine level (bench_stages.py): compiled DiT bf16 and FP8 with RoPE in real arithmetic vs
#         diffusers' complex multiply (+ profiles), text encoder, VAE compile
#   graphs  engine level (bench_stages.py): FP8 + FA3 + fused DiT with and without CUDA graphs at 512² (forward
#         and 8-step loop at batch 1 and 4, latents vs the uncaptured model), 1024² against the variant without
# CACHE_DIR=<folder>: every part compiles into (and reuses) that compile cache
# Run from the repository root on the device, after the line bundle.sh prints (and, for FlashAttention-3,
# with the fa3-fwd wheel's files unpacked into the same site folder).
set -u
COMMIT=${1:-unknown}
PARTS=${PARTS:-"fp8 bf16 b512"}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CFG=configs/random-full-1gpu.yaml
COMMON=(--config $CFG --output-format jpeg --commit "$COMMIT" --ray-logs  # replica logs into each part's log
        ${CACHE_DIR:+--set model.compile_cache_dir=$CACHE_DIR})
B512=(--only server --size 512x512 --c1-requests 8 --cn-requests 96 --concurrency 32 --cn-warmup 16
      --set 'denoiser.warmup_sizes=[[512,512]]' --set denoiser.fp8=true
      --set denoiser_deployment.max_ongoing_requests=16 --set text_encoder_deployment.max_ongoing_requests=64)

part() {  # name, time limit, compare.py arguments...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  timeout "$limit" python benchmarks/compare.py "$@" --out "$OUT/compare-$name.json" > "$OUT/compare-$name.log" 2>&1
  echo "rc=$?"
  grep -A14 "^=====" "$OUT/compare-$name.log" | grep -v ServeReplica | head -30
  grep -E "healthy after|replica startup" "$OUT/compare-$name.log" | head -4
  grep -i -E "recompil" "$OUT/compare-$name.log" | head -20
  ray stop --force > /dev/null 2>&1  # nothing of a failed part may hold the GPU for the next
}

for p in $PARTS; do
  case $p in
    cold) # the page cache warmed, then each variant's empty start, then each one's warm start, each on its own cache
          python -c "import torch, torch._dynamo, diffusers.models.transformers.transformer_z_image, transformers, ray.serve" > /dev/null 2>&1
          for run in empty warm; do
            for v in base ${COLD_NEW:+new}; do
              CACHE=/tmp/cold-cache-$v-$$; [ $run = empty ] && rm -rf "$CACHE"  # not $CC: Triton's helpers build with $CC
              sets=(); [ $v = new ] && sets=($COLD_NEW)
              part cold-$v-$run $([ $run = empty ] && echo 200 || echo 110) "${COMMON[@]}" --only server --set denoiser.fp8=true \
                --set model.compile_cache_dir=$CACHE "${sets[@]}" --c1-requests 8 --cn-requests 4 --concurrency 2 --cn-warmup 0 \
                --label "cold start, $v, $run compile cache"
            done
          done ;;
    stages) echo "=== stages (limit 300s) $(date +%T)"
          timeout 300 python benchmarks/bench_stages.py --out "$OUT/stages.json" --skip-diffusers --repeats 10 \
            --variants compile_static,compile_static_cplxrope,fp8_compile_static,fp8_compile_static_cplxrope \
            --profile-variants compile_static,compile_static_cplxrope --vae-variants compile > "$OUT/stages.log" 2>&1
          echo "rc=$?"; tail -n 25 "$OUT/stages.log" ;;
    graphs) echo "=== graphs (limit 240s) $(date +%T)"
          timeout 240 python benchmarks/bench_stages.py --out "$OUT/stages-graphs.json" --skip-diffusers --skip-pipeline \
            --variants fp8_compile_fa3_fused,fp8_compile_fa3_fused_graphs --batch-size 512 --vae-variants "" \
            ${CACHE_DIR:+--compile-cache-dir $CACHE_DIR} > "$OUT/stages-graphs.log" 2>&1
          echo "rc=$?"; grep -E "graphs|fp8_compile|failed" "$OUT/stages-graphs.log" | tail -n 12 ;;
    fp8) part fp8 340 "${COMMON[@]}" --set denoiser.fp8=true --runs 4 --warmup 1 --c1-requests 8 --cn-requests 40 --label "fp8 + vae compile" ;;
    fp8srv) part fp8-server 220 "${COMMON[@]}" --only server --set denoiser.fp8=true --c1-requests 8 --cn-requests 40 --label "fp8 + vae compile, server" ;;
    bf16srv) part bf16-server 170 "${COMMON[@]}" --only server --c1-requests 8 --cn-requests 30 --label "bf16 + vae compile, server" ;;
    bf16) part bf16 230 "${COMMON[@]}" --only pipeline,server --runs 3 --warmup 1 --c1-requests 8 --cn-requests 30 --label "bf16 + vae compile" ;;
    b512) n=0
          for b in ${B512_RUNS:-4 1 8}; do  # each a fresh server; repeat a value to see the spread between starts
            n=$((n + 1))
            case $b in
              4) part b512-batch4-$n 170 "${COMMON[@]}" "${B512[@]}" --label "512 fp8, DiT batches as configured (4 at 512²)" ;;
              1) part b512-batch1-$n 170 "${COMMON[@]}" "${B512[@]}" --label "512 fp8, every stage batch 1" \
                   --set denoiser_deployment.max_batch_size=1 --set text_encoder_deployment.max_batch_size=1 --set vae_deployment.max_batch_size=1 ;;
              u) part b512-nographs-$n 170 "${COMMON[@]}" "${B512[@]}" --label "512 fp8, DiT batches as configured, no CUDA graphs" \
                   --set denoiser.cuda_graph_max_pixels=null ;;
              G) part b512-graphs4-$n 170 "${COMMON[@]}" "${B512[@]}" --label "512 fp8, DiT batches as configured, CUDA graphs up to 512² at batches 1-4" \
                   --set denoiser.cuda_graph_max_pixels=262144 --set denoiser.cuda_graph_max_batch=4 ;;
              8) part b512-batch8-$n 170 "${COMMON[@]}" "${B512[@]}" --label "512 fp8, DiT batches up to 8" --set denoiser_deployment.max_batch_size=8 \
                   --set denoiser.max_batch_pixels=2097152 ;;
            esac
          done ;;
    b1024) part b1024-batch2 220 "${COMMON[@]}" --only server --set denoiser.fp8=true --c1-requests 8 --cn-requests 40 \
            --set denoiser.max_batch_pixels=2097152 --label "fp8, 1024² DiT batches of up to 2, server" ;;
    tput) RAY_SERVE_THROUGHPUT_OPTIMIZED=1 part fp8-server-tput 220 "${COMMON[@]}" --only server --set denoiser.fp8=true \
            --c1-requests 12 --cn-requests 40 --label "fp8 server, RAY_SERVE_THROUGHPUT_OPTIMIZED=1" ;;
    tputobj) RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_USE_GRPC_BY_DEFAULT=0 part fp8-server-tputobj 220 "${COMMON[@]}" --only server \
            --set denoiser.fp8=true --c1-requests 20 --cn-requests 40 --label "fp8 server, RAY_SERVE_THROUGHPUT_OPTIMIZED=1, RAY_SERVE_USE_GRPC_BY_DEFAULT=0" ;;
    fp8ps) part fp8-pipeline-server 300 "${COMMON[@]}" --only pipeline,server --set denoiser.fp8=true --runs 6 --warmup 1 \
            --c1-requests 20 --cn-requests 40 --label "fp8 + vae compile, pipeline and server" ;;
    attn) for a in "--batch 1 --seq 4224" "--batch 8 --seq 1152 --padded" "--batch 2 --seq 4224 --padded"; do
            echo "=== attention $a"; timeout 120 python benchmarks/bench_attention.py $a --out "$OUT/attention-$(echo $a | tr -d ' -').json" 2>&1 | tail -n 6
          done ;;
  esac
done
