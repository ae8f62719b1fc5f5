"""sglite launch options: one typed model for what ``xinference launch --model-engine sglite`` accepts.

Xinference hands an engine every extra launch kwarg in one dict (its "model_config"). They arrive typed from
the CLI (``--mem_fraction_static 0.8`` is parsed to a float by Xinference's CLI) but as strings from the web UI
and often from REST clients (``"0.8"``, ``"true"``, ``"None"``, ``""``). :class:`LaunchOptions` accepts both,
rejects unknown keys and bad values with a message that lists the valid keys / the allowed range, and
:func:`to_engine_config` is the single place that turns them into the runtime's ``EngineConfig``.

Keys Xinference itself puts into the same dict are handled explicitly (:data:`XINFERENCE_KEYS`), never dropped
silently: see :func:`split_model_config`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Values that mean "not set, use the default": the web UI sends empty fields as "" and the CLI/REST as "None".
_UNSET_STRINGS = frozenset({"", "none", "null"})
_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
}


class LaunchOptionsError(ValueError):
    """Launch options that cannot work. A ``ValueError``, so Xinference's REST API answers 400 with the text."""


class LaunchOptions(BaseModel):
    """Every option of the sglite engine. ``None`` means "derived from the model and the device"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # memory
    context_length: int | None = Field(None, ge=16, description="max prompt + output tokens per request")
    mem_fraction_static: float | None = Field(
        None, gt=0.0, lt=1.0, description="fraction of GPU memory for weights + KV pool (0 < x < 1)"
    )
    max_total_tokens: int | None = Field(None, ge=16, description="cap on the KV pool size, in tokens")
    # scheduling
    max_running_requests: int | None = Field(None, ge=1, description="max requests in the decode batch")
    chunked_prefill_size: int | None = Field(None, ge=16, description="prefill chunk size for long prompts")
    max_prefill_tokens: int | None = Field(None, ge=16, description="token budget of one prefill batch")
    schedule_policy: Literal["fcfs", "lpm"] = Field("fcfs", description="fcfs or lpm (longest prefix match)")
    disable_radix_cache: bool = Field(False, description="turn off prefix reuse")
    # model / device
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = cuda if available, else cpu")
    load_format: Literal["auto", "dummy"] = Field("auto", description="dummy = random weights (benchmarks)")
    seed: int = Field(0, description="seed of the engine's sampler")
    # GPU fast path
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = Field(None, ge=1)
    # checks
    debug_invariants: bool = Field(False, description="check the KV idle invariant whenever the engine idles")

    @model_validator(mode="before")
    @classmethod
    def _drop_unset(cls, data: Any) -> Any:
        """``None`` / ``"None"`` / ``""`` mean "use the default" for every option."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if not _is_unset(v)}

    @field_validator("schedule_policy", "device", "load_format", "attention_backend", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip().lower().removeprefix("torch.")
            return _DTYPE_ALIASES.get(v, v)
        return v

    @classmethod
    def parse(cls, options: dict[str, Any]) -> "LaunchOptions":
        """Validate ``options``; raise :class:`LaunchOptionsError` with one readable line per problem."""
        try:
            return cls.model_validate(options)
        except ValidationError as e:
            raise LaunchOptionsError(_format_errors(e)) from None

    @classmethod
    def describe(cls) -> str:
        """``name (allowed values)`` for every option, for error messages and ``--help`` texts."""
        parts = []
        for name, field in cls.model_fields.items():
            parts.append(f"{name} ({_allowed(field)})")
        return ", ".join(parts)


def _is_unset(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip().lower() in _UNSET_STRINGS)


def _allowed(field: Any) -> str:
    """A short human description of what a field accepts, read off its annotation and constraints."""
    ann = field.annotation
    args = getattr(ann, "__args__", ())
    if getattr(ann, "__origin__", None) is Literal:
        return "|".join(str(a) for a in args)
    bounds = []
    for m in field.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{sym} {getattr(m, attr)}")
    base = {bool: "true|false", int: "integer", float: "number"}
    kinds = [base.get(a, getattr(a, "__name__", str(a))) for a in (args or (ann,)) if a is not type(None)]
    text = "|".join(kinds)
    if bounds:
        text += " " + ", ".join(bounds)
    return text


def _format_errors(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        name = ".".join(str(p) for p in item["loc"]) or "(options)"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown option {name!r}")
        else:
            field = LaunchOptions.model_fields.get(name)
            allowed = f" (allowed: {_allowed(field)})" if field is not None else ""
            lines.append(f"{name}={item.get('input')!r}: {item['msg']}{allowed}")
    return (
        "invalid sglite launch options: "
        + "; ".join(lines)
        + ". Valid sglite options: "
        + LaunchOptions.describe()
        + "."
    )


# Keys Xinference (4.1) itself may put into an engine's model_config, and what sglite does with each. Every one
# is consumed here; none reaches LaunchOptions, none is dropped without a decision.
XINFERENCE_KEYS: dict[str, str] = {
    "reasoning_content": "separate reasoning from content for reasoning families (xinference reasoning parser)",
    "enable_thinking": "default of chat_template_kwargs.enable_thinking for hybrid reasoning families",
    "trust_remote_code": "accepted and without effect: sglite never executes code shipped with a checkpoint",
    "enable_virtual_env": "handled by Xinference before the engine is created (popped there)",
    "n_worker": "must be 1: sglite runs one model per process",
    "shard": "must be 0: sglite does not shard a model across workers",
    "address": "the model subprocess address (multi-worker launches only); unused",
    "driver_info": "multi-worker launches only; unused",
}
# Xinference options that would change results if silently ignored: sglite refuses them with this reason.
UNSUPPORTED_XINFERENCE_KEYS: dict[str, str] = {
    "quantization_config": "sglite serves unquantized pytorch/safetensors weights; remove --quantization-config",
    "draft_model_path": "speculative decoding is not supported by sglite",
    "num_speculative_tokens": "speculative decoding is not supported by sglite",
    "multimodal_projector": "sglite serves text-only models",
    "limit_mm_per_prompt": "sglite serves text-only models",
    "_xavier_cache_config": "Xavier KV sharing is not supported by sglite",
    "_nixl_config": "prefill/decode disaggregation is not supported by sglite",
}


def split_model_config(model_config: dict[str, Any] | None) -> tuple[LaunchOptions, dict[str, Any]]:
    """Split Xinference's model_config into sglite's :class:`LaunchOptions` and Xinference's own keys.

    Returns ``(options, xinference_keys)``. Raises :class:`LaunchOptionsError` for unknown keys, bad values
    and Xinference options sglite cannot honour.
    """
    config = dict(model_config or {})
    xinference_keys = {k: config.pop(k) for k in list(config) if k in XINFERENCE_KEYS}
    problems = []
    for key, reason in UNSUPPORTED_XINFERENCE_KEYS.items():
        if key in config and not _is_unset(config[key]):
            problems.append(f"{key}: {reason}")
        config.pop(key, None)
    n_worker = xinference_keys.get("n_worker")
    if not _is_unset(n_worker) and str(n_worker) != "1":
        problems.append(f"n_worker={n_worker!r}: {XINFERENCE_KEYS['n_worker']}")
    if problems:
        raise LaunchOptionsError("invalid sglite launch options: " + "; ".join(problems))
    return LaunchOptions.parse(config), xinference_keys


def to_engine_config(options: LaunchOptions, model_path: str) -> Any:
    """The runtime ``EngineConfig`` for ``options``. The only place launch options become engine settings."""
    from xinf_sglang.runtime import EngineConfig  # lazy: importing the runtime imports torch

    fields = options.model_dump()
    return EngineConfig(model_path=model_path, **fields)
