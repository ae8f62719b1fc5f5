"""Engine startup: from an ``EngineConfig`` to a loaded model, a sized KV pool and a scheduler over them.

``build_runtime`` runs the steps in order: resolve device and dtype, open the checkpoint and the tokenizer, load
the weights, plan memory (``memory_plan.py``: the pool size follows from what the weights left free), build the
KV pool, allocator, request->token table, attention backend and model runner (with CUDA graphs on CUDA), and
the scheduler with its prefix cache. The same function serves the engine's scheduler thread and a scheduler
process (``scheduler_process.py``), so both run exactly the same scheduler.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from xinf_sglang.kernels.pdl import pdl_supported

from ..mem_cache.allocator import ReqToTokenPool, TokenAllocator
from ..layers.attention.backend import AttentionBackend, TorchAttentionBackend
from ..config import EngineConfig
from ..constrained import GrammarBackend, LLGuidanceBackend
from ..model_executor.cuda_graph import CudaGraphRunner
from ..errors import ConfigError
from ..tp.distributed import TPInfo
from ..layers.moe.sparse_block import parameter_counts, workspace_bytes_per_token
from ..mem_cache.kv_pool import KVPool, kv_bytes_per_token, make_kv_pool
from ..mem_cache.memory_plan import MemoryInputs, MemoryPlan, check_headroom, plan_memory
from ..model_executor.model_runner import ModelRunner
from ..model_loader.checkpoint import Checkpoint, open_checkpoint
from ..model_loader.gguf_quant import keeps_blocks
from ..model_loader.model_config import ModelConfig
from ..models.decoder import DecoderLM
from ..model_loader.loader import load_model
from ..scheduler.output_processor import OutputProcessor
from ..mem_cache.prefix_cache import NoPrefixCache
from ..mem_cache.radix_cache import RadixCache
from ..sampling.sampler import Sampler
from ..scheduler.limits import SchedulerLimits
from ..scheduler.scheduler import Scheduler
from ..tp.launcher import TPLauncher
from ..tp.leader import LeaderGraphs, LeaderModel
from ..tp.options import check_tp_size, resolve_tp_size

logger = logging.getLogger("xinf_sglang.runtime")

__all__ = ["RankMemory", "Runtime", "Shard", "build_runtime", "build_shard", "make_grammar_backend", "resolve_device"]

DEFAULT_GRAPH_MAX_BS = 256  # the largest decode batch captured in CUDA graphs unless cuda_graph_max_bs says
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RankMemory:
    """What one tensor-parallel rank holds (the startup report and ``sglite bench`` print one per rank)."""

    rank: int
    weights_bytes: int
    kv_pool_bytes: int
    peak_rss_bytes: int  # peak host memory of the rank's process once its weights were loaded

    def describe(self) -> str:
        return (f"rank {self.rank}: weights {self.weights_bytes / 2**20:.1f} MiB, KV pool "
                f"{self.kv_pool_bytes / 2**20:.1f} MiB, peak host RSS at load {self.peak_rss_bytes / 2**20:.0f} MiB")


@dataclass
class Shard:
    """What every tensor-parallel rank builds alike: its part of the model and of the KV heads, the request->token
    table and the attention backend over them (rank 0 adds the runner and the scheduler). Not the checkpoint: a
    GGUF reader holds its parsed metadata and file mapping (~0.2 GiB for SmolLM2-135M), which serving never reads."""

    device: torch.device
    dtype: torch.dtype
    model: DecoderLM
    kv_pool: KVPool
    req_pool: ReqToTokenPool
    attn: AttentionBackend
    plan: MemoryPlan
    ranks: tuple[RankMemory, ...]  # every rank's, in rank order (all ranks agree on them at startup)

    @property
    def req_to_token(self) -> torch.Tensor:
        return self.req_pool.table


@dataclass
class Runtime:
    """What startup built for one model (not the checkpoint: see `Shard`)."""

    model_config: ModelConfig
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any  # None with skip_tokenizer_init
    eos_token_ids: frozenset[int]
    memory_plan: MemoryPlan
    runner: ModelRunner
    scheduler: Scheduler
    tp: TPLauncher | None = None  # the other ranks' processes, when tp_size > 1 (stop them with close())
    ranks: tuple[RankMemory, ...] = ()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing at tp_size 1)."""
        if self.tp is not None:
            self.tp.stop()


