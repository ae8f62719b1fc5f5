#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite. Exits non-zero on any failure, and also when
# pytest collected no test at all (its exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
