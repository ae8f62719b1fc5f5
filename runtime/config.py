"""``EngineConfig``: every knob of the engine, validated at construction (unknown keys are an error)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .constrained.spec import DEFAULT_LIMITS, GrammarLimits
from .errors import ConfigError

# Options that only mean something under schedule_policy="priority": changing one under another policy is an error
# (it would have no effect, and nothing a user sets is silently ignored).
PRIORITY_OPTIONS = frozenset(
    {"schedule_low_priority_values_first", "priority_scheduling_preemption_threshold", "disable_priority_preemption"}
)


class EngineConfig(BaseModel):
    """Configuration of one ``Engine``. ``None`` means "derive from the model and the device" (see memory_plan)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str = Field(
        description="Hugging Face checkpoint folder (config.json + safetensors), a .gguf file, or a folder holding one"
    )
    tokenizer_path: str | None = Field(None, description="tokenizer folder (default: model_path)")
    skip_tokenizer_init: bool = Field(False, description="token ids in and out only (no text, no stop strings)")
    # memory
    context_length: int | None = Field(None, ge=16, description="max prompt + output tokens per request")
    mem_fraction_static: float | None = Field(
        None, gt=0.0, lt=1.0, description="fraction of GPU (CPU: available) memory for weights + KV pool"
    )
    max_total_tokens: int | None = Field(None, ge=16, description="cap on the KV pool size, in tokens")
    # scheduling
    max_running_requests: int | None = Field(None, ge=1, description="max requests in the decode batch")
    max_prefill_tokens: int | None = Field(None, ge=16, description="token budget of one prefill batch")
    chunked_prefill_size: int | None = Field(None, ge=16, description="prefill chunk size for long prompts")
    max_scored_prompt_tokens: int | None = Field(
        None, ge=1, description="most prompt tokens one step scores for echo + logprobs (a longer scored prompt takes "
        "several steps); their logits rows are reserved in the memory plan (default 512 on GPU, 256 on CPU)",
    )
    schedule_policy: Literal["fcfs", "lpm", "priority"] = Field(
        "fcfs", description="fcfs, lpm (longest prefix match) or priority (by the requests' priority, then arrival)"
    )
    schedule_low_priority_values_first: bool = Field(
        False, description="priority policy: smaller priority values run first (default: larger first)"
    )
    priority_scheduling_preemption_threshold: int = Field(
        10, ge=0, description="priority policy: preempt running requests less urgent by more than this"
    )
    disable_priority_preemption: bool = Field(
        False, description="priority policy: never preempt running requests (only order the queue)"
    )
    disable_radix_cache: bool = Field(False, description="turn off prefix reuse")
    stream_interval: int = Field(
        1, ge=1, description="streaming: a sequence's first token at once, then a chunk every this many tokens, "
        "always at finish (a request's own stream_interval overrides it); a reader that lags gets the backlog as one "
        "chunk whatever the interval",
    )
    # model and device
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = cuda if available, else cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = the checkpoint's dtype on GPU, float32 on CPU"
    )
    load_format: Literal["auto", "dummy"] = Field("auto", description="dummy = random weights (benchmarks)")
    gguf_dequantize: bool = Field(
        False, description="GGUF files: dequantize every weight at load instead of keeping the linears and vocabulary "
        "tables in their blocks (kept at tp_size 1, on CUDA in any dtype and on the CPU in float32)",
    )
    seed: int = Field(0, description="seed of the engine's default random generator")
    tp_size: int | None = Field(
        None, ge=1, description="tensor-parallel ranks, one process and one GPU each (also tensor_parallel_size; "
        "default: every GPU this process sees, 1 on CPU; on CPU more than 1 runs gloo processes)",
    )
    tp_timeout_s: float = Field(
        60.0, gt=0, description="longest a tensor-parallel collective waits for another rank before the engine fails"
    )
    # GPU fast path
    attention_backend: Literal["auto", "torch", "triton", "cpu"] = Field(
        "auto", description="auto = triton on CUDA, cpu (a C++ kernel) on the CPU; torch = the reference anywhere"
    )
    disable_cuda_graph: bool = Field(False, description="run decode eagerly instead of as CUDA-graph replays")
    cuda_graph_max_bs: int | None = Field(None, ge=1, description="largest decode batch captured (default 256)")
    overlap_schedule: Literal["auto", "on", "off"] = Field(
        "auto",
        description="launch decode step t+1 before processing step t's tokens (auto: on with CUDA, where the "
        "device runs asynchronously; on the CPU one thread does both, so there is nothing to overlap)",
    )
    # structured output: compile bounds and per-request grammar limits (checked before any compile work)
    grammar_compile_timeout_s: float = Field(
        10.0, gt=0, description="longest a grammar may compile (counted from when its compile starts, not queued)"
    )
    grammar_compile_workers: int = Field(2, ge=1, description="grammars compiled at once (one process each)")
    grammar_max_queued_compiles: int = Field(
        64, ge=1, description="grammars that may wait for a compile worker; one more is refused as busy"
    )
    grammar_max_chars: int = Field(DEFAULT_LIMITS.max_grammar_chars, ge=1, description="longest constraint text")
    grammar_max_schema_bytes: int = Field(
        DEFAULT_LIMITS.max_schema_bytes, ge=1, description="largest JSON schema (UTF-8 bytes, compact)"
    )
    grammar_max_schema_properties: int = Field(
        DEFAULT_LIMITS.max_schema_properties, ge=1, description="most properties in one JSON schema (all levels)"
    )
    grammar_max_schema_depth: int = Field(
        DEFAULT_LIMITS.max_schema_depth, ge=1, le=120, description="deepest object/array nesting of a JSON schema"
    )
    grammar_max_choices: int = Field(DEFAULT_LIMITS.max_choices, ge=1, le=1900, description="most choices")
    grammar_max_regex_repetition: int = Field(
        DEFAULT_LIMITS.max_regex_repetition, ge=1,
        description="largest repetition count in a regex or schema pattern (product of nested {m,n} bounds)",
    )
    # observability
    stats_interval_s: float = Field(
        10.0, ge=0, description="log a stats line (running, queue, token usage, cache hit rate, gen throughput, "
        "queue time p50) every this many seconds while busy, none while idle; 0 = never",
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve Prometheus metrics at http://metrics_host:metrics_port/metrics "
        "(0 = any free port, the URL is logged; unset = no endpoint)",
    )
    metrics_host: str = Field(
        "127.0.0.1", min_length=1, description="address the metrics endpoint binds to (0.0.0.0 for every interface)"
    )
    # checks
    debug_invariants: bool = Field(False, description="check the KV idle invariant whenever the engine idles")

    @field_validator("model_path")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("model_path must name a checkpoint folder")
        return v

    @model_validator(mode="after")
    def _priority_options_need_priority_policy(self) -> "EngineConfig":
        check_priority_options(self)
        return self

    @model_validator(mode="after")
    def _metrics_host_needs_port(self) -> "EngineConfig":
        check_metrics_options(self)
        return self

    def __init__(self, **data: Any) -> None:
        """Validate every option; raise ``ConfigError`` naming each bad one and listing the valid options.
        ``tensor_parallel_size`` (vLLM's name) is accepted for ``tp_size``."""
        if "tensor_parallel_size" in data:
            if data.get("tp_size") is not None:
                raise ConfigError("give tp_size or tensor_parallel_size, not both (they are the same option)")
            data = dict(data)
            data["tp_size"] = data.pop("tensor_parallel_size")
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, type(self), "engine configuration")) from None

    def grammar_limits(self) -> GrammarLimits:
        """The per-request grammar limits these options set."""
        return GrammarLimits(
            max_grammar_chars=self.grammar_max_chars,
            max_schema_bytes=self.grammar_max_schema_bytes,
            max_schema_properties=self.grammar_max_schema_properties,
            max_schema_depth=self.grammar_max_schema_depth,
            max_choices=self.grammar_max_choices,
            max_regex_repetition=self.grammar_max_regex_repetition,
        )


