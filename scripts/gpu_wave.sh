#!/usr/bin/env bash
# Issue 20's GPU wave on one H200, in calls that fit the device tool's limits (10 min a call, 64 MiB carried):
#   bash scripts/gpu_wave.sh 1   wheels (.whl, carried) -> /tmp/site and /root/ab/{old,new}; GGUF part 1 -> /root/smol;
#                                kernel checks, parity (logprobs, n=3), A/B of bench a/b/c against .whl/old
#   bash scripts/gpu_wave.sh 2   GGUF part 2 (.whl2, carried) -> the SmolLM2 fixture folder; scripts/gpu_smollm2.py (f32/bf16/GGUF/JSON)
# Every check appends its row to $OUT/rows.jsonl (scripts/wave_rows.py), printed as one table at the end of a call.
# Build the carried folder here first: bash scripts/gpu_wave.sh prepare (sglite wheels new + old, the GGUF halves).
set -uo pipefail
cd "$(dirname "$0")/.."
call=${1:?call number: prepare, 1 or 2}
OLD_COMMIT=${OLD_COMMIT:-a72bd36}
if [[ $call == prepare ]]; then
  set -e; rm -rf .whl; mkdir -p .whl/old .whl/gguf
  P="--only-binary=:all: --python-version 3.12 --implementation cp"
  for t in 2_17 2_27 2_28 2_31 2_34 2_35; do P+=" --platform manylinux_${t}_x86_64"; done
  python3 -m pip download -q --no-deps $P --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 llguidance==1.9.1 gguf==0.19.0
  .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl .
  rm -rf /tmp/oldwt; git worktree add -q -f /tmp/oldwt "$OLD_COMMIT"
  .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl/old /tmp/oldwt; git worktree remove -f /tmp/oldwt
  gguf=$(.venv/bin/python -c "from xinf_sglang.runtime.testing.smollm2 import fetch_smollm2; print(fetch_smollm2().gguf)")
  split -n 2 -d "$gguf" .whl/gguf/part; mkdir -p .whl2; mv .whl/gguf/part01 .whl2/; sha256sum "$gguf" | cut -d' ' -f1 > .whl/gguf/sha256
  exit 0
