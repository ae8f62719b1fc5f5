"""``Engine``: the offline and async API of the runtime.

The engine validates and tokenizes requests on the caller's thread (bad input is rejected before anything is
queued), then hands them to the scheduler, which runs on its own thread so that neither an asyncio event loop nor
an HTTP server ever waits on a model step, and a model step never waits on them. Results come back as
``StreamChunk``s through a per-request sink.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import numbers
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence

import psutil
import torch
from transformers import AutoTokenizer

from xinf_sglang.kernels.pdl import pdl_supported

from .allocator import ReqToTokenPool, TokenAllocator
from .attention import AttentionBackend, TorchAttentionBackend
from .config import EngineConfig
from .constrained import GrammarBackend, GrammarLimits, GrammarSpec, LLGuidanceBackend
from .constrained.spec import check_text
from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from .errors import ConfigError, InvalidRequestError
from .kv_pool import KVPool
from .memory_plan import MemoryInputs, MemoryPlan, plan_memory
from .model_runner import ModelRunner
from .models.checkpoint import Checkpoint, open_checkpoint
from .models.config import ModelConfig
from .models.loader import load_model
from .output_processor import OutputProcessor
from .outputs import GenerateOutput, StreamChunk
from .prefix_cache import NoPrefixCache
from .radix_cache import RadixCache
from .request import Req
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerLimits

logger = logging.getLogger("xinf_sglang.runtime")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Call:
    """Run ``fn`` on the scheduler thread and put its result in ``future``."""

    fn: Callable[[], Any]
    future: Future


class Engine:
    """An inference engine over one model. Thread-safe; ``generate_stream`` may be used from many asyncio tasks."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = _resolve_device(config.device)
        self.checkpoint = open_checkpoint(config.model_path)
        self.model_config = self.checkpoint.model_config
        self.dtype = _resolve_dtype(config.dtype, self.device, self.model_config)
        self.tokenizer = None if config.skip_tokenizer_init else _load_tokenizer(config, self.checkpoint)
        self.eos_token_ids = _eos_ids(self.checkpoint, self.tokenizer)
        torch.manual_seed(config.seed)

        free_before = _free_memory(self.device)
        model = load_model(self.checkpoint, self.dtype, self.device, config.load_format, seed=config.seed)
        weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if config.load_format != "dummy":
            logger.info("sglite weights: %s", self.checkpoint.describe(self.dtype, weights_bytes))
        mc = self.model_config
        kv_bytes = KVPool.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype)
        inputs = MemoryInputs(
            device=self.device.type,
            free_before_weights=free_before,
            free_after_weights=_free_memory(self.device),
            weights_bytes=weights_bytes,
            kv_bytes_per_token=kv_bytes,
            model_context_length=_model_context_length(mc),
            hidden_size=mc.hidden_size,
            intermediate_size=mc.intermediate_size,
            vocab_size=mc.vocab_size,
            dtype_bytes=torch.empty((), dtype=self.dtype).element_size(),
        )
        self.memory_plan: MemoryPlan = plan_memory(
            inputs,
            mem_fraction_static=config.mem_fraction_static,
            max_total_tokens=config.max_total_tokens,
            context_length=config.context_length,
            max_running_requests=config.max_running_requests,
            chunked_prefill_size=config.chunked_prefill_size,
            max_prefill_tokens=config.max_prefill_tokens,
        )
        plan = self.memory_plan
        self.context_length = plan.context_length
        kv_pool = KVPool(plan.pool_tokens, mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype, self.device)
        allocator = TokenAllocator(plan.pool_tokens, self.device)
        req_pool = ReqToTokenPool(plan.max_running_requests, plan.context_length, self.device)
        attn = _make_attention_backend(config.attention_backend, kv_pool, req_pool.table, mc, self.device)
        self.runner = ModelRunner(model, kv_pool, attn, req_pool.table, self.device)
        if self.device.type == "cuda" and not config.disable_cuda_graph:
            if not hasattr(attn, "init_cuda_graph_state"):
                raise ConfigError(
                    f"CUDA graphs need the triton attention backend (got {config.attention_backend!r}); "
                    f"set disable_cuda_graph=True to run {type(attn).__name__} eagerly"
                )
            max_bs = min(config.cuda_graph_max_bs or 256, plan.max_running_requests)
            self.runner.enable_cuda_graphs(max_bs, plan.context_length)
        limits = SchedulerLimits(
            max_running_requests=plan.max_running_requests,
            max_prefill_tokens=plan.max_prefill_tokens,
            chunked_prefill_size=plan.chunked_prefill_size,
            schedule_policy=config.schedule_policy,
            overlap=config.overlap_schedule == "on" or (config.overlap_schedule == "auto" and self.device.type == "cuda"),
        )
        prefix_cache = NoPrefixCache(allocator) if config.disable_radix_cache else RadixCache(allocator)
        self.scheduler = Scheduler(limits, self.runner, allocator, req_pool, prefix_cache, OutputProcessor())
        logger.info(
            "sglite engine: %s (%s) on %s, %s, attention=%s, cuda graphs=%s, overlap schedule=%s, "
            "programmatic dependent launch=%s",
            mc.architecture, config.model_path, self.device, str(self.dtype).removeprefix("torch."),
            type(attn).__name__, self.runner.graphs is not None, limits.overlap, pdl_supported(self.device),
        )
        for line in plan.report():
            logger.info("memory plan: %s", line)

        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: set[str] = set()  # request ids queued or running (guarded by _lock)
        self._lock = threading.Lock()
        self._grammar: GrammarBackend | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="sglite-scheduler", daemon=True)
        self._thread.start()

    # ---- public API ----

    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        input_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        request_id: str | Sequence[str] | None = None,
    ) -> list[GenerateOutput]:
        """Run a batch of prompts to completion; one ``GenerateOutput`` per prompt, in order.

        ``prompt`` is a string or a list of strings; ``input_ids`` a list of token ids or a list of such lists.
        ``sampling_params`` is one ``SamplingParams`` for all, or one per prompt; ``request_id`` one string per
        prompt (a single string for a single prompt). Every request is validated before any is queued; an
        invalid one (wrong types included) raises ``InvalidRequestError``.
        """
        prompts = _as_prompt_list(prompt, input_ids)
        params = _as_list(sampling_params or SamplingParams(), len(prompts), "sampling_params")
        rids = _request_ids(request_id, len(prompts))
        results: queue.SimpleQueue = queue.SimpleQueue()
        reqs = [self._make_request(p, sp, rid, results.put) for p, sp, rid in zip(prompts, params, rids)]
        compiling = [(req, self._compile_grammar(req)) for req in reqs]  # all compile in parallel
        for req, fut in compiling:
            if fut is not None:
                req.grammar = self.grammar_backend.new_matcher(fut.result())
        self._submit(reqs)
        collected = {req.rid: _Collector(req.rid) for req in reqs}
        pending = len(reqs)
        while pending:
            chunk = results.get()
            if collected[chunk.request_id].add(chunk):
                pending -= 1
        return [collected[req.rid].result() for req in reqs]

    async def generate_stream(
        self,
        prompt: str | None = None,
        input_ids: Sequence[int] | None = None,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        on_finish: Callable[[str], None] | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Stream one request's output. Closing the iterator early (``aclose``, a client disconnect) aborts the
        request and frees its KV.

        ``prompt`` is one string, ``input_ids`` one list of token ids, ``request_id`` a string. Bad input raises
        ``InvalidRequestError`` at the first iteration, before anything is queued. ``on_finish(request_id)`` is
        called on this event loop once the engine has finished the request (done or aborted), whether or not
        anyone still reads the stream.
        """
        [p] = _as_prompt_list(prompt, input_ids, single=True)
        [rid] = _request_ids(request_id, 1)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[StreamChunk] = asyncio.Queue()

        def sink(chunk: StreamChunk) -> None:  # on the scheduler thread
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            if on_finish is not None and chunk.finish_reason is not None:
                loop.call_soon_threadsafe(on_finish, chunk.request_id)

        req = self._make_request(p, sampling_params or SamplingParams(), rid, sink)
        compiling = self._compile_grammar(req)
        if compiling is not None:  # compiled on the backend's workers; the event loop keeps serving meanwhile
            req.grammar = self.grammar_backend.new_matcher(await asyncio.wrap_future(compiling))
        self._submit([req])
        finished = False
        try:
            while not finished:
                chunk = await chunks.get()
                finished = chunk.finish_reason is not None
                yield chunk
        finally:
            if not finished:
                self.abort(req.rid)

    def abort(self, request_id: str) -> None:
        """Abort a request wherever it is (queued, prefilling, decoding); a no-op for unknown ids."""
        self._inbox.put(("abort", request_id))

    def metrics(self) -> dict[str, float | int]:
        """A consistent snapshot of the engine's counters, taken on the scheduler thread between two steps."""
        return self.run_on_scheduler(self._metrics_now)

    def _metrics_now(self) -> dict[str, float | int]:
        s = self.scheduler
        stats = s.stats
        return {
            "kv_total_tokens": s.allocator.size,
            "kv_free_tokens": s.allocator.available,
            "kv_evictable_tokens": s.prefix_cache.evictable_size(),
            "kv_used_tokens": s.allocator.size - s.allocator.available,
            "running_requests": len(s.running) + (1 if s.chunked else 0),
            "waiting_requests": len(s.waiting),
            "cache_hit_rate": stats.cache_hit_rate,
            "prompt_tokens_total": stats.prompt_tokens,
            "cached_prompt_tokens_total": stats.cached_prompt_tokens,
            "generated_tokens_total": stats.generated_tokens,
            "finished_requests": stats.finished_requests,
            "aborted_requests": stats.aborted_requests,
            "retractions": stats.retractions,
            "prefill_steps": stats.prefill_steps,
            "decode_steps": stats.decode_steps,
            "peak_running_requests": stats.peak_running_requests,
            "peak_prefill_tokens": stats.peak_prefill_tokens,
            "overlapped_steps": stats.overlapped_steps,
            "prefill_tokens_total": stats.prefill_tokens,
            "prefill_seconds_total": stats.prefill_seconds,
            "decode_seconds_total": stats.decode_seconds,
            "grammar_mask_steps": self.runner.mask_steps,
            "grammar_mask_ms_per_step": 1e3 * self.runner.mask_seconds / max(1, self.runner.mask_steps),
            "new_token_ratio": s.new_token_ratio,
        }

    def flush_cache(self) -> int:
        """Evict every cached prefix that no request uses; returns the number of KV tokens freed."""
        sched = self.scheduler
        return self.run_on_scheduler(lambda: sched.prefix_cache.evict(sched.prefix_cache.evictable_size()))

    def check_invariants(self, timeout: float = 30.0) -> list[str]:
        """Wait until the engine is idle, then return the idle-invariant violations (empty when exact)."""
        deadline = time.monotonic() + timeout
        while True:
            problems = self.run_on_scheduler(self.scheduler.idle_invariant_violations)
            if problems != ["scheduler is not idle"] or time.monotonic() > deadline:
                return problems
            time.sleep(0.01)

    def run_on_scheduler(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run ``fn`` on the scheduler thread between steps and return its result."""
        fut: Future = Future()
        self._inbox.put(_Call(fn, fut))
        return fut.result(timeout)

    def shutdown(self) -> None:
        """Abort what is left, stop the scheduler thread and release the model's memory."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout=60)
        if self._grammar is not None:
            self._grammar.close()
        self.runner = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- requests ----

    def _make_request(
        self, prompt: str | list[int], params: SamplingParams, rid: str | None, sink: Callable[[StreamChunk], None]
    ) -> Req:
        if self._closed:
            raise InvalidRequestError("the engine is shut down")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str) and self.tokenizer is None:
            raise InvalidRequestError("this engine runs with skip_tokenizer_init: send input_ids, not text")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this engine runs with skip_tokenizer_init")
        if isinstance(prompt, str):
            self.check_prompt_text(prompt)  # cheap bounds first: tokenizing 10 MB takes a minute
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = prompt
        self._validate_prompt(ids)
        params.verify(self.model_config.vocab_size)
        if params.structured_output is not None and self.tokenizer is None:
            raise InvalidRequestError("structured output needs a tokenizer; this engine runs with skip_tokenizer_init")
        stop_ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        req = Req(
            rid=rid or uuid.uuid4().hex,
            input_ids=ids,
            params=params,
            sink=self._wrap_sink(sink),
            stop_token_ids=frozenset(stop_ids),
            max_new_tokens=min(params.max_new_tokens, self.context_length - len(ids)),
        )
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, prompt_ids=ids)
        req.stop_matcher = StopStringMatcher(params.stop or [])
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return req

    @property
    def grammar_backend(self) -> GrammarBackend:
        """The grammar backend, built on first use (building llguidance's token table takes ~0.5 s on big vocabs)."""
        with self._lock:
            if self._grammar is None:
                self._grammar = LLGuidanceBackend(
                    self.tokenizer,
                    self.model_config.vocab_size,
                    compile_timeout_s=self.config.grammar_compile_timeout_s,
                    max_workers=self.config.grammar_compile_workers,
                    eos_token_ids=sorted(self.eos_token_ids),
                )
            return self._grammar

    def _compile_grammar(self, req: Req) -> Future | None:
        """Start compiling ``req``'s grammar (cached); None for an unconstrained request. The future fails with
        ``InvalidRequestError`` when the grammar cannot be enforced."""
        p = req.params
        spec = GrammarSpec.from_fields(
            json_schema=p.json_schema, regex=p.regex, ebnf=p.ebnf, choices=p.choices, limits=self._grammar_limits
        )
        return None if spec is None else self.grammar_backend.compile_async(spec)

    @functools.cached_property
    def _grammar_limits(self) -> GrammarLimits:
        return self.config.grammar_limits()

    @functools.cached_property
    def max_prompt_chars(self) -> int:
        """Most characters a text prompt can have and still fit: ``(context_length - 1)`` times the longest
        token of the vocabulary (in characters; byte-level tokens count bytes, so the bound holds for any text).

        A longer text is refused before it is tokenized (`check_prompt_text`).
        """
        longest = max((len(t) for t in self.tokenizer.get_vocab()), default=1) if self.tokenizer is not None else 1
        return (self.context_length - 1) * max(longest, 1)

    def check_prompt_text(self, text: str, field: str = "prompt") -> None:
        """Refuse text that cannot be a prompt of this engine, without tokenizing it.

        Raises:
            InvalidRequestError: ``text`` (named ``field`` in the message) holds a lone surrogate (not Unicode
                text: tokenizers cannot encode it), or is longer than `max_prompt_chars`.
        """
        check_text(text, field)
        if len(text) > self.max_prompt_chars:
            raise InvalidRequestError(
                f"{field} has {len(text)} characters; with context_length {self.context_length} at most "
                f"{self.max_prompt_chars} can fit (context_length - 1 tokens of at most "
                f"{self.max_prompt_chars // max(self.context_length - 1, 1)} characters each)"
            )

    def _validate_prompt(self, ids: list[int]) -> None:
        ctx = self.context_length
        if not ids:
            raise InvalidRequestError("the prompt is empty: at least one token is needed")
        if len(ids) >= ctx:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; context_length is {ctx}, so at most {ctx - 1} prompt tokens fit "
                f"(with room for one new token)"
            )
        if len(ids) >= self.memory_plan.pool_tokens:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the KV pool holds {self.memory_plan.pool_tokens}; "
                f"raise max_total_tokens / mem_fraction_static"
            )
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is out of range: the vocabulary has ids 0..{vocab - 1}")

    def _wrap_sink(self, sink: Callable[[StreamChunk], None]) -> Callable[[StreamChunk], None]:
        def deliver(chunk: StreamChunk) -> None:
            if chunk.finish_reason is not None:
                with self._lock:
                    self._live.discard(chunk.request_id)
            sink(chunk)

        return deliver

    def _submit(self, reqs: list[Req]) -> None:
        """Queue ``reqs`` as one message: a batch reaches the scheduler together, whatever the thread timing."""
        with self._lock:
            rids = [r.rid for r in reqs]
            taken = [rid for rid in rids if rid in self._live]
            if taken or len(set(rids)) != len(rids):
                raise InvalidRequestError(f"request id {(taken or rids)[0]!r} is already in use by a running request")
            self._live.update(rids)
        queued = []
        for req in reqs:
            if req.max_new_tokens == 0:
                OutputProcessor().finish(req, "length")  # nothing to generate: no need to queue it
            else:
                queued.append(req)
        self._inbox.put(("add", queued))

    # ---- scheduler thread ----

    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            try:
                if not self._drain_inbox(block=not sched.has_work):
                    break
                worked = sched.step()
            except Exception as e:  # keep serving: fail the requests in flight, never the thread
                logger.exception("scheduler step failed; aborting the requests in flight")
                sched.abort_all(f"engine error: {type(e).__name__}: {e}")
                worked = False
            if not worked and self.config.debug_invariants and not sched.has_work:
                problems = sched.idle_invariant_violations()
                if problems:
                    logger.error("idle invariant violated: %s", "; ".join(problems))
        sched.abort_all("the engine is shutting down")

    def _drain_inbox(self, block: bool) -> bool:
        """Handle every queued message (waiting for one if ``block``); False once asked to stop."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(item, _Call):
                try:
                    item.future.set_result(item.fn())
                except Exception as e:
                    item.future.set_exception(e)
            else:
                kind, payload = item
                if kind == "stop":
                    return False
                if kind == "add":
                    for req in payload:
                        self.scheduler.add(req)
                elif kind == "abort":
                    self.scheduler.abort(payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True


class _Collector:
    """Accumulates one request's chunks into its ``GenerateOutput``."""

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.last: StreamChunk | None = None

    def add(self, chunk: StreamChunk) -> bool:
        self.text.append(chunk.text)
        self.tokens.extend(chunk.token_ids)
        self.last = chunk
        return chunk.finish_reason is not None

    def result(self) -> GenerateOutput:
        c = self.last
        return GenerateOutput(
            request_id=self.rid,
            token_ids=self.tokens,
            text="".join(self.text),
            finish_reason=c.finish_reason,
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            cached_tokens=c.cached_tokens,
            matched_stop=c.matched_stop,
            error=c.error,
        )


