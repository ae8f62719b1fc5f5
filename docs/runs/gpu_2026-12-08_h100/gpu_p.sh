# Session 2026-12-07/08, second call: why the MLA prep CUDA tests fail, DeepSeek-V2-Lite slower (5.32 vs 3.99 ms),
# AWQ / FP8 a little slower (3.37 / 3.96 vs 3.20 / 3.87 ms): failures with tracebacks and PDL-off profiles.
set -o pipefail
[ -d /tmp/site/xinf_sglang ] || bash .whl/carry1/install.sh >/dev/null 2>&1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p $OUT/log
echo "=== failing tests $(date +%T)"
timeout 90 python3 -P -m pytest -q -p no:cacheprovider tests/cuda/test_cuda_moe.py tests/cuda/test_cuda_kernels.py tests/cuda/test_cuda_mla.py -k "test_cuda_moe or qk_rms or mla_prep or silu_mul or float32_router" -rf --tb=line 2>&1 | grep -E "^FAILED|Error|assert|passed|failed|/.*py:[0-9]+" | cut -c1-300 | head -30
timeout 60 python3 -P -m pytest -q -p no:cacheprovider tests/cuda/test_cuda_mla.py -k "mla_prep" -x --tb=short 2>&1 | tail -30 | cut -c1-250
export SGLITE_DISABLE_PDL=1
D="python3 -P -m xinf_sglang.cli bench decode --load-format dummy --dtype bfloat16 --engine-arg cuda_graph_max_bs=4 --engine-arg context_length=2048 --steps 32 --profile"
for m in deepseek-v2-lite llama-3.1-8b-awq llama-3.1-8b-fp8; do echo "=== prof $m $(date +%T)"; timeout 50 $D --model-config configs/$m.json > $OUT/log/prof_$m.txt 2>&1; echo rc=$?; grep "wall per" $OUT/log/prof_$m.txt; sed -n '/^kernel /,+13p' $OUT/log/prof_$m.txt | cut -c1-50,90-130; done
date +%T
