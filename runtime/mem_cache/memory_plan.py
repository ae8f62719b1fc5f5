"""How many KV tokens, request rows and prefill tokens the engine can afford, and the startup report.

The pool formula follows SGLang's model runner:
``rest = free_after_weights - free_before_weights * (1 - mem_fraction_static)`` and
``pool_tokens = (rest - other reserved memory) // kv_bytes_per_token``. On a GPU "free" is the device's measured
free memory; on CPU it is the system's available memory. ``max_total_tokens`` only caps the pool, never grows it.

On the CPU the pool is also bounded by what the engine can use, ``max_running_requests x context_length``, and,
unless ``mem_fraction_static`` or ``max_total_tokens`` is given, by `DEFAULT_CPU_KV_POOL_BYTES` (at least one full
context): the fraction of a machine's memory is not what a small model needs (SmolLM2-135M took 5.3 GiB of a 23 GiB
machine's memory for a pool its workloads never filled, issue 33). A given ``mem_fraction_static`` sizes the pool
as on a GPU (what SGLang users expect: raising it grows the pool); a given ``max_total_tokens`` is the pool, up to
what the fraction allows (vLLM's CPU backend likewise takes an explicit ``VLLM_CPU_KVCACHE_SPACE``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import ConfigError

GiB = 1024**3

# Defaults that depend on the device (GPU, CPU).
DEFAULT_MEM_FRACTION = {"cuda": 0.85, "cpu": 0.25}
# A GPU whose 10% is at least this much gets mem_fraction_static 0.9 by default (an 80 GB card, not a 40 or 48 GB
# one). The plan already subtracts the prefill activations, the logits and GPU_FIXED_RESERVE from the pool, so
# what the fraction leaves outside only covers allocator slack and other users of the card: 6 GiB is what the
# 0.85 default leaves on a 40 GB card. On an 80 GB card the extra ~4 GB of KV pool holds ~10% more concurrent
# requests, and each decode step reads the weights once for more tokens (docs/PERFORMANCE.md, workload (c)).
LARGE_GPU_MEM_FRACTION = 0.9
LARGE_GPU_HEADROOM = 6 * GiB
DEFAULT_CHUNKED_PREFILL = {"cuda": 8192, "cpu": 1024}
DEFAULT_MAX_PREFILL = {"cuda": 16384, "cpu": 4096}
DEFAULT_MAX_RUNNING = {"cuda": 512, "cpu": 256}
# The CPU pool when neither mem_fraction_static nor max_total_tokens is given: 1 GiB holds ~23k tokens of
# SmolLM2-135M in float32 (64 concurrent requests of 360 tokens), ~9k of a 7B model (Qwen2.5-7B: 112 KiB/token);
# vLLM's CPU backend reserves 4 GiB by default on machines meant for serving. Always at least one full context.
DEFAULT_CPU_KV_POOL_BYTES = 1 * GiB
# Prompt positions one step scores (echo + logprobs): each is a [vocab] row of logits and of log-softmax, ~1.5 MB at
# a 152k vocabulary, so a long scored prompt is scored over several steps instead of in one [prompt x vocab] block.
DEFAULT_SCORED_PROMPT_TOKENS = {"cuda": 512, "cpu": 256}
# Headroom on a GPU beyond what we account for explicitly: CUDA graph pools, cuBLAS workspaces, allocator slack.
GPU_FIXED_RESERVE = 1 * GiB
# Advice never suggests a fraction above this: the rest is the CUDA context's and other processes' memory.
MAX_SENSIBLE_FRACTION = 0.95


@dataclass(frozen=True)
class MemoryInputs:
    device: str  # "cuda" | "cpu"
    free_before_weights: int  # bytes free before the weights were loaded
    free_after_weights: int  # bytes free after
    weights_bytes: int
    kv_bytes_per_token: int
    model_context_length: int  # from the model config
    hidden_size: int
    ffn_bytes_per_token: int  # feed-forward temporaries of one prefill token (gate/up outputs; MoE workspace)
    vocab_size: int
    dtype_bytes: int
    attention_bytes_per_token: int = 0  # attention temporaries beyond q/k/v (MLA: absorbed query, latent output)
    graph_batch: int = 0  # the largest decode batch captured in CUDA graphs (0: none); their pool holds its activations


@dataclass(frozen=True)
class Workspace:
    """What a step needs beyond the weights, the KV pool and the request table (seed 002: SGLang on DeepSeek-V3 ran
    out of memory in its first steps until ``mem_fraction_static`` was lowered, because kernel workspaces were not
    reserved). Every part is subtracted from the pool's budget."""

    prefill: int  # the largest prefill chunk's hidden states, attention and feed-forward temporaries
    logits: int  # a full batch's logits rows, and the scored prompt positions' logits + log-softmax
    graphs: int  # the CUDA graphs' private pool: the activations of the largest captured batch
    fixed: int  # GPU: cuBLAS workspaces, allocator slack (GPU_FIXED_RESERVE)

    @property
    def total(self) -> int:
        return self.prefill + self.logits + self.graphs + self.fixed

    @property
    def transient(self) -> int:
        """What the steps allocate and free again (must be free on the device once everything else is built)."""
        return self.prefill + self.logits

    def describe(self) -> str:
        return (f"activations reserve {self.total / GiB:.2f} GiB (prefill chunk {self.prefill / GiB:.2f}, logits "
                f"{self.logits / GiB:.2f}, CUDA graphs {self.graphs / GiB:.2f}, fixed {self.fixed / GiB:.2f})")