def build_runtime(config: EngineConfig, grammar_backend: Callable[[], GrammarBackend]) -> Runtime:
    """Load the model of ``config`` and build its pool, runner and scheduler; log the startup summary. With
    ``tp_size > 1`` this process is rank 0 and the other ranks are started first (`runtime.tp`).

    ``grammar_backend``: the one the scheduler side makes its requests' grammar matchers with (called at the
    first constrained request); the sampler fills their masks with it.

    Raises:
        ConfigError: an option cannot work on this machine or with this model (the message names the knob).
    """
    device = resolve_device(config.device)
    checkpoint = _open_checkpoint(config, device)
    mc = checkpoint.model_config
    size = resolve_tp_size(config, device)
    check_tp_size(mc, size)
    tokenizer = None if config.skip_tokenizer_init else _load_tokenizer(config, checkpoint)
    launcher = TPLauncher(config, size, device) if size > 1 else None
    try:
        shard = build_shard(config, launcher.group if launcher else TPInfo(), checkpoint)
        model = shard.model if launcher is None else LeaderModel(shard.model, launcher, shard.req_to_token)
        sampler = Sampler(mc.vocab_size, device, grammar_backend)
        runner = ModelRunner(model, shard.kv_pool, shard.attn, shard.req_to_token, device, sampler)
        graphs = decode_graphs(config, shard)
        if graphs is not None:
            runner.graphs = graphs if launcher is None else LeaderGraphs(graphs, model)
        if device.type == "cuda":  # rank 0's device; the other ranks built the same plan and graphs
            check_headroom(shard.plan, _step_headroom(shard.device), str(shard.device))
        limits = scheduler_limits(config, shard.plan, device)
        allocator = TokenAllocator(shard.plan.pool_tokens, device)
        prefix_cache = NoPrefixCache(allocator) if config.disable_radix_cache else RadixCache(allocator)
        scheduler = Scheduler(limits, runner, allocator, shard.req_pool, prefix_cache, OutputProcessor())
    except BaseException:
        if launcher is not None:
            launcher.stop(graceful=False)
        raise
    _log_startup(config, mc, shard, runner, limits, size)
    eos = _eos_ids(checkpoint, tokenizer)
    return Runtime(mc, device, shard.dtype, tokenizer, eos, shard.plan, runner, scheduler, launcher,
                   shard.ranks)


def build_shard(config: EngineConfig, tp: TPInfo, checkpoint: Checkpoint | None = None) -> Shard:
    """Rank ``tp``'s shard of the model of ``config`` (reading only its slices of the weights), its KV pool and
    attention backend. The ranks of a group agree on the memory plan: it is sized from the least free memory."""
    device = resolve_device(config.device, tp.rank)
    checkpoint = checkpoint or _open_checkpoint(config, device)
    mc = checkpoint.model_config
    dtype = _resolve_dtype(config.dtype, device, mc)
    torch.manual_seed(config.seed)
    free_before = _free_memory(device)
    model = load_model(checkpoint, dtype, device, config.load_format, seed=config.seed, tp=tp)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak_rss = _peak_rss()
    if config.load_format != "dummy" and tp.rank == 0:
        logger.info("sglite weights: %s", checkpoint.describe(dtype, weights_bytes))
    plan = _plan_memory(config, mc, device, dtype, free_before, weights_bytes, tp)
    kv_pool = make_kv_pool(mc, tp, plan.pool_tokens, dtype, device)
    req_pool = ReqToTokenPool(plan.max_running_requests, plan.context_length, device)
    attn = _make_attention_backend(config.attention_backend, kv_pool, req_pool.table, mc, device, tp)
    mine = f"{weights_bytes},{plan.kv_pool_bytes},{peak_rss}"
    ranks = tuple(RankMemory(r, *map(int, v.split(","))) for r, v in enumerate(tp.exchange("report", mine)))
    return Shard(device, dtype, model, kv_pool, req_pool, attn, plan, ranks)


def _open_checkpoint(config: EngineConfig, device: torch.device) -> Checkpoint:
    """The model's checkpoint; a GGUF's linears and vocabulary tables keep their blocks where a kernel reads them
    (`gguf_quant.keeps_blocks`: CUDA in any dtype, the CPU in float32, tp_size 1, not ``gguf_dequantize``)."""
    keep = keeps_blocks(device.type, config.dtype, config.gguf_dequantize, config.tp_size or 1)
    return open_checkpoint(config.model_path, keep_gguf_quantized=keep)


