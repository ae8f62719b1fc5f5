"""The launch-option names users bring from vLLM and SGLang, and their spelling, mapped to sglite's options.

``xinference launch ... --max_model_len 2048`` is what a vLLM user types; Xinference passes CLI keys through
as typed (``--reasoning-content true`` arrives as ``reasoning-content``). :func:`resolve_aliases` turns such keys
into sglite's: hyphens become underscores, each alias with the same meaning becomes sglite's option (its value
converted where the sense is inverted), and an alias whose meaning sglite cannot honour is refused with the
reason. What it did is returned as notes for the startup log, so the meaning applied is visible.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable


def _truthy(v: Any) -> bool:
    """Booleans as the web UI and REST clients send them: ``True``, ``"true"``, ``"1"``, ``"yes"``, ``"on"``."""
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "1", "yes", "on"):
            return True
        if s in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{v!r} is not a boolean (true/false)")
    if isinstance(v, (bool, int)):
        return bool(v)
    raise ValueError(f"{v!r} is not a boolean (true/false)")


def _same(v: Any) -> Any:
    return v


@dataclass(frozen=True)
class Alias:
    """``name`` (from ``origin``) means sglite's ``target`` with the value ``convert(value)``; ``convert`` raises
    ValueError for values sglite cannot honour (the message says why)."""

    name: str
    origin: str
    target: str
    meaning: str
    convert: Callable[[Any], Any] = _same


def _not(v: Any) -> bool:
    return not _truthy(v)


def _chunked_prefill(v: Any) -> Any:
    if _truthy(v):
        return None  # sglite always chunks prompts longer than chunked_prefill_size: nothing to change
    raise ValueError("sglite always splits long prompts into chunks of chunked_prefill_size tokens; to prefill "
                     "whole prompts at once, set chunked_prefill_size to the context length instead")


def _kv_cache_dtype(v: Any) -> Any:
    if str(v).strip().lower() == "auto":
        return None  # the model's dtype, which is what sglite stores
    raise ValueError(f"sglite stores the KV cache in the model's dtype; kv_cache_dtype={v!r} (a quantized KV "
                     "cache) is not supported: remove it or pass 'auto'")


ALIASES: tuple[Alias, ...] = (
    Alias("max_model_len", "vLLM", "context_length", "max prompt + output tokens per request"),
    Alias("gpu_memory_utilization", "vLLM", "mem_fraction_static",
          "fraction of GPU memory for weights + KV cache (sglite sizes the KV pool from what is left)"),
    Alias("max_num_seqs", "vLLM", "max_running_requests", "most requests in one decode batch"),
    Alias("enable_prefix_caching", "vLLM", "disable_radix_cache", "prefix reuse on/off (inverted)", _not),
    Alias("max_num_batched_tokens", "vLLM", "max_prefill_tokens", "token budget of one prefill batch"),
    Alias("enforce_eager", "vLLM", "disable_cuda_graph", "decode eagerly instead of CUDA-graph replays", _truthy),
    Alias("enable_chunked_prefill", "vLLM", "chunked_prefill_size", "chunked prefill (always on)", _chunked_prefill),
    Alias("kv_cache_dtype", "vLLM", "dtype", "KV cache dtype (only 'auto': the model's)", _kv_cache_dtype),
    Alias("tensor_parallel_size", "vLLM", "tp_size", "ranks (GPUs) one model is split over"),
)
_BY_NAME = {a.name: a for a in ALIASES}


@dataclass(frozen=True)
class Resolved:
    """The model_config with sglite's names (``config``), the notes for the startup log, and the problems."""

    config: dict[str, Any]
    notes: list[str]
    problems: list[str]


def resolve_aliases(config: dict[str, Any], known: set[str]) -> Resolved:
    """Rename hyphenated keys and vLLM / SGLang aliases in ``config`` to sglite's options.

    ``known`` is every key sglite accepts (its options and Xinference's own keys): an unknown key gets a
    "did you mean" suggestion from them and the aliases. An alias and its target given with different values
    is a problem, not a silent choice.
    """
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}  # sglite key -> the key the user typed
    notes: list[str] = []
    problems: list[str] = []
    for raw_key, value in config.items():
        key = raw_key.replace("-", "_") if isinstance(raw_key, str) else raw_key
        alias = _BY_NAME.get(key)
        if alias is not None:
            key, value = _apply(alias, raw_key, value, notes, problems)
            if key is None:
                continue
        elif key not in known:
            problems.append(_unknown(raw_key, known))
            continue
        if key in out and out[key] != value:
            problems.append(f"{raw_key}={value!r} conflicts with {given_as[key]}={out[key]!r}: both set {key}")
            continue
        out[key], given_as[key] = value, str(raw_key)
    return Resolved(out, notes, problems)


def _apply(alias: Alias, raw_key: str, value: Any, notes: list[str], problems: list[str]) -> tuple[str | None, Any]:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None, None  # "use the default", as for every option
    try:
        converted = alias.convert(value)
    except ValueError as e:
        problems.append(f"{raw_key} ({alias.origin}): {e}")
        return None, None
    if converted is None:
        notes.append(f"{raw_key}={value!r} ({alias.origin}): already sglite's behaviour ({alias.meaning})")
        return None, None
    notes.append(f"{raw_key}={value!r} ({alias.origin}) -> {alias.target}={converted!r}: {alias.meaning}")
    return alias.target, converted


def _unknown(key: Any, known: set[str]) -> str:
    names = sorted(known | set(_BY_NAME))
    close = difflib.get_close_matches(str(key).replace("-", "_"), names, n=2, cutoff=0.75)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown option {key!r}{hint}"


def alias_table() -> str:
    """The aliases as Markdown table rows (the README's table is generated from and checked against this)."""
    return "\n".join(f"| `{a.name}` | {a.origin} | `{a.target}` | {a.meaning} |" for a in ALIASES)
