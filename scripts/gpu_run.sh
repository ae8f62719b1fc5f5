#!/usr/bin/env bash
# Everything the GPU issue measures, in one go on a CUDA machine (logs to ${OUT:-/tmp/sglite-gpu}).
#   bash scripts/gpu_run.sh [kernels] [parity] [bench-a] [bench-b] [bench-c]   (no argument: all)
#   extra steps: profile (batch-1 decode step per kernel), splits (split-size sweep), tune (launch-shape sweep),
#   chain (decode layers in a CUDA graph, linear variants; chain=1 only batch 1, chain=1,8 both)
#   tp-parity (2 GPUs: tensor-parallel greedy tokens vs HF, graphs asked for and off; scripts/gpu_tp_parity.py)
#   kernels=TEXT checks only the kernel rows whose name contains TEXT; tune=linear|attention|chain one sweep
#   STEP:nopdl runs STEP with programmatic dependent launch off (SGLITE_DISABLE_PDL=1, kernels/pdl.py), for A/B
# The machine needs torch, triton and transformers. sglite and what else is missing come as wheels in .whl/
# (a machine without network access): build them first with
#   pip wheel --no-deps -w .whl . && pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl pydantic ...
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/sglite-gpu}; mkdir -p "$out"
steps=${*:-kernels parity bench-a bench-b bench-c}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >"$out/install.log" 2>&1 \
  || { cat "$out/install.log"; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
run() { local name=$1; shift; echo "=== $name${SGLITE_DISABLE_PDL:+ (SGLITE_DISABLE_PDL=1)}: $*"; "$@" 2>&1 | tee "$out/$name${SGLITE_DISABLE_PDL:+-nopdl}.log" | grep -vE "^\[bench\] [^s]|it/s\]|Warning|warn\(" ; }
for step in $steps; do
  s=${step%:nopdl}
  if [[ $step == *:nopdl ]]; then export SGLITE_DISABLE_PDL=1; else unset SGLITE_DISABLE_PDL; fi
  case $s in
    kernels) run kernels python3 scripts/gpu_kernel_check.py ;;
    kernels=*) run kernels python3 scripts/gpu_kernel_check.py --only "${s#kernels=}" ;;
    profile) run profile python3 scripts/gpu_profile_decode.py ;;
    tune) run tune python3 scripts/gpu_tune.py ;;
    tune=*) run tune python3 scripts/gpu_tune.py --only "${s#tune=}" ;;
    chain) run chain python3 scripts/gpu_tune.py --only chain ;;
    chain=*) run chain python3 scripts/gpu_tune.py --only chain --chain-bs "${s#chain=}" ;;
    splits) run splits python3 scripts/gpu_split_sweep.py ;;
    parity) run parity python3 scripts/gpu_parity.py ;;
    tp-parity) run tp-parity python3 scripts/gpu_tp_parity.py ;;
    bench-a) run bench-a python3 -P -m xinf_sglang.cli bench offline --load-format dummy --model-config configs/llama-3.1-8b.json \
        --num-prompts 1 --input-len 128:128 --output-len 256:256 --roofline --engine-arg context_length=4096 ;;
    bench-b) run bench-b python3 -P -m xinf_sglang.cli bench offline --load-format dummy --model-config configs/qwen3-0.6b.json \
        --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --baseline-num-prompts 4 --engine-arg context_length=4096 ;;
    bench-c) run bench-c python3 -P -m xinf_sglang.cli bench offline --load-format dummy --model-config configs/llama-3.1-8b.json \
        --num-prompts 500 --input-len 1:4096 --output-len 1:2048 --baseline-num-prompts 1 --engine-arg context_length=8192 ;;
  esac
done
