#!/usr/bin/env bash
# Install sglite (and, with --test, its test tools) into ./.venv on a fresh machine.
#
# Without an NVIDIA GPU, torch is pinned to the local CPU build (constraints-cpu.txt): otherwise xinference's
# dependencies (timm -> torchvision -> torch) pull several GB of CUDA wheels. The torchvision wheel on PyPI is
# built against CUDA torch and breaks `import transformers` next to a CPU torch, and nothing sglite serves needs
# it, so on CPU machines it is removed again.
set -euo pipefail
cd "$(dirname "$0")/.."

# [bench]: matplotlib for `sglite bench serve --plot-dir`; [test]: pytest and the peers the tests run against.
testing=0
[[ "${1:-}" == "--test" ]] && testing=1
extras="[bench]"
[[ $testing == 1 ]] && extras="[bench,test]"

# The web UI test (tests/test_webui.py) drives Debian's headless Chromium through its chromedriver.
install_chromium() {
  if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[install] --test needs /usr/bin/chromium and /usr/bin/chromedriver (Debian packages chromium," \
      "chromium-driver) for the web UI test, and apt-get is not available here: install them another way," \
      "or set SGLITE_SKIP_WEBUI=1 to skip that test" >&2
    exit 1
  fi
  local sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "[install] --test installs chromium + chromium-driver (apt) for the web UI test: run it as root" \
        "(or where sudo is available), or install them first: apt-get install chromium chromium-driver" >&2
      exit 1
    fi
  fi
  echo "[install] installing chromium + chromium-driver (apt) for the web UI test"
  ${sudo[@]+"${sudo[@]}"} apt-get update -q
  ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
  if [[ ! -x /usr/bin/chromium || ! -x /usr/bin/chromedriver ]]; then
    echo "[install] apt-get ran, yet /usr/bin/chromium or /usr/bin/chromedriver is missing" >&2
    exit 1
  fi
}
if [[ $testing == 1 ]]; then
  install_chromium
fi

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
