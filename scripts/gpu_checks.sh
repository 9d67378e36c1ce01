#!/usr/bin/env bash
# The GPU checks as one prepared script: `gpu`-marked tests, then the benchmarks, each with its
# own time limit, every log under $OUT (default ./runs/gpu). Usage: scripts/gpu_checks.sh [PARTS]
# where PARTS is a comma list of: env, tests, triton, attention, insitu, gemm, profile, step,
# hfstatic, dit (default: all; about 14 minutes at most, so a 10-minute call takes a subset).
# Issue 5's figures need: env,tests,attention,insitu,step,hfstatic (about 7 minutes on an H200).
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
PARTS=${1:-env,tests,triton,attention,insitu,gemm,profile,step,hfstatic,dit}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}

part() { [[ ",$PARTS," == *",$1,"* ]]; }
run() {  # run NAME LIMIT_S CMD...: log to $OUT/NAME.log, print its tail
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "=== $name rc=$? in $((SECONDS - t0))s"
  tail -n 25 "$OUT/$name.log"
}

if part env; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import json, torch; from eval.timing import environment; print(json.dumps(environment('cuda', torch.bfloat16)))"
fi
part tests && run tests 80 $PY -m pytest -m gpu -q -p no:cacheprovider \
  tests/test_attention_gpu.py tests/test_diffusion_dit.py tests/test_static_step.py
# The kernel tests (not marked gpu: they run on CUDA when it is there, else under the interpreter).
part triton && run triton 90 $PY -m pytest -q -p no:cacheprovider tests/test_attention_triton.py \
  tests/test_rmsnorm.py
part attention && run attention 200 $PY -m eval.bench_attention --sweep --flush write,read,none
# The same kernels inside the 7B verify step (per-kernel GPU time, no artificial L2 flush).
part insitu && run insitu_4k 90 $PY -m eval.bench_step --preset 7b --sizes 1,64 --prefix 4096 \
  --profile triton
part insitu && run insitu_16k 90 $PY -m eval.bench_step --preset 7b --sizes 1,64 --prefix 16384 \
  --profile triton
part gemm && run gemm 60 $PY -m eval.bench_gemm
part profile && run profile 120 $PY -m eval.bench_step --preset 7b --sizes 1,64 --profile triton
# Two processes: a failed CUDA-graph capture poisons the context for whatever runs after it.
part step && run step 90 $PY -m eval.bench_step --preset 7b --sizes 1,16,32,64 --repeats 10 \
  --methods hf-eager,engine-triton,engine-graph-triton,engine-graph-triton+eager-norms,engine-graph-sdpa
part hfstatic && run step_hf_static 180 $PY -m eval.bench_step --preset 7b --sizes 1,16,32,64 \
  --repeats 10 --methods hf-static-compiled
part dit && run dit 60 $PY -m eval.bench_diffusion --iters 10
exit 0
