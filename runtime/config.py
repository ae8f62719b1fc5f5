"""``EngineConfig``: every knob of the engine, validated at construction (unknown keys are an error)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError


class EngineConfig(BaseModel):
    """Configuration of one ``Engine``. ``None`` means "derive from the model and the device" (see memory_plan)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str
    tokenizer_path: str | None = None  # defaults to model_path
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    load_format: Literal["auto", "dummy"] = "auto"
    seed: int = 0
    skip_tokenizer_init: bool = False  # token ids in and out only (no text, no stop strings); for config-only models
    # memory
    mem_fraction_static: float | None = Field(default=None, gt=0.0, lt=1.0)
    max_total_tokens: int | None = Field(default=None, ge=16)
    context_length: int | None = Field(default=None, ge=16)
    # scheduling
    max_running_requests: int | None = Field(default=None, ge=1)
    max_prefill_tokens: int | None = Field(default=None, ge=16)
    chunked_prefill_size: int | None = Field(default=None, ge=16)
    schedule_policy: Literal["fcfs", "lpm"] = "fcfs"
    disable_radix_cache: bool = False
    # GPU fast path
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    disable_cuda_graph: bool = False
    # Launch decode step t+1 before processing step t's tokens (auto: on with CUDA, where the device runs
    # asynchronously; on the CPU the same thread does both, so there is nothing to overlap).
    overlap_schedule: Literal["auto", "on", "off"] = "auto"
    cuda_graph_max_bs: int | None = Field(default=None, ge=1)
    # checks
    debug_invariants: bool = False  # check the idle invariant every time the scheduler goes idle

    @field_validator("model_path")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("model_path must name a checkpoint folder")
        return v

    @classmethod
    def build(cls, **kwargs) -> "EngineConfig":
        """Like the constructor, but raises ``ConfigError`` with one readable line per problem."""
        try:
            return cls(**kwargs)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, cls)) from None


def format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem: the field, what was given, what is allowed; unknown keys list the valid ones."""
    lines = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(config)"
        if item["type"] == "extra_forbidden":
            valid = ", ".join(sorted(model.model_fields))
            lines.append(f"unknown option {field!r}; valid options: {valid}")
        else:
            lines.append(f"{field}={item.get('input')!r}: {item['msg']}")
    return "invalid engine configuration: " + "; ".join(lines)
