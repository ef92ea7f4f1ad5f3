#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one go (its python3 already holds torch,
# triton, pytest and torchvision): build the extension for Hopper, the GPU tests, then the
# benchmarks. Logs go to $OUT (or ./gpu-out). Usage: bash bench/gpu.sh [stage ...]
# with stages build, test, testall, gram, engine, resnet50, tf32, profile, solve, transformers, transformers-small,
# structured, verify
# (default: build test gram engine).
set -u
# resnet50's asserted margin over the naive loop: 9.5x-10.1x bf16 and 12.3x tf32 were
# measured on an H100 (bench/RESULTS.md), with the naive loop's time varying by host.
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
stages=${*:-build test gram engine}
run() { local name=$1; shift; echo "=== $name: $*"; local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?; tail -n "${TAIL:-25}" "$OUT/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"; }
for stage in $stages; do case $stage in
  build) nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
         run build python3 -m pip install --no-build-isolation --no-deps -e .
         python3 -c "import torch, triton, tangent_kernels as tk; print(torch.__version__, triton.__version__); print(tk.info())" ;;
  test) run test python3 -m pytest -q -m gpu -p no:cacheprovider -x --timeout 240 tests ;;
  testall) run testall python3 -m pytest -q -p no:cacheprovider -n 8 tests ;;
  gram) run gram python3 bench/bench_gram.py --device cuda --n 256 --backend torch,cuda,triton --json "$OUT/gram.json" ;;
  engine) run engine python3 bench/bench_engine.py --device cuda ;;
  resnet50) run resnet50 python3 bench/bench_gram.py --device cuda --model resnet50 --size 224 --classes 1000 \
              --params 500000 --n "${N50:-2048}" --batch-size 64 --precision bf16 --repeats 1 --train-step \
              --backend torch,cuda,triton --margin "${MARGIN50:-8}" --json "$OUT/resnet50.json" ;;
  tf32) run tf32 python3 bench/bench_gram.py --device cuda --model resnet50 --size 224 --classes 1000 \
          --params 500000 --n "${N50:-2048}" --batch-size 64 --precision tf32 --repeats 1 --train-step \
          --backend cuda --skip func --margin "${MARGIN50:-8}" --json "$OUT/tf32.json" ;;
  profile) TAIL=40 run profile python3 bench/profile_gram.py --device cuda --backend cuda ;;
  transformers) run transformers python3 bench/bench_transformers.py --device cuda --n "${NTRANS:-2048}" \
                  --batch 256 --repeats 3 --max-step-ratio "${MAX_STEP:-2.5}" --json "$OUT/transformers.json" ;;
  # Issue #24's table on the GPU: BERT-base and ViT-B/16 configs (random weights), n = 2,048, tk.gram against a
  # training step, with each batch's host time apart from the GPU's busy time. TINY=1 DEVICE=cpu: seconds on a
  # CPU, to test the stage itself.
  transformers-small) run transformers-small python3 bench/bench_transformers_small.py --config gpu \
                        --device "${DEVICE:-cuda}" ${NSMALL:+--n "$NSMALL"} --repeats 3 --profile ${TINY:+--tiny} \
                        --json "$OUT/transformers_small.json" ;;
  solve) run solve python3 bench/bench_solve.py --device cuda --n "${NSOLVE:-50000}" --betas 10 --json "$OUT/solve.json" ;;
  structured) run structured python3 bench/bench_structured.py --device cuda --n "${NSTRUCT:-1024}" --n-resnet 256 \
                --repeats 3 --memory-gib 60 --skip nngeometry --json "$OUT/structured.json" ;;
  verify) run verify python3 bench/bench_verify.py --device cuda --n "${NVERIFY:-2048}" --repeats 3 --json "$OUT/verify.json" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac; done