def check_priority_options(options: BaseModel) -> None:
    """Raise ``ValueError`` when ``options`` (an ``EngineConfig`` or the launch options made from it) changes a
    priority-only option while ``schedule_policy`` is not ``priority``."""
    fields = type(options).model_fields
    given = sorted(name for name in PRIORITY_OPTIONS if getattr(options, name) != fields[name].default)
    if given and options.schedule_policy != "priority":
        verb = "is" if len(given) == 1 else "are"
        raise ValueError(
            f"{', '.join(given)} {verb} only used with schedule_policy='priority' (got {options.schedule_policy!r})"
        )


def check_metrics_options(options: BaseModel) -> None:
    """Raise ``ValueError`` when ``options`` sets ``metrics_host`` without ``metrics_port`` (it would do nothing)."""
    if options.metrics_port is None and options.metrics_host != type(options).model_fields["metrics_host"].default:
        raise ValueError(
            f"metrics_host={options.metrics_host!r} is only used with metrics_port (set metrics_port; 0 = any free port)"
        )


def describe_options(model: type[BaseModel]) -> str:
    """``name (allowed values)`` for every field of ``model``, for error messages."""
    return ", ".join(f"{name} ({allowed_values(field)})" for name, field in model.model_fields.items())


def allowed_values(field: Any) -> str:
    """What a field accepts, in words, read off its annotation and constraints (``number > 0.0, < 1.0``)."""
    ann = field.annotation
    args = getattr(ann, "__args__", ())
    if getattr(ann, "__origin__", None) is Literal:
        return "|".join(str(a) for a in args)
    bounds = [
        f"{sym} {getattr(m, attr)}"
        for m in field.metadata
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if getattr(m, attr, None) is not None
    ]
    base = {bool: "true|false", int: "integer", float: "number", str: "text"}
    kinds = "|".join(base.get(a, getattr(a, "__name__", str(a))) for a in (args or (ann,)) if a is not type(None))
    return kinds + (" " + ", ".join(bounds) if bounds else "")


def format_validation_error(err: ValidationError, model: type[BaseModel], subject: str) -> str:
    """``invalid <subject>: `` and one clause per problem (the field, what was given, what is allowed), then the
    list of valid options with what each accepts."""
    clauses = []
    for item in err.errors():
        if not item["loc"] and item["type"] == "value_error":  # a check across options: its message names them
            clauses.append(str(item["msg"]).removeprefix("Value error, "))
            continue
        name = ".".join(str(p) for p in item["loc"]) or "(options)"
        if item["type"] == "extra_forbidden":
            clauses.append(f"unknown option {name!r}")
            continue
        field = model.model_fields.get(name)
        allowed = f" (allowed: {allowed_values(field)})" if field is not None else ""
        clauses.append(f"{name}={item.get('input')!r}: {item['msg']}{allowed}")
    return f"invalid {subject}: " + "; ".join(clauses) + f". Valid options: {describe_options(model)}."
