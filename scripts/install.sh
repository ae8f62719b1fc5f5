#!/usr/bin/env bash
# Install sglite (and, with --test, its test tools) into ./.venv on a fresh machine.
#
# Without an NVIDIA GPU, torch is pinned to the local CPU build (constraints-cpu.txt): otherwise xinference's
# dependencies (timm -> torchvision -> torch) pull several GB of CUDA wheels. The torchvision wheel on PyPI is
# built against CUDA torch and breaks `import transformers` next to a CPU torch, and nothing sglite serves needs
# it, so on CPU machines it is removed again.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

python3 -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[install] NVIDIA GPU found: installing torch from the package index"
  "${pip[@]}" -e ".${extras}"
else
  echo "[install] no GPU: pinning torch to the CPU build (constraints-cpu.txt)"
  "${pip[@]}" -c constraints-cpu.txt -e ".${extras}"
  .venv/bin/python -m pip uninstall -y -q torchvision 2>/dev/null || true
fi
.venv/bin/python -c "import xinf_sglang.runtime, xinference; print('[install] sglite ready in .venv (xinference', xinference.__version__ + ')')"
