"""The grammar compile worker runs with ``python -I`` (no PYTHONPATH), yet must find llguidance where the server
found it: an install reached only through PYTHONPATH (a ``pip install --target`` folder, as on the GPU machines)
once left the worker unable to start, and compiles lost their timeout. Checked with the venv's base interpreter,
which sees this venv's packages only through PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

BASE_PYTHON = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
CHECK = Path(__file__).with_name("pythonpath_compile_check.py")


def _base_python_lacks_llguidance() -> bool:
    probe = subprocess.run([str(BASE_PYTHON), "-c", "import llguidance"], capture_output=True)
    return probe.returncode != 0


@pytest.mark.skipif(not BASE_PYTHON.exists() or sys.prefix == sys.base_prefix, reason="needs a virtualenv")
def test_worker_starts_when_llguidance_is_only_on_pythonpath(smollm2) -> None:
    if not _base_python_lacks_llguidance():
        pytest.skip("the base interpreter has llguidance itself: no PYTHONPATH-only case to check")
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    done = subprocess.run([str(BASE_PYTHON), str(CHECK), str(smollm2.hf_dir)], cwd=Path(__file__).parents[1],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiled in time: True" in done.stdout