def _log_startup(
    config: EngineConfig, mc: ModelConfig, shard: Shard, runner: ModelRunner, limits: SchedulerLimits, size: int
) -> None:
    logger.info(
        "sglite engine: %s (%s) on %s, %s, tp_size=%d, attention=%s, cuda graphs=%s, overlap schedule=%s, "
        "programmatic dependent launch=%s",
        mc.architecture, config.model_path, shard.device, str(shard.dtype).removeprefix("torch."), size,
        type(shard.attn).__name__, runner.graphs is not None, limits.overlap, pdl_supported(shard.device),
    )
    total, active = parameter_counts(shard.model)
    if total != active:
        logger.info("sglite parameters%s: %.3gB total, %.3gB active per token (%d of %d experts per sparse layer)",
                    " (this rank's shard)" if size > 1 else "", total / 1e9, active / 1e9, mc.moe.top_k,
                    mc.moe.num_experts)
    for line in shard.plan.report():
        logger.info("memory plan: %s", line)
    if size > 1:
        for rank in shard.ranks:
            logger.info("memory plan: %s", rank.describe())


def scheduler_limits(config: EngineConfig, plan: MemoryPlan, device: torch.device) -> SchedulerLimits:
    """The scheduler's limits: the budgets of the memory plan and the policy options of ``config``."""
    preempt = config.schedule_policy == "priority" and not config.disable_priority_preemption
    return SchedulerLimits(
        max_running_requests=plan.max_running_requests,
        max_prefill_tokens=plan.max_prefill_tokens,
        chunked_prefill_size=plan.chunked_prefill_size,
        schedule_policy=config.schedule_policy,
        overlap=config.overlap_schedule == "on" or (config.overlap_schedule == "auto" and device.type == "cuda"),
        low_priority_values_first=config.schedule_low_priority_values_first,
        preemption_threshold=config.priority_scheduling_preemption_threshold if preempt else None,
        max_scored_prompt_tokens=plan.max_scored_prompt_tokens,
        memory_plan=plan,
    )


def make_grammar_backend(
    config: EngineConfig, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]
) -> GrammarBackend:
    """The grammar backend of an engine (building llguidance's token table takes ~0.5 s on big vocabularies)."""
    return LLGuidanceBackend(
        tokenizer,
        vocab_size,
        compile_timeout_s=config.grammar_compile_timeout_s,
        max_workers=config.grammar_compile_workers,
        max_queued_compiles=config.grammar_max_queued_compiles,
        eos_token_ids=sorted(eos_token_ids),
    )


