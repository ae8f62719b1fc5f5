#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite: every tier in one pytest run (one collection, one
# shared xinference-local for the integration tests). Tiers are markers (pyproject.toml, tests/conftest.py):
#   quick loop:   pytest -m "not xinference and not slow"
#   slow:         pytest -m "slow and not xinference"
#   integration:  pytest -m xinference
# The run ends with the seconds spent per tier and the slowest tests. Exits non-zero on any failure, and also when
# pytest collected no test at all (its exit code 5). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
.venv/bin/python -m pytest -q --durations=30 "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "[test] pytest collected no test: that is a failure, not a pass" >&2
fi
exit "$status"