@dataclass(frozen=True)
class MemoryPlan:
    """The sizes the engine allocates, and why (``report`` says it in words)."""

    pool_tokens: int
    profiled_tokens: int  # what memory alone would allow
    capped_by_max_total_tokens: bool
    pool_bound: str  # what sized the pool, in words (the startup log says it)
    context_length: int
    max_running_requests: int  # rows of the request->token table
    chunked_prefill_size: int
    max_prefill_tokens: int
    max_scored_prompt_tokens: int  # prompt positions whose logprobs one step computes (their logits are reserved)
    mem_fraction_static: float
    mem_fraction_is_default: bool  # chosen by default_mem_fraction, not given
    weights_bytes: int
    kv_bytes_per_token: int
    req_table_bytes: int
    workspace: Workspace
    free_before_weights: int  # the memory the fraction applies to (the advice below scales with it)

    @property
    def activation_reserve_bytes(self) -> int:
        return self.workspace.total

    @property
    def kv_pool_bytes(self) -> int:
        return self.pool_tokens * self.kv_bytes_per_token

    def lower_fraction_advice(self, shortfall: int) -> str:
        """What to relaunch with when ``shortfall`` more bytes were needed outside the static part: the fraction
        that leaves them (a hundredth of margin), else the knobs that shrink the workspace."""
        fits = math.floor((self.mem_fraction_static - shortfall / self.free_before_weights) * 100 - 1) / 100
        shrink = (f"chunked_prefill_size (now {self.chunked_prefill_size}) or max_running_requests (now "
                  f"{self.max_running_requests})")
        if fits < 0.3:
            return f"lower {shrink}, or free memory on the device"
        return (f"lower mem_fraction_static from {self.mem_fraction_static} to {fits} (frees "
                f"{(self.mem_fraction_static - fits) * self.free_before_weights / GiB:.2f} GiB; the KV pool shrinks "
                f"by as much), or lower {shrink}")

    def report(self) -> list[str]:
        """Lines for the startup log."""
        lines = [
            f"weights: {self.weights_bytes / GiB:.2f} GiB",
            f"KV pool: {self.pool_tokens} tokens, {self.kv_pool_bytes / GiB:.2f} GiB "
            f"({self.kv_bytes_per_token} bytes/token, mem_fraction_static={self.mem_fraction_static}"
            f"{' (default for this device)' if self.mem_fraction_is_default else ''}; sized by {self.pool_bound})",
            f"request table: {self.max_running_requests} rows x {self.context_length} tokens "
            f"({self.req_table_bytes / GiB:.3f} GiB); {self.workspace.describe()}",
            f"max running requests: {self.max_running_requests}; prefill chunk: {self.chunked_prefill_size} tokens; "
            f"max prefill tokens per batch: {self.max_prefill_tokens}; context length: {self.context_length}",
            f"prompt logprobs: at most {self.max_scored_prompt_tokens} prompt tokens scored per step "
            "(a longer scored prompt takes several steps)",
        ]
        full_ctx = max(1, self.pool_tokens // self.context_length)
        lines.append(
            f"concurrency the pool holds: {full_ctx} request(s) at full context, "
            f"~{self.pool_tokens // 1024} at 1024 tokens each"
        )
        if self.capped_by_max_total_tokens:
            lines.append(
                f"WARNING: max_total_tokens={self.pool_tokens} caps the KV pool (memory allows "
                f"{self.profiled_tokens} tokens): that limits concurrency to about {self.pool_tokens // 1024} "
                f"requests of 1024 tokens; raise or unset max_total_tokens for more"
            )
        return lines


def default_mem_fraction(device: str, free_before_weights: int) -> float:
    """``mem_fraction_static`` when none is given: 0.25 on CPU, 0.85 on a GPU, 0.9 on a GPU where 10% of the free
    memory is at least ``LARGE_GPU_HEADROOM``."""
    if device == "cuda" and free_before_weights * (1 - LARGE_GPU_MEM_FRACTION) >= LARGE_GPU_HEADROOM:
        return LARGE_GPU_MEM_FRACTION
    return DEFAULT_MEM_FRACTION[device]


def plan_memory(
    inputs: MemoryInputs,
    mem_fraction_static: float | None = None,
    max_total_tokens: int | None = None,
    context_length: int | None = None,
    max_running_requests: int | None = None,
    chunked_prefill_size: int | None = None,
    max_prefill_tokens: int | None = None,
    max_scored_prompt_tokens: int | None = None,
) -> MemoryPlan:
    """Size the pool from the measured memory; raise ``ConfigError`` naming the knob when nothing fits."""
    dev = inputs.device
    frac = mem_fraction_static if mem_fraction_static is not None else default_mem_fraction(dev, inputs.free_before_weights)
    ctx = context_length or inputs.model_context_length
    rows = max_running_requests or DEFAULT_MAX_RUNNING[dev]
    chunk = chunked_prefill_size or DEFAULT_CHUNKED_PREFILL[dev]
    max_prefill = max(max_prefill_tokens or DEFAULT_MAX_PREFILL[dev], min(chunk, ctx))
    chunk = min(chunk, max_prefill)
    scored = min(max_scored_prompt_tokens or DEFAULT_SCORED_PROMPT_TOKENS[dev], max_prefill)
    req_table = rows * (ctx + 1) * 4
    workspace = _workspace(inputs, chunk, rows, scored)
    profiled = _profiled_tokens(inputs, frac, req_table + workspace.total, f"{rows} rows x context {ctx}")
    profiled, bound = _pool_bound(inputs, profiled, frac, rows, ctx,
                                  sized_by_user=mem_fraction_static is not None or max_total_tokens is not None)
    capped = max_total_tokens is not None and max_total_tokens < profiled
    return MemoryPlan(
        pool_tokens=max_total_tokens if capped else profiled,
        profiled_tokens=profiled,
        capped_by_max_total_tokens=capped,
        pool_bound=f"max_total_tokens={max_total_tokens}" if capped else bound,
        context_length=ctx,
        max_running_requests=rows,
        chunked_prefill_size=chunk,
        max_prefill_tokens=max_prefill,
        max_scored_prompt_tokens=scored,
        mem_fraction_static=frac,
        mem_fraction_is_default=mem_fraction_static is None,
        weights_bytes=inputs.weights_bytes,
        kv_bytes_per_token=inputs.kv_bytes_per_token,
        req_table_bytes=req_table,
        workspace=workspace,
        free_before_weights=inputs.free_before_weights,
    )


def _pool_bound(inputs: MemoryInputs, profiled: int, frac: float, rows: int, ctx: int,
                sized_by_user: bool) -> tuple[int, str]:
    """The pool before ``max_total_tokens`` and what bounds it: the fraction's memory; on the CPU also every row at
    full context (system memory is shared with everything else on the machine: a pool larger than that is never
    used) and, unless the user sized the pool, `DEFAULT_CPU_KV_POOL_BYTES`."""
    bounds = [(profiled, f"mem_fraction_static={frac} of {inputs.free_before_weights / GiB:.1f} GiB "
                         f"{'available' if inputs.device == 'cpu' else 'free'}")]
    if inputs.device == "cpu":
        bounds.append((rows * ctx, f"max_running_requests x context_length = {rows} x {ctx}"))
        if not sized_by_user:
            default = max(ctx, DEFAULT_CPU_KV_POOL_BYTES // inputs.kv_bytes_per_token)
            bounds.append((default, f"the CPU default of {DEFAULT_CPU_KV_POOL_BYTES / GiB:.0f} GiB (at least one "
                                    "context; set max_total_tokens or mem_fraction_static for another size)"))
    return min(bounds, key=lambda b: b[0])


def _workspace(inputs: MemoryInputs, chunk: int, rows: int, scored: int) -> Workspace:
    """Per prefill token: its hidden states and a few more, the attention temporaries (MLA's absorbed query and
    latent output) and the feed-forward ones (a dense layer's gate/up output or the fused experts' workspace,
    whichever is larger). Logits: a full batch's rows, and the scored prompt positions' LM-head output in the model
    dtype, its float32 copy and their log-softmax. CUDA graphs: the largest captured batch's activations."""
    per_token = 6 * inputs.hidden_size * inputs.dtype_bytes + inputs.attention_bytes_per_token + inputs.ffn_bytes_per_token
    scoring = scored * inputs.vocab_size * (4 + 4 + inputs.dtype_bytes)
    gpu = inputs.device == "cuda"
    return Workspace(
        prefill=chunk * per_token,
        logits=rows * inputs.vocab_size * 4 * 2 + scoring,
        graphs=min(inputs.graph_batch, rows) * per_token if gpu else 0,
        fixed=GPU_FIXED_RESERVE if gpu else 0,
    )


def _profiled_tokens(inputs: MemoryInputs, frac: float, reserved: int, table: str) -> int:
    """KV tokens that fit in what ``frac`` leaves after the weights and ``reserved`` bytes (request table ``table``
    and activations); ``ConfigError`` naming the knob, and the fraction that would fit, when they do not."""
    dev, free = inputs.device, inputs.free_before_weights
    rest = inputs.free_after_weights - free * (1 - frac)
    # The least fraction that leaves the reserve and a 16-token pool: rest - reserved >= 16 * kv.
    needed = 1 - (inputs.free_after_weights - reserved - 16 * inputs.kv_bytes_per_token) / free
    raise_to = (f"raise mem_fraction_static from {frac} to at least {math.ceil(needed * 100) / 100}"
                if needed <= MAX_SENSIBLE_FRACTION else f"no mem_fraction_static up to {MAX_SENSIBLE_FRACTION} fits")
    if rest <= 0:
        raise ConfigError(
            f"the weights ({inputs.weights_bytes / GiB:.2f} GiB) do not fit in mem_fraction_static={frac} of "
            f"{free / GiB:.2f} GiB free {dev} memory; {raise_to}, use a smaller dtype, or free memory"
        )
    budget = rest - reserved
    profiled = int(budget // inputs.kv_bytes_per_token) if budget > 0 else 0
    if profiled < 16:
        raise ConfigError(
            f"no room for a KV cache: {rest / GiB:.2f} GiB left under mem_fraction_static={frac} after the weights, "
            f"but the request table ({table}) and activations need {reserved / GiB:.2f} GiB; {raise_to}, or lower "
            f"context_length / max_running_requests / chunked_prefill_size"
        )
    return profiled


def check_headroom(plan: MemoryPlan, free_now: int, device: str) -> None:
    """After the pool, the request table and the CUDA graphs are built: the steps' transient workspace must still
    be free on the device (something the plan did not see, another process or a larger graph pool, may have taken
    it). ``ConfigError`` saying what to lower, and to what, when it is not: at launch, not at the first long
    prompt."""
    need = plan.workspace.transient
    if free_now < need:
        raise ConfigError(
            f"after the weights, the KV pool and the CUDA graphs only {free_now / GiB:.2f} GiB are free on {device}, "
            f"but a step needs up to {need / GiB:.2f} GiB (a {plan.chunked_prefill_size}-token prefill chunk and "
            f"the logits); {plan.lower_fraction_advice(need - free_now)}"
        )


_TRIED = re.compile(r"Tried to allocate (\d+(?:\.\d+)?) (GiB|MiB|KiB|B)\b")
_UNITS = {"GiB": GiB, "MiB": 1024**2, "KiB": 1024, "B": 1}


def out_of_memory_advice(error: BaseException, plan: MemoryPlan | None) -> str:
    """For a step that ran out of device memory (torch's ``OutOfMemoryError``, whose message says how much it
    "Tried to allocate"): a clause saying what to relaunch with; "" for other errors or without a plan."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if plan is None or not ("OutOfMemoryError" in names or "out of memory" in str(error)):
        return ""
    tried = _TRIED.search(str(error))
    shortfall = int(float(tried[1]) * _UNITS[tried[2]]) if tried else plan.workspace.transient // 4
    return f"; the memory plan left too little for this step: {plan.lower_fraction_advice(shortfall)}"
