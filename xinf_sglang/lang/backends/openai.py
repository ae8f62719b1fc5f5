"""``OpenAI``: programs on a model served by Xinference (or another OpenAI-compatible server), through
``/v1/completions`` with the official ``openai`` client.

The program's whole text is the prompt of every request, so the server's prefix cache serves what earlier gens
and the other branches already computed. Constraints go as the guided-decoding fields Xinference forwards
(``guided_regex``, ``guided_json``); ``select`` scores each choice with ``echo=True, logprobs=1, max_tokens=0``
(the log probability of every prompt token). Roles are rendered with the chat template the server uses for the
model: the one in its Xinference registration, unless ``chat_template=`` gives one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..chat_template import ChatTemplate, NoChatTemplate
from ..choices import TokenScore
from ..errors import LangError
from ..ir import GenParams
from .base import Backend, GenResult, meta_info


class OpenAI(Backend):
    """The model ``model_uid`` at ``base_url`` (``http://host:port/v1``).

    Args:
        chat_template: Jinja text of the model's chat template; default: read from the server's registration of
            the model (``GET /v1/model_registrations/LLM/{model_name}``).
        special_tokens: template variables such as ``bos_token`` when the template uses them.
        timeout: seconds one request may take.
    """

    def __init__(
        self, model_uid: str, base_url: str = "http://127.0.0.1:9997/v1", api_key: str = "none",
        chat_template: str | None = None, special_tokens: Mapping[str, str] | None = None, timeout: float = 600.0,
    ) -> None:
        import openai

        self.model_uid = model_uid
        self.base_url = base_url.rstrip("/")
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=timeout)
        template = chat_template or self._registered_template(api_key, timeout)
        self.chat_template = ChatTemplate(template, special_tokens) if template else NoChatTemplate(
            f"the server's registration of {model_uid} has no Jinja chat template; pass chat_template=")

    def _registered_template(self, api_key: str, timeout: float) -> str | None:
        """The Jinja chat template Xinference holds for the model (None when it has none, e.g. a non-Xinference
        server, or a registration that leaves the template to the checkpoint)."""
        import httpx

        root = self.base_url.removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"}
        with httpx.Client(timeout=timeout, headers=headers) as http:
            described = http.get(f"{root}/v1/models/{self.model_uid}")
            if described.status_code != 200:
                # Xinference answers 400 for an unknown uid, others 404: the model list is the common ground.
                self._check_served(http, root)
                return None
            name = described.json().get("model_name")
            registered = http.get(f"{root}/v1/model_registrations/LLM/{name}")
        template = registered.json().get("chat_template") if registered.status_code == 200 else None
        return template if isinstance(template, str) and ("{{" in template or "{%" in template) else None

    def _check_served(self, http: Any, root: str) -> None:
        """Raise unless ``GET /v1/models`` lists ``model_uid`` (a server without the list is taken at its word)."""
        listed = http.get(f"{root}/v1/models")
        if listed.status_code != 200:
            return
        data = listed.json().get("data", [])
        served = sorted(str(m.get("id")) for m in data if isinstance(m, dict))
        if self.model_uid not in served:
            raise LangError(f"the server at {root} serves no model {self.model_uid!r}; it serves {served}")

    def generate(self, text: str, params: GenParams) -> GenResult:
        reply = self._complete(self._request(text, params))
        choice = reply.choices[0]
        scores = _token_scores(choice.logprobs) if params.return_logprob else None
        return GenResult(choice.text, _meta(reply.usage, choice.finish_reason, scores))

    def generate_stream(self, text: str, params: GenParams) -> Iterator[GenResult]:
        request = {**self._request(text, params), "stream": True, "stream_options": {"include_usage": True}}
        finish, scores = None, []
        for chunk in self._complete(request):
            if chunk.choices:
                choice = chunk.choices[0]
                finish = choice.finish_reason or finish
                if params.return_logprob and choice.logprobs is not None:
                    scores.extend(_token_scores(choice.logprobs))
                if choice.text:
                    yield GenResult(choice.text)
            if chunk.usage is not None:
                yield GenResult("", _meta(chunk.usage, finish, scores if params.return_logprob else None))

    def score(self, text: str, continuations: list[str]) -> list[list[TokenScore]]:
        def one(continuation: str) -> list[TokenScore]:
            reply = self._complete(dict(model=self.model_uid, prompt=text + continuation, max_tokens=0, echo=True,
                                        logprobs=1, temperature=0))
            scored = _scored_suffix(reply.choices[0].logprobs, len(text), len(text + continuation))
            if not scored:
                raise LangError(f"select cannot score {continuation!r} after {text[-40:]!r}: the server scored no token")
            return scored

        with ThreadPoolExecutor(len(continuations), thread_name_prefix="sgl-score") as pool:
            return list(pool.map(one, continuations))

    def _complete(self, request: dict[str, Any]) -> Any:
        import openai

        try:
            return self.client.completions.create(**request)
        except openai.APIStatusError as e:
            raise LangError(f"the server refused the request ({e.status_code}): {_detail(e)}") from None

    def _request(self, text: str, params: GenParams) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if params.top_k not in (None, -1, 0):
            extra["top_k"] = params.top_k
        if params.min_p:
            extra["min_p"] = params.min_p
        if params.ignore_eos:
            extra["ignore_eos"] = True
        if params.min_new_tokens:
            extra["min_tokens"] = params.min_new_tokens
        if params.stop_token_ids:
            extra["stop_token_ids"] = list(params.stop_token_ids)
        if params.regex is not None:
            extra["guided_regex"] = params.regex
        if params.json_schema is not None:
            extra["guided_json"] = json.loads(params.json_schema)
        request: dict[str, Any] = dict(
            model=self.model_uid, prompt=text, max_tokens=params.max_new_tokens, temperature=params.temperature,
            top_p=params.top_p, frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
            stop=list(params.stop) or None, extra_body=extra or None,
        )
        if params.return_logprob or params.top_logprobs_num:
            request["logprobs"] = max(1, params.top_logprobs_num or 0)
        return request


def _meta(usage: Any, finish: str | None, scores: list[TokenScore] | None) -> dict[str, Any]:
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) or 0
    return meta_info(usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0, cached,
                     finish, None, scores)


def _token_scores(logprobs: Any) -> list[TokenScore]:
    if logprobs is None:
        raise LangError("the server returned no logprobs for a gen with return_logprob")
    return [TokenScore(lp, None, tok) for tok, lp in zip(logprobs.tokens, logprobs.token_logprobs) if lp is not None]


def _scored_suffix(logprobs: Any, prefix_chars: int, prompt_chars: int) -> list[TokenScore]:
    """The echoed prompt tokens that reach past the first ``prefix_chars`` characters (the continuation's), and
    start before ``prompt_chars`` (not generated ones)."""
    if logprobs is None or not logprobs.tokens:
        raise LangError("the server returned no prompt logprobs (completions with echo=True, logprobs=1)")
    tokens, values = logprobs.tokens, logprobs.token_logprobs
    offsets = logprobs.text_offset or _cumulative([len(t) for t in tokens])
    ends = [*offsets[1:], offsets[-1] + len(tokens[-1])]
    return [
        TokenScore(v, None, t) for t, v, start, end in zip(tokens, values, offsets, ends)
        if end > prefix_chars and start < prompt_chars and v is not None
    ]


def _cumulative(lengths: list[int]) -> list[int]:
    out, total = [], 0
    for n in lengths:
        out.append(total)
        total += n
    return out


def _detail(error: Any) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("message") or body)
    return str(body or error)
