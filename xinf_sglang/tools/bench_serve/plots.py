"""PNG plots of a sweep (matplotlib, no display needed): one line per model, the baseline beside the model.

- ``throughput.png``: output token throughput against the concurrency level;
- ``latency_p99.png``: p99 TTFT and p99 ITL against the concurrency level;
- ``cache_hit_per_turn.png`` (multi-turn only): the cache hit rate of each turn, one line per model and level.

Levels are evenly spaced categories (1, 4, 16, 64 read like a log axis); a run without a cap shows as "no cap".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never look for a display

import matplotlib.pyplot as plt  # noqa: E402

from .stats import RunResult  # noqa: E402


def write_plots(results: Sequence[RunResult], plot_dir: str) -> list[Path]:
    """Write the sweep's PNGs into ``plot_dir`` (created); returns their paths."""
    out = Path(plot_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_throughput(results, out / "throughput.png"), _latency(results, out / "latency_p99.png")]
    if any(len(r.cache_hit_rate_per_turn) > 1 for r in results):
        paths.append(_cache_per_turn(results, out / "cache_hit_per_turn.png"))
    return paths


def _levels(results: Sequence[RunResult]) -> list[int | None]:
    """The concurrency levels in the order they ran (the x categories)."""
    return list(dict.fromkeys(r.max_concurrency for r in results))


def _series(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Runs grouped by model, labelled ``uid (role)``."""
    series: dict[str, list[RunResult]] = {}
    for r in results:
        series.setdefault(f"{r.model_id} ({r.role})", []).append(r)
    return series


def _against_levels(ax: plt.Axes, results: Sequence[RunResult], value, ylabel: str) -> None:
    """One line per model of ``value(run)`` at each level."""
    levels = _levels(results)
    for label, runs in _series(results).items():
        ax.plot([levels.index(r.max_concurrency) for r in runs], [value(r) for r in runs], marker="o", label=label)
    ax.set_xticks(range(len(levels)), ["no cap" if c is None else str(c) for c in levels])
    ax.set_xlabel("max concurrency")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _throughput(results: Sequence[RunResult], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    _against_levels(ax, results, lambda r: r.total_output_tokens / max(r.duration, 1e-9), "output tokens / s")
    ax.set_title(f"output throughput ({results[0].dataset_name})")
    return _save(fig, path)


def _latency(results: Sequence[RunResult], path: Path) -> Path:
    fig, (ttft, itl) = plt.subplots(1, 2, figsize=(11, 4))
    _against_levels(ttft, results, lambda r: r.ttft.p99, "p99 TTFT (ms)")
    _against_levels(itl, results, lambda r: r.itl.p99, "p99 ITL (ms)")
    ttft.set_title("p99 time to first token")
    itl.set_title("p99 inter-token latency")
    return _save(fig, path)


def _cache_per_turn(results: Sequence[RunResult], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    unreported: dict[str, None] = {}  # models whose usage has no cached_tokens, named in the legend
    for r in results:
        turns = [(t + 1, rate) for t, rate in enumerate(r.cache_hit_rate_per_turn) if rate is not None]
        level = "no cap" if r.max_concurrency is None else r.max_concurrency
        if turns:
            ax.plot(*zip(*turns), marker="o", label=f"{r.model_id} ({r.role}), concurrency {level}")
        else:
            unreported[f"{r.model_id} ({r.role})"] = None
    if unreported:  # a legend entry without a line
        ax.plot([], [], " ", label="no cached_tokens in the usage of " + ", ".join(unreported))
    ax.set_xlabel("turn")
    ax.set_ylabel("cached prompt tokens / prompt tokens")
    ax.set_ylim(0, 1.05)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("cache hit rate per turn (multi-turn)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
