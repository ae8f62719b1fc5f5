"""``SgliteModel``: the Xinference engine contract of sglite (discovery, lifecycle, completions).

The class is the adapter Xinference talks to; the work is in the modules beside it: :mod:`.launch` builds the
runtime engine, :mod:`.request_input` maps and checks requests, :mod:`.streams` runs them and formats their
streams, :mod:`xinf_sglang.serving.engine_failure` ends a process whose tensor-parallel engine failed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

from xinference.model.llm.core import LLM

from ...openai_api.request_mapping import RequestOptions
from ...registration.engine_name import ENGINE_NAME, declare_in_virtualenv
from ...registration.matching import match_model
from ..engine_failure import FailureWatch
from ..launch_options import split_model_config
from ..metrics import metric_labels, replica_model_uid
from . import launch
from .errors import SgliteRequestError
from .request_input import RequestInput, map_config
from .streams import Completion, CompletionRunner, RequestTracker, closed_when_abandoned

if TYPE_CHECKING:
    from xinference.model.llm.llm_family import LLMFamilyV2, LLMSpecV1

    from ...runtime import Engine

logger = logging.getLogger(__name__)


class SgliteModel(LLM):
    """sglite serving a generate-only family (``/v1/completions``); base of ``SgliteChatModel``."""

    # Let Xinference's model actor run requests concurrently (no per-model lock): the runtime batches them.
    allow_batch = True

    def __init__(
        self,
        model_uid: str,
        model_family: "LLMFamilyV2",
        model_path: str,
        model_config: Optional[Dict[str, Any]] = None,
        peft_model: Optional[List[Any]] = None,
    ):
        super().__init__(model_uid, model_family, model_path)
        if peft_model:
            raise ValueError("sglite does not support LoRA adapters; launch without --lora-modules")
        # With per-model virtualenvs Xinference may pick an engine listed in a family's virtualenv markers
        # without running its compatibility check ("bypassing engine compatibility checks"): check here, in
        # the worker, before anything is loaded.
        ok = type(self).match_json(model_family, self.model_spec, self.quantization)
        if ok is not True:
            raise ValueError(ok[1] if isinstance(ok, tuple) else f"{ENGINE_NAME} cannot serve this model")
        # Validates every option (unknown keys, ranges); raises LaunchOptionsError (a ValueError -> HTTP 400).
        self._options, xinference_keys = split_model_config(model_config)
        self._reasoning_content = _as_bool(xinference_keys.get("reasoning_content"), False)
        self._enable_thinking = _as_bool(xinference_keys.get("enable_thinking"), False)
        self._requests = RequestTracker()
        self._replica_model_uid = model_uid  # this process's replica (<uid>-rep<n>), found at load
        # Built by load(), in the model process (this object is pickled there from the worker first).
        self._engine: Optional["Engine"] = None
        self._tokenizer: Any = None  # also read by Xinference's LLM.count_tokens
        self._input: Optional[RequestInput] = None
        self._runner: Optional[CompletionRunner] = None
        self._failure_watch: Optional[FailureWatch] = None  # ends the process once the engine failed for good
        logger.info("%s: launch options for %s: %s", ENGINE_NAME, model_uid, self._options.model_dump())

    # ---- Xinference engine contract: discovery ----

    @classmethod
    def check_lib(cls) -> Union[bool, Tuple[bool, str]]:
        """Whether the runtime's dependencies are importable (checked without importing torch)."""
        return launch.check_lib()

    @classmethod
    def match(cls, llm_family: "LLMFamilyV2", llm_spec: "LLMSpecV1", quantization: str) -> bool:
        # Called for every family when Xinference builds its engine table (start-up, catalog refresh, custom
        # registration): the place to declare sglite in families that restrict engines by virtualenv markers.
        declare_in_virtualenv(llm_family)
        return super().match(llm_family, llm_spec, quantization)

    @classmethod
    def match_json(
        cls, llm_family: "LLMFamilyV2", llm_spec: "LLMSpecV1", quantization: str
    ) -> Union[bool, Tuple[bool, str]]:
        """Whether sglite can serve this family + spec; ``(False, reason)`` otherwise (shown in the web UI)."""
        declare_in_virtualenv(llm_family)  # also reached from the engine listing, which calls match_json directly
        return match_model(llm_family, llm_spec, quantization, need_chat=False)

    # ---- lifecycle ----

    def load(self) -> None:
        """Create the runtime engine (in the model subprocess) and the request helpers around it."""
        self._replica_model_uid = replica_model_uid(self.model_uid)
        labels = metric_labels(self._replica_model_uid, self.model_family.model_name)
        checkpoint = launch.checkpoint_path(self.model_path, self.model_spec)
        engine = self._engine = launch.launch_engine(self._options, checkpoint, self._replica_model_uid, labels)
        self._tokenizer = engine.tokenizer
        self._input = RequestInput(engine)
        self._runner = CompletionRunner(engine, self.model_uid, self._requests, self._failure)
        self._failure_watch = FailureWatch.for_engine(self.model_uid, engine, lambda: len(self._requests))

    def stop(self) -> None:
        """Shut the runtime down (aborts what is left and frees the KV pool and the weights)."""
        engine, self._engine = self._engine, None
        self._input = self._runner = None
        if self._failure_watch is not None:
            self._failure_watch.stop()
        if engine is not None:
            engine.shutdown()
            logger.info("%s: %s stopped", ENGINE_NAME, self.model_uid)

    def wait_for_load(self) -> None:
        """Loading is synchronous in ``load``; nothing to wait for."""

    # ---- observability (callable on the model actor: ModelActor forwards unknown attributes here) ----

    def sglite_metrics(self) -> Dict[str, Any]:
        """Runtime counters (KV pool, running/waiting requests, cache hit rate) plus this plugin's own.

        Reach it through Xinference's model actor, e.g. ``xinf_sglang.serving.metrics.get_runtime_metrics`` (per
        replica).
        """
        engine, request_input, _ = self._loaded()
        endpoint = engine.metrics_endpoint
        metrics: Dict[str, Any] = dict(engine.metrics())
        metrics.update(
            plugin_active_requests=len(self._requests),
            plugin_client_aborts=self._requests.client_aborts,
            context_length=request_input.context_length,
            launch_options=self._options.model_dump(),
            pid=os.getpid(),
            replica_model_uid=self._replica_model_uid,
            prometheus_url=endpoint.url if endpoint is not None else None,
        )
        return metrics

    # ---- requests ----

    async def abort_request(self, request_id: str) -> str:
        """Abort a running request (Xinference's ``/v1/models/{uid}/requests/{id}/abort``)."""
        if self._engine is None or not self._requests.abort(self._engine, request_id):
            return "NO_OP"
        return "DONE"

    async def async_generate(
        self, prompt: str, generate_config: Optional[Dict[str, Any]] = None, request_id: Optional[str] = None
    ) -> Completion:
        """``/v1/completions``: a ``Completion`` dict, or an async generator of ``CompletionChunk`` dicts."""
        sampling, opts = map_config(generate_config, "completion")
        if not isinstance(prompt, str):
            raise SgliteRequestError("sglite completions take one prompt string per request")
        _, request_input, _ = self._loaded()
        request_input.check_text(prompt, "prompt")
        # Completions follow the HF convention of the model's own BOS handling (add_special_tokens=True).
        # Tokenized on a thread: a long prompt must not stall the model actor's loop, which serves everyone.
        input_ids = await asyncio.to_thread(request_input.encode, prompt, True)
        completion = await self._start(input_ids, sampling, opts, request_id, echo=prompt if opts.echo else "")
        return self._handed_over(completion)

    async def _start(
        self, input_ids: List[int], sampling: Dict[str, Any], opts: RequestOptions, request_id: Optional[str],
        echo: str = "",
    ) -> Completion:
        """Start one request; validation errors raise here, before anything streams."""
        _, request_input, runner = self._loaded()
        failure = self._failure()
        if failure is not None:
            raise failure
        params = request_input.sampling_params(sampling, opts, len(input_ids))
        return await runner.run(input_ids, params, opts, request_id or uuid.uuid4().hex, echo)

    @staticmethod
    def _handed_over(completion: Completion) -> Completion:
        """A completion as it goes back to Xinference: a stream is closed as soon as the actor's consumer of it is
        cancelled (:func:`.streams.closed_when_abandoned`)."""
        return completion if isinstance(completion, dict) else closed_when_abandoned(completion)

    def _loaded(self) -> Tuple["Engine", RequestInput, CompletionRunner]:
        """What ``load`` built (engine, request input, runner); RuntimeError before load and after stop."""
        if self._engine is None or self._input is None or self._runner is None:
            raise RuntimeError(f"model {self.model_uid} is not loaded")
        return self._engine, self._input, self._runner

    def _failure(self) -> Optional[BaseException]:
        """The error for every request once the engine failed for good (the process is about to end:
        `engine_failure`: a lost tensor-parallel rank or a sticky device error); None while it serves."""
        return self._failure_watch.error() if self._failure_watch is not None else None


def _as_bool(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
