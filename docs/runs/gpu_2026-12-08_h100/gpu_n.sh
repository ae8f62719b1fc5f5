# Session 2026-12-07 night, first call (issues 32/34): CUDA tests of 47efa6e (split-K in the GEMVs), 3e83054 (decode MoE GEMVs), d764714 (q/k norm), 6eea642 (MLA prep), 24d6bb7 (SwiGLU in the GEMV epilogue), ad012f7 (SwiGLU in the bf16 skinny linear), then batch-1 decode (decode-only roofline) for the five models and a PDL-off Qwen3 profile. Not run yet: no machine was lent (six refused starts, then loans paused).
set -o pipefail
[ -d /tmp/site/xinf_sglang ] || bash .whl/carry1/install.sh >/dev/null 2>&1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mkdir -p $OUT/log
T() { local t=$1 name=$2; shift 2; echo "=== $name $(date +%T)"; timeout $t "$@" > $OUT/log/$name.txt 2>&1; echo "rc=$?"; grep -E "passed|failed|FAILED|roofline: sglite|time split|wall per|Error" $OUT/log/$name.txt | tail -4; }
T 80 cuda_tests python3 -P -m pytest -q -p no:cacheprovider tests/cuda/test_cuda_quant.py -k "bit_exact or split_k or graph_replay or gemv_matches or silu_mul"
B="python3 -P -m xinf_sglang.cli bench offline --load-format dummy --baseline none --num-prompts 1 --input-len 128:128 --output-len 256:256 --roofline --dtype bfloat16 --engine-arg cuda_graph_max_bs=4 --engine-arg context_length=2048"
for m in llama-3.1-8b-awq llama-3.1-8b-fp8 llama-3.1-8b qwen3-30b-a3b deepseek-v2-lite; do T 45 b1_$m $B --model-config configs/$m.json --json $OUT/b1_$m.json; done
T 90 cuda_moe python3 -P -m pytest -q -p no:cacheprovider tests/cuda/test_cuda_moe.py tests/cuda/test_cuda_kernels.py tests/cuda/test_cuda_mla.py -k "test_cuda_moe or qk_rms or mla_prep or silu_mul or float32_router"
export SGLITE_DISABLE_PDL=1
D="python3 -P -m xinf_sglang.cli bench decode --load-format dummy --dtype bfloat16 --engine-arg cuda_graph_max_bs=4 --engine-arg context_length=2048 --steps 32 --profile"
for m in qwen3-30b-a3b; do T 40 prof_$m $D --model-config configs/$m.json; sed -n '/^kernel /,+14p' $OUT/log/prof_$m.txt | cut -c1-50,90-130; done
date +%T