fi
if [[ $call == prepare3 ]]; then  # call 3: .whl3 = sglite + deps + Xinference (without its thirdparty models)
  set -e; rm -rf .whl3 /tmp/xw3; mkdir -p .whl3 /tmp/xw3
  cp .whl/*.whl .whl3/; mkdir .whl3/old; cp .whl/old/*.whl .whl3/old/
  rm .whl3/xinf_sglang-*.whl; .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl3 .  # HEAD
  P="--only-binary=:all: --python-version 3.12 --implementation cp"
  for t in 2_17 2_27 2_28 2_31 2_34 2_35; do P+=" --platform manylinux_${t}_x86_64"; done
  python3 -m pip download -q --no-deps $P --platform manylinux2014_x86_64 -d /tmp/xw3 xinference==4.1.0 \
    xoscar==0.12.2 click==8.1.8 fastapi==0.136.1 starlette==1.10.0 python-multipart orjson uvicorn==0.55.0 \
    sse-starlette==3.7.1 openai==3.57.0 anthropic==2.16.0 jiter distro sniffio docstring-parser python-jose ecdsa \
    rsa pyasn1 cryptography cffi pycparser bcrypt aioprometheus==23.12.0 async-timeout setproctitle tblib \
    modelscope==1.40.2 modelscope-hub==0.5.1 httpx2==2.16.2 httpcore2==2.16.2 truststore idna==3.20 anyio==4.16.0 h11
  .venv/bin/pip wheel -q --no-deps -w /tmp/xw3 quantile-python==1.1  # sdist only on PyPI: built here
  (cd /tmp/xw3 && for w in xinference-*.whl; do
     mkdir x && cd x && python3 -m zipfile -e ../$w . && (cd xinference/thirdparty && rm -rf indextts deepseek_vl2 melo controlnet magika cosyvoice f5_tts mineru ace_step_1_5) \
       && grep -v -E "^xinference/thirdparty/(indextts|deepseek_vl2|melo|controlnet|magika|cosyvoice|f5_tts|mineru|ace_step_1_5)/" xinference-*.dist-info/RECORD > R && mv R xinference-*.dist-info/RECORD \
       && python3 -m zipfile -c ../$w xinference xinference-*.dist-info && cd .. && rm -rf x; done)
  mv /tmp/xw3/* .whl3/; du -sh .whl3; exit 0
fi
out=${OUT:-/tmp/sglite-wave}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WAVE_ROWS=$out/rows.jsonl WAVE_CALL=$call
start=$(date +%s)
smol=/root/smol/smollm2-135m-instruct
if [[ $call == 3 ]]; then  # bench (c) A/B, then the plugin through Xinference on the GPU
  pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
  pipi /tmp/site $(ls .whl3/*.whl .whl3/*.tar.gz 2>/dev/null) >"$out/install.log" 2>&1 || { tail -20 "$out/install.log"; exit 1; }
  pipi /root/ab/new .whl3/xinf_sglang-*.whl && pipi /root/ab/old .whl3/old/xinf_sglang-*.whl || exit 1
  echo "import site; site.addsitedir('/tmp/site')" > /tmp/site/sitecustomize.py  # .pth hooks (sglite's engine)
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH XINFERENCE_ENABLE_VIRTUAL_ENV=0
  ln -sf /tmp/site/bin/xinference-local "$(dirname "$(python3 -c 'import sys; print(sys.executable)')")/"
  deadline=$((start + ${WAVE_BUDGET_S:-230}))
  python3 scripts/gpu_ab.py --workload c --old /root/ab/old --new /root/ab/new --rounds 1 --num-prompts 200 \
    --deadline $deadline --estimate-s 90 --log "$out/ab.log" 2>&1 | grep -E "\[row\]|\[ab\]"
  timeout ${XINF_BUDGET_S:-300} python3 scripts/gpu_xinference.py --out "$out" --sweep ${SWEEP:-1,16,64,256} --num-prompts ${NUM_PROMPTS:-256} \
    2>&1 | tee "$out/xinference_run.log" | grep -E "\[row\]|Error|error|\\$" | head -40
elif [[ $call == 1 ]]; then
  pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
  deps=$(ls .whl/*.whl | grep -v xinf_sglang)
  pipi /tmp/site $deps .whl/xinf_sglang-*.whl >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
  pipi /root/ab/new .whl/xinf_sglang-*.whl && pipi /root/ab/old .whl/old/xinf_sglang-*.whl || exit 1
  mkdir -p /root/smol && cp .whl/gguf/part00 .whl/gguf/sha256 /root/smol/
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 scripts/gpu_kernel_check.py 2>&1 | tee "$out/kernels.log" | grep -E "pass|FAIL" | tail -3
  python3 scripts/gpu_parity.py 2>&1 | tee "$out/parity.log" | grep "\[row\]"
  deadline=$((start + ${WAVE_BUDGET_S:-560}))
  for w in a b c; do
    np=(); [[ $w == c ]] && np=(--num-prompts 200)
    python3 scripts/gpu_ab.py --workload $w --old /root/ab/old --new /root/ab/new --rounds 1 "${np[@]}" \
      --deadline $deadline --estimate-s 90 --log "$out/ab.log" 2>&1 | grep -E "\[row\]|\[ab\]"
  done
elif [[ $call == 2 ]]; then
  export PYTHONPATH=/tmp/site
  mkdir -p $smol/gguf && cat /root/smol/part00 .whl2/part01 > $smol/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
  [[ $(sha256sum $smol/gguf/*.gguf | cut -d' ' -f1) == $(cat /root/smol/sha256) ]] || { echo "GGUF checksum wrong"; exit 1; }
  python3 scripts/gpu_smollm2.py --cache-dir $smol 2>&1 | tee "$out/smollm2.log" | grep -E "\[row\]|Error|error" | head -40
fi
python3 scripts/wave_rows.py "$WAVE_ROWS"