def _as_prompt_list(prompt: Any, input_ids: Any, single: bool = False) -> list[str | list[int]]:
    """The prompts of a call, each a string or a list of token ids; ``single``: exactly one (streams).

    Raises:
        InvalidRequestError: neither or both given, or a value of the wrong type (a bool is not a token id).
    """
    if (prompt is None) == (input_ids is None):
        raise InvalidRequestError("give exactly one of prompt (text) or input_ids (token ids)")
    if prompt is not None:
        if isinstance(prompt, str):
            return [prompt]
        if single or not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
            wanted = "a string" if single else "a string or a non-empty list of strings"
            raise InvalidRequestError(f"prompt must be {wanted}; got {_type_name(prompt)}")
        return list(prompt)
    if not isinstance(input_ids, (list, tuple)):
        raise InvalidRequestError(f"input_ids must be a list of token ids; got {_type_name(input_ids)}")
    if all(_is_token_id(t) for t in input_ids):  # one prompt (possibly empty, which validation rejects)
        return [[int(t) for t in input_ids]]
    if single:
        batch = all(isinstance(p, (list, tuple)) for p in input_ids)
        got = f"a batch of {len(input_ids)} lists (use generate for batches)" if batch else _describe_ids(input_ids)
        raise InvalidRequestError(f"input_ids of a stream must be one list of token ids (integers, not bools); got {got}")
    if not input_ids or not all(isinstance(p, (list, tuple)) and all(_is_token_id(t) for t in p) for p in input_ids):
        raise InvalidRequestError(
            "input_ids must be a list of token ids or a list of such lists (integers, not bools); "
            f"got {_describe_ids(input_ids)}"
        )
    return [[int(t) for t in p] for p in input_ids]


