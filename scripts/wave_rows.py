"""The GPU wave's result rows: every check script appends one JSON line per check to ``$WAVE_ROWS`` (when set),
and ``python scripts/wave_rows.py [FILE]`` prints them as the one summary table (check, PASS/FAIL/INFO/SKIP,
numbers). Without ``$WAVE_ROWS`` a row is only printed.

    from wave_rows import add_row
    add_row("parity llama graphs + overlap", "PASS", "12/12 identical")
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

STATUSES = ("PASS", "FAIL", "INFO", "SKIP")


def add_row(check: str, status: str, detail: str, **numbers: float | int | str | None) -> None:
    """Record one row: ``status`` is PASS, FAIL, INFO (measured, no pass rule) or SKIP (not run, ``detail`` says
    why); ``numbers`` are kept in the JSON line for whoever reads the file."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    row = {"check": check, "status": status, "detail": detail, "call": os.environ.get("WAVE_CALL", ""),
           "time": time.strftime("%H:%M:%S"), **numbers}
    print(f"[row] {status:<4} {check}: {detail}", flush=True)
    path = os.environ.get("WAVE_ROWS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def print_table(path: Path) -> int:
    """The rows of ``path`` as a table; returns the number of FAIL rows."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    width = max([len(r["check"]) for r in rows] + [5])
    print(f"\n{'call':<5}{'check':<{width + 2}}{'result':<8}numbers")
    print("-" * (width + 60))
    for r in rows:
        print(f"{r.get('call', ''):<5}{r['check']:<{width + 2}}{r['status']:<8}{r['detail']}")
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    print("-" * (width + 60))
    print("  ".join(f"{s} {n}" for s, n in counts.items()))
    return counts["FAIL"]


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("WAVE_ROWS", "wave_rows.jsonl"))
    print_table(target)
