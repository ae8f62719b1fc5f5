"""``Runtime``: programs on the embedded engine (``xinf_sglang.runtime.Engine``) in this process.

Every request sends the program's whole text, tokenized as Xinference's completions endpoint tokenizes a prompt
(``add_special_tokens=True``), so successive gens of a program and the branches of a fork find their common
prefix in the engine's radix cache (``meta_info["cached_tokens"]``). ``select`` scores all choices in one batch
through prompt log probabilities (``max_new_tokens=0``): the batch shares the program's prefix, computed once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from ..chat_template import ChatTemplate, NoChatTemplate
from ..choices import TokenScore
from ..errors import LangError
from ..ir import GenParams
from .base import Backend, GenResult, meta_info


class Runtime(Backend):
    """The embedded engine. ``engine_options`` are ``EngineConfig`` fields (``device``, ``max_total_tokens``,
    ``schedule_policy``, ...); a bad one is a ``LangError`` naming it."""

    def __init__(self, model_path: str, **engine_options: Any) -> None:
        from ...runtime import Engine, EngineConfig
        from ...runtime.errors import ConfigError

        try:
            config = EngineConfig(model_path=str(model_path), **engine_options)
        except ConfigError as e:
            raise LangError(f"sgl.Runtime: {e}") from None
        self.engine = Engine(config)
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise LangError("sgl.Runtime needs the model's tokenizer (skip_tokenizer_init=False)")
        self.tokenizer = tokenizer
        special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        template = _template_of(tokenizer)
        self.chat_template = ChatTemplate(template, special) if template else NoChatTemplate(
            f"the checkpoint at {model_path} ships none")

    def encode(self, text: str) -> list[int]:
        """``text``'s token ids as every request of this backend sends them."""
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def generate(self, text: str, params: GenParams) -> GenResult:
        [out] = self.engine.generate(input_ids=[self.encode(text)], sampling_params=[self._sampling(params)])
        if out.error:
            raise LangError(f"the engine failed the request: {out.error}")
        scores = None if out.output_logprobs is None else self._scores(out.output_logprobs)
        return GenResult(out.text, meta_info(out.prompt_tokens, out.completion_tokens, out.cached_tokens,
                                             out.finish_reason, out.matched_stop, scores))

    def generate_stream(self, text: str, params: GenParams) -> Iterator[GenResult]:
        # The engine streams to asyncio; a program's worker thread has no event loop, so it drives one here.
        loop = asyncio.new_event_loop()
        stream = self.engine.generate_stream(input_ids=self.encode(text), sampling_params=self._sampling(params))
        scores: list[TokenScore] = []
        try:
            while True:
                try:
                    chunk = loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
                if chunk.error:
                    raise LangError(f"the engine failed the request: {chunk.error}")
                scores.extend(self._scores(chunk.output_logprobs or []))
                meta = None if chunk.finish_reason is None else meta_info(
                    chunk.prompt_tokens, chunk.completion_tokens, chunk.cached_tokens, chunk.finish_reason,
                    chunk.matched_stop, scores if params.return_logprob else None)
                yield GenResult(chunk.text, meta or {})
        finally:
            loop.run_until_complete(stream.aclose())
            loop.close()

    def score(self, text: str, continuations: list[str]) -> list[list[TokenScore]]:
        from ...runtime import SamplingParams

        prefix = self.encode(text)
        prompts = [self.encode(text + c) for c in continuations]
        starts = [_common_prefix(prefix, ids) for ids in prompts]
        for c, ids, start in zip(continuations, prompts, starts):
            if start >= len(ids) or len(ids) < 2:
                raise LangError(f"select cannot score {c!r} after {text[-40:]!r}: it adds no token with a context")
        params = [SamplingParams(max_new_tokens=0, temperature=0, prompt_logprobs_start=s) for s in starts]
        outs = self.engine.generate(input_ids=prompts, sampling_params=params)
        results = []
        for c, out in zip(continuations, outs):
            if out.error or not out.prompt_logprobs:
                raise LangError(f"the engine returned no prompt logprobs for {c!r}: {out.error or 'none'}")
            results.append(self._scores(out.prompt_logprobs))
        return results

    def check(self, params: GenParams) -> None:
        self._sampling(params)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def _scores(self, logprobs: list[Any]) -> list[TokenScore]:
        return [TokenScore(lp.logprob, lp.token_id, self.tokenizer.decode([lp.token_id])) for lp in logprobs]

    def _sampling(self, params: GenParams) -> Any:
        from ...runtime import SamplingParams
        from ...runtime.errors import InvalidRequestError

        fields: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens, stop=list(params.stop or ()),
            stop_token_ids=list(params.stop_token_ids or ()), temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k, min_p=params.min_p, frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty, ignore_eos=params.ignore_eos, regex=params.regex,
            json_schema=params.json_schema,
        )
        if params.return_logprob or params.top_logprobs_num:
            fields.update(logprobs=True, top_logprobs=params.top_logprobs_num or 0)
        try:
            return SamplingParams(**fields)
        except InvalidRequestError as e:
            raise LangError(f"sampling parameters: {e}") from None


def _template_of(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
