"""``sglite demo`` as a user runs it: the default (SmolLM2-135M-Instruct) and ``--tiny`` (random weights), each a
real ``sglite`` process that starts its own ``xinference-local``, launches the model with the sglite engine, asks
its two questions, checks the answers and shuts everything down. Plus the demo's own answer checks, without a
server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from xinf_sglang.tools.demo.console import Checks
from xinf_sglang.tools.demo.questions import EXTRACTION_ANSWER, PERSON_SCHEMA, schema_problems

from .xinference_server import free_port

DEMO_TIMEOUT = 900  # server start + a launch that may build the C++ CPU kernels, on 2 busy cores


def run_demo(*args: str) -> str:
    """``sglite demo ARGS --port <free>``: asserts exit code 0 and a clean shutdown; returns the output."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "sglite"), "demo", "--port", str(free_port()), *args],
        capture_output=True, text=True, timeout=DEMO_TIMEOUT, check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "[sglite demo] FAIL" not in output, output
    assert "runtime: KV pool" in output, output  # the metrics display
    home = re.search(r"log: (\S+)/xinference-local\.log", output)
    assert home and not Path(home.group(1)).exists(), "the temporary XINFERENCE_HOME was not removed"
    assert done.stdout.rstrip().endswith("[sglite demo] done"), output
    return output


# Each demo run starts its own xinference-local (that is part of what it shows), hence `xinference` and `slow`.
@pytest.mark.xinference
@pytest.mark.slow
@pytest.mark.real_model
def test_default_demo_serves_smollm2_and_its_answers_pass(smollm2) -> None:
    output = run_demo()
    assert "SmolLM2-135M-Instruct is ready" in output
    for check in ("chat stream", "chat answer", "JSON schema", "extracted values"):
        assert f"PASS  {check}:" in output, output
    assert "SmolLM2-135M-Instruct: all 4 checks passed" in output


@pytest.mark.xinference
@pytest.mark.slow
def test_tiny_demo_says_its_text_is_random_and_checks_the_format(tmp_path: Path) -> None:
    output = run_demo("--tiny", "--model-dir", str(tmp_path / "tiny"))
    assert (tmp_path / "tiny" / "config.json").is_file()
    assert "RANDOM TEXT" in output
    assert "PASS  JSON schema:" in output and "extracted values" not in output
    assert "all 2 checks passed" in output


def test_schema_problems_names_each_broken_rule() -> None:
    assert schema_problems(EXTRACTION_ANSWER, PERSON_SCHEMA) == []
    problems = schema_problems({"name": "", "age": True, "town": "x"}, PERSON_SCHEMA)
    assert any("missing 'city'" in p for p in problems)
    assert any("unexpected 'town'" in p for p in problems)
    assert any(p.startswith("name=''") for p in problems)
    assert any(p.startswith("age=True") for p in problems)  # a bool is no JSON integer
    assert schema_problems([1], PERSON_SCHEMA) == ["not an object: [1]"]


def test_checks_summary_names_the_failures(capsys: pytest.CaptureFixture[str]) -> None:
    checks = Checks()
    checks.record("a", True, "fine")
    checks.record("b", False, "wrong")
    assert "PASS  a: fine" in capsys.readouterr().out
    assert checks.failed == ["b"] and checks.summary() == "1 check(s) FAILED (b); 1 passed"