def _is_token_id(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _describe_ids(ids: Sequence[Any]) -> str:
    """The first entry that is not a token id, looking inside nested lists (for error messages)."""
    for entry in ids:
        inner = entry if isinstance(entry, (list, tuple)) and entry else [entry]
        bad = next((t for t in inner if not _is_token_id(t)), None)
        if bad is not None or not _is_token_id(inner[0]):
            return f"an entry {bad!r:.40} of type {_type_name(bad)}"
    return "an empty list"


def _type_name(value: Any) -> str:
    return type(value).__name__


def _request_ids(request_id: Any, n: int) -> list[str | None]:
    """One request id per prompt: None (ids are generated), one string for one prompt, or n strings."""
    if request_id is None:
        return [None] * n
    if isinstance(request_id, str) and n == 1:
        ids = [request_id]
    elif isinstance(request_id, (list, tuple)) and len(request_id) == n:
        ids = list(request_id)
    else:
        wanted = "a non-empty string" if n == 1 else f"a list of {n} non-empty strings (one per prompt)"
        raise InvalidRequestError(f"request_id must be {wanted}; got {request_id!r:.40} ({_type_name(request_id)})")
    for rid in ids:
        if not isinstance(rid, str) or not rid:
            raise InvalidRequestError(f"request_id must be a non-empty string; got {rid!r:.40} ({_type_name(rid)})")
    return ids


def _as_list(value: Any, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InvalidRequestError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but torch sees no CUDA device; use device='cpu' or 'auto'")
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


def _model_context_length(cfg: ModelConfig) -> int:
    if cfg.sliding_window and cfg.sliding_window < cfg.max_position_embeddings:
        # Attention here is full, not windowed: beyond the window it would differ from the model's training.
        return cfg.sliding_window
    return cfg.max_position_embeddings


def _load_tokenizer(config: EngineConfig, checkpoint: Checkpoint) -> Any:
    if config.tokenizer_path:
        return AutoTokenizer.from_pretrained(config.tokenizer_path)
    return checkpoint.load_tokenizer()


def _eos_ids(checkpoint: Checkpoint, tokenizer) -> frozenset[int]:
    ids = checkpoint.eos_token_ids()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _make_attention_backend(
    choice: str, kv_pool: KVPool, req_to_token: torch.Tensor, cfg: ModelConfig, device: torch.device
) -> AttentionBackend:
    """``auto``: triton on CUDA, the C++ CPU kernel on the CPU; ``torch``: the reference anywhere."""
    sm_scale = cfg.head_dim**-0.5
    if choice == "auto":
        choice = "triton" if device.type == "cuda" else "cpu"
    if choice == "triton":
        if device.type != "cuda":
            raise ConfigError("attention_backend='triton' needs a CUDA device")
        from .attention_triton import TritonAttentionBackend

        return TritonAttentionBackend(kv_pool, req_to_token, sm_scale, num_q_heads=cfg.num_heads)
    if choice == "cpu":
        if device.type != "cpu":
            raise ConfigError("attention_backend='cpu' needs device='cpu'")
        from .attention_cpu import CpuAttentionBackend  # imported here: the CUDA path never loads the CPU kernel

        return CpuAttentionBackend(kv_pool, req_to_token, sm_scale)
    return TorchAttentionBackend(kv_pool, req_to_token, sm_scale)
