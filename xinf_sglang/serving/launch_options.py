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

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model, field_validator, model_validator

from xinf_sglang.runtime.config import (
    EngineConfig, check_metrics_options, check_priority_options, describe_options, format_validation_error,
)

from .option_aliases import resolve_aliases

logger = logging.getLogger(__name__)

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


# EngineConfig fields that are not launch options: Xinference supplies the model path, and a served model always
# has a tokenizer.
ENGINE_ONLY_FIELDS = frozenset({"model_path", "tokenizer_path", "skip_tokenizer_init"})


class _LaunchOptionsBase(BaseModel):
    """Every option of the sglite engine. ``None`` means "derived from the model and the device".

    The fields are the runtime's ``EngineConfig`` fields (minus ``ENGINE_ONLY_FIELDS``), generated below, so a
    runtime knob is a launch option as soon as it exists; this class adds what the web UI's strings need.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_unset(cls, data: Any) -> Any:
        """``None`` / ``"None"`` / ``""`` mean "use the default" for every option."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if not _is_unset(v)}

    @model_validator(mode="after")
    def _cross_option_checks(self) -> Any:
        check_priority_options(self)  # the runtime's own checks, here so that a launch fails before loading
        check_metrics_options(self)
        return self

    @field_validator("schedule_policy", "device", "load_format", "attention_backend", "overlap_schedule",
                     mode="before", check_fields=False)
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("dtype", mode="before", check_fields=False)
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
        return describe_options(cls)


LaunchOptions = create_model(
    "LaunchOptions",
    __base__=_LaunchOptionsBase,
    __module__=__name__,
    **{name: (f.annotation, f) for name, f in EngineConfig.model_fields.items() if name not in ENGINE_ONLY_FIELDS},
)


def _is_unset(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v.strip().lower() in _UNSET_STRINGS)


def _format_errors(err: ValidationError) -> str:
    return format_validation_error(err, LaunchOptions, "sglite launch options")


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

    Hyphenated keys and the vLLM / SGLang names of sglite's options are renamed first (`option_aliases`; what
    was renamed is logged). Returns ``(options, xinference_keys)``. Raises :class:`LaunchOptionsError` for
    unknown keys (with a "did you mean"), bad values and options sglite cannot honour.
    """
    known = set(LaunchOptions.model_fields) | set(XINFERENCE_KEYS) | set(UNSUPPORTED_XINFERENCE_KEYS)
    resolved = resolve_aliases(dict(model_config or {}), known)
    for note in resolved.notes:
        logger.info("sglite launch option %s", note)
    config = resolved.config
    xinference_keys = {k: config.pop(k) for k in list(config) if k in XINFERENCE_KEYS}
    problems = list(resolved.problems)
    for key, reason in UNSUPPORTED_XINFERENCE_KEYS.items():
        if key in config and not _is_unset(config[key]):
            problems.append(f"{key}: {reason}")
        config.pop(key, None)
    n_worker = xinference_keys.get("n_worker")
    if not _is_unset(n_worker) and str(n_worker) != "1":
        problems.append(f"n_worker={n_worker!r}: {XINFERENCE_KEYS['n_worker']}")
    if problems:
        raise LaunchOptionsError(
            "invalid sglite launch options: " + "; ".join(problems) + f". Valid options: {LaunchOptions.describe()}."
        )
    return LaunchOptions.parse(config), xinference_keys


def to_engine_config(options: _LaunchOptionsBase, model_path: str) -> EngineConfig:
    """The runtime ``EngineConfig`` for ``options``. The only place launch options become engine settings."""
    return EngineConfig(model_path=model_path, **options.model_dump())
