"""Count what sglite offers among Xinference's built-in LLM families: families with at least one spec sglite
matches, launchable entries (family, format, size: one row of the launch dialog) and specs (one per hub and
quantization, as Xinference flattens them), each against the whole catalogue.

    python scripts/xinference_offers.py                  # the counts
    python scripts/xinference_offers.py --show qwen3     # every spec of a family: offered, or why not
    python scripts/xinference_offers.py --without Qwen3MoeForCausalLM Qwen2MoeForCausalLM MixtralForCausalLM
                                                         # as if the registry lacked these architectures

Calls the engine classes' ``match_json`` as Xinference's engine tables do (chat class first, then the generate
one), so the numbers are what ``/v1/engines/{model}`` reports on a fresh server with an empty model cache.
"""

from __future__ import annotations

import argparse
from typing import Any

Match = bool | tuple[bool, str]


def engine_classes() -> list[type]:
    """sglite's engine classes, in the order its registration hook lists them (importing them boots Xinference)."""
    from xinf_sglang.serving.engine import SgliteChatModel, SgliteModel

    return [SgliteChatModel, SgliteModel]


def builtin_families() -> list[Any]:
    """Xinference's built-in LLM families (its bundled JSON, specs flattened per hub and quantization)."""
    import xinference.model.llm  # noqa: F401  (fills the list below)
    from xinference.model.llm.llm_family import BUILTIN_LLM_FAMILIES

    return list(BUILTIN_LLM_FAMILIES)


def match(family: Any, spec: Any, classes: list[type]) -> Match:
    """True when one of ``classes`` matches ``spec``, else the first class's ``(False, reason)``."""
    results = [cls.match_json(family, spec, spec.quantization or "none") for cls in classes]
    return True if any(r is True for r in results) else results[0]


def counts(families: list[Any], classes: list[type]) -> dict[str, tuple[int, int]]:
    """``{"families" | "entries" | "specs": (offered, total)}``."""
    offered_families, entries, offered_entries, specs, offered_specs = 0, set(), set(), 0, 0
    for family in families:
        any_offered = False
        for spec in family.model_specs:
            entry = (family.model_name, spec.model_format, spec.model_size_in_billions)
            entries.add(entry)
            specs += 1
            if match(family, spec, classes) is True:
                any_offered = True
                offered_entries.add(entry)
                offered_specs += 1
        offered_families += any_offered
    return {"families": (offered_families, len(families)), "entries": (len(offered_entries), len(entries)),
            "specs": (offered_specs, specs)}


def show(families: list[Any], classes: list[type], name: str) -> None:
    """Print every spec of family ``name`` once per (format, size, quantization), offered or with the reason."""
    family = next(f for f in families if f.model_name == name)
    seen = set()
    for spec in family.model_specs:
        key = (spec.model_format, spec.model_size_in_billions, spec.quantization)
        if key in seen:
            continue
        seen.add(key)
        result = match(family, spec, classes)
        print(f"{'offered' if result is True else 'no':8} {key}  {spec.model_id}"
              + ("" if result is True else f"\n         {result[1]}"))


def without(architectures: list[str]) -> None:
    """Take ``architectures`` out of the model registry, in this process (what sglite offered before them)."""
    from types import MappingProxyType

    from xinf_sglang.runtime.models import registry

    kept = {a: c for a, c in registry.MODEL_CLASSES.items() if a not in architectures}
    registry.MODEL_CLASSES = MappingProxyType(kept)
    registry.SUPPORTED_ARCHITECTURES = tuple(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", metavar="FAMILY", help="list one family's specs and why each is (not) offered")
    parser.add_argument("--without", nargs="+", default=[], metavar="ARCH", help="count as if sglite lacked these")
    args = parser.parse_args()
    without(args.without)
    classes, families = engine_classes(), builtin_families()
    if args.show:
        show(families, classes, args.show)
        return
    for what, (offered, total) in counts(families, classes).items():
        print(f"{what}: sglite offers {offered} of {total}")


if __name__ == "__main__":
    main()