def _attention_bytes_per_token(mc: ModelConfig, dtype: torch.dtype, tp: TPInfo) -> int:
    """Attention temporaries of one prefill token beyond q/k/v: MLA's absorbed workspace on this rank's heads."""
    if mc.mla is None:
        return 0
    return mc.mla.workspace_per_head * (mc.num_heads // tp.size) * torch.empty((), dtype=dtype).element_size()


def _graph_batch(config: EngineConfig, device: torch.device) -> int:
    """The largest decode batch `decode_graphs` captures (0 where it captures none)."""
    if device.type != "cuda" or config.disable_cuda_graph:
        return 0
    return config.cuda_graph_max_bs or DEFAULT_GRAPH_MAX_BS


def _ffn_bytes_per_token(mc: ModelConfig, dtype: torch.dtype, tp: TPInfo) -> int:
    """Feed-forward temporaries of one prefill token: a dense layer's gate/up output, or a sparse layer's experts
    workspace, whichever is larger."""
    dense = 3 * mc.intermediate_size * torch.empty((), dtype=dtype).element_size()
    if mc.moe is None:
        return dense
    return max(dense, workspace_bytes_per_token(mc.moe, mc.hidden_size, dtype, tp))


def _plan_memory(
    config: EngineConfig, mc: ModelConfig, device: torch.device, dtype: torch.dtype, free_before: int, weights: int,
    tp: TPInfo,
) -> MemoryPlan:
    free_after = _free_memory(device)
    if device.type == "cpu" and tp.size > 1:  # the ranks share the host's memory: each plans with its part
        free_before, free_after = free_before // tp.size, free_after // tp.size
    # Every rank must build the same pool (the scheduler on rank 0 hands out its slots): plan for the tightest.
    free_before, free_after = tp.min_over_ranks("memory", [free_before, free_after])
    inputs = MemoryInputs(
        device=device.type,
        free_before_weights=free_before,
        free_after_weights=free_after,
        weights_bytes=weights,
        kv_bytes_per_token=kv_bytes_per_token(mc, tp, dtype),
        model_context_length=_model_context_length(mc),
        hidden_size=mc.hidden_size,
        ffn_bytes_per_token=_ffn_bytes_per_token(mc, dtype, tp),
        vocab_size=mc.vocab_size,
        dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        attention_bytes_per_token=_attention_bytes_per_token(mc, dtype, tp),
        graph_batch=_graph_batch(config, device),
    )
    return plan_memory(
        inputs,
        mem_fraction_static=config.mem_fraction_static,
        max_total_tokens=config.max_total_tokens,
        context_length=config.context_length,
        max_running_requests=config.max_running_requests,
        chunked_prefill_size=config.chunked_prefill_size,
        max_prefill_tokens=config.max_prefill_tokens,
        max_scored_prompt_tokens=config.max_scored_prompt_tokens,
    )


def decode_graphs(config: EngineConfig, shard: Shard) -> CudaGraphRunner | None:
    """This rank's decode CUDA graphs of its shard (None on CPU or with ``disable_cuda_graph``). Every rank calls
    this at the same point of startup with the same config and the agreed memory plan, so all capture the same
    sizes in the same order and the collectives inside the captures pair up across ranks."""
    if shard.device.type != "cuda" or config.disable_cuda_graph:
        return None
    if not hasattr(shard.attn, "init_cuda_graph_state"):
        raise ConfigError(
            f"CUDA graphs need the triton attention backend (got {config.attention_backend!r}); "
            f"set disable_cuda_graph=True to run {type(shard.attn).__name__} eagerly"
        )
    max_bs = min(_graph_batch(config, shard.device), shard.plan.max_running_requests)
    return CudaGraphRunner(shard.model, shard.attn, max_bs, shard.plan.context_length, shard.req_to_token, shard.device)


def resolve_device(device: str, rank: int = 0) -> torch.device:
    """The device of tensor-parallel rank ``rank`` (``cuda:rank`` on CUDA) for the config's ``device`` choice."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but torch sees no CUDA device; use device='cpu' or 'auto'")
    if device == "cuda" and rank > 0:
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device, cfg: ModelConfig) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32  # half precision on CPU is slow and lossy
    return DTYPES.get(str(cfg.torch_dtype), torch.bfloat16) if cfg.torch_dtype != "float32" else torch.float32


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def _step_headroom(device: torch.device) -> int:
    """What a step can still allocate on a CUDA device: its free memory and what torch's caching allocator holds
    unused."""
    return _free_memory(device) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _peak_rss() -> int:
    """Peak resident host memory of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _model_context_length(cfg: ModelConfig) -> int:
    if cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings:
        # Attention here is full, not windowed: beyond the window it would differ from the model's training.
        return cfg.sliding_window
    return cfg.max_position_embeddings


def _load_tokenizer(config: EngineConfig, checkpoint: Checkpoint) -> Any:
    if config.tokenizer_path:
        # Imported here: transformers' auto classes cost ~2 s and ~150 MiB at import, which a GGUF's cached
        # tokenizer does not need.
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(config.tokenizer_path)
    return checkpoint.load_tokenizer()


def _eos_ids(checkpoint: Checkpoint, tokenizer) -> frozenset[int]:
    ids = checkpoint.eos_token_ids()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _make_attention_backend(
    choice: str, kv_pool: KVPool, req_to_token: torch.Tensor, cfg: ModelConfig, device: torch.device, tp: TPInfo
) -> AttentionBackend:
    """``auto``: triton on CUDA, the C++ CPU kernel on the CPU (the torch reference for MLA, which that kernel does
    not implement); ``torch``: the reference anywhere."""
    sm_scale = cfg.attention_scale
    if choice == "auto":
        choice = "triton" if device.type == "cuda" else "torch" if cfg.mla is not None else "cpu"
    if choice == "cpu" and cfg.mla is not None:
        raise ConfigError("attention_backend='cpu' does not implement multi-head latent attention (DeepSeek); "
                          "use 'auto' or 'torch' on the CPU")
    if choice == "triton":
        if device.type != "cuda":
            raise ConfigError("attention_backend='triton' needs a CUDA device")
        from ..layers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(kv_pool, req_to_token, sm_scale, num_q_heads=cfg.num_heads // tp.size)
    if choice == "cpu":
        if device.type != "cpu":
            raise ConfigError("attention_backend='cpu' needs device='cpu'")
        from ..layers.attention.cpu_backend import CpuAttentionBackend  # imported here: the CUDA path never loads the CPU kernel

        return CpuAttentionBackend(kv_pool, req_to_token, sm_scale)
    return TorchAttentionBackend(kv_pool, req_to_token, sm_scale)
