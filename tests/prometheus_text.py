"""A strict reader of the Prometheus text format (0.0.4) for the metrics tests: every line must parse."""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
_TYPES = {"counter", "gauge", "histogram"}


@dataclass(frozen=True)
class Scrape:
    """Samples by (name, sorted labels), and each family's declared type."""

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    types: dict[str, str]

    def value(self, name: str, **labels: str) -> float:
        """The one sample of ``name`` whose labels include ``labels``."""
        found = [v for (n, ls), v in self.samples.items() if n == name and set(labels.items()) <= set(ls)]
        assert len(found) == 1, f"{len(found)} samples of {name} with {labels}"
        return found[0]

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """``(le, cumulative count)`` of histogram ``name``, in bound order."""
        rows = [(float(dict(ls)["le"]), v) for (n, ls), v in self.samples.items()
                if n == name + "_bucket" and set(labels.items()) <= set(ls)]
        return sorted(rows)


def parse(text: str) -> Scrape:
    """Parse ``text``; assert that each line is a HELP, a TYPE or a sample of a declared family."""
    samples: dict = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in _TYPES, line
            types[name] = kind
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, _, raw_labels, value = m.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample of an undeclared family: {line!r}"
        labels = tuple(sorted((k, v) for k, v, _ in _LABEL.findall(raw_labels or "")))
        key = (name, labels)
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)
    return Scrape(samples, types)


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=60) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(r.read().decode())
