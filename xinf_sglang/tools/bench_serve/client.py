"""One streamed OpenAI request, timed on the client, and the checks made before any load is sent.

Timing (SGLang ``bench_serving``'s definitions, ``time.perf_counter``): TTFT is the time from sending the request
to the first chunk with non-empty content; ITL are the gaps between later non-empty chunks; E2E runs to the end of
the stream. Tokens come from the stream's ``usage`` (asked for with ``stream_options.include_usage``); a server
that sends none is counted one output token per content chunk and zero prompt tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .datasets import Api

PATHS: dict[Api, str] = {"completions": "/completions", "chat": "/chat/completions"}
ERROR_CHARS = 300  # of a server's error text kept in an outcome


@dataclass
class RequestOutcome:
    """What one request measured; ``ok`` False carries ``error`` and nothing else is meaningful."""

    ok: bool
    error: str = ""
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None  # None: the server's usage has no prompt_tokens_details.cached_tokens
    text: str = ""
    turn: int = 0  # position in its conversation (0 for single-turn datasets)

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); None with fewer than two output tokens."""
        if self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


def api_root(base_url: str) -> str:
    """``http://host:port``, ``.../`` or ``.../v1`` -> ``http://host:port/v1``."""
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def make_client(base_url: str, api_key: str | None, timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client on the API root; no connection cap (the runner caps concurrency itself)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(base_url=api_root(base_url), headers=headers, timeout=httpx.Timeout(timeout_s),
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


async def check_models(client: httpx.AsyncClient, uids: list[str]) -> None:
    """Fail with a clear message, before any load, if the server is unreachable or lacks one of ``uids``."""
    url = str(client.base_url).rstrip("/") + "/models"
    try:
        response = await client.get("/models")
    except httpx.HTTPError as e:
        raise SystemExit(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if response.status_code != 200:
        raise SystemExit(f"{url} answered HTTP {response.status_code}: {response.text[:ERROR_CHARS]}")
    try:
        served = [m["id"] for m in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"{url} is not an OpenAI-compatible model list: {response.text[:ERROR_CHARS]}") from None
    for uid in uids:
        if uid not in served:
            raise SystemExit(f"model uid {uid!r} is not served at {url}; it serves: {served or 'nothing'}")


def request_body(api: Api, model: str, prompt: str | list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """A greedy streamed request of exactly ``max_tokens`` output tokens (EOS ignored), usage included."""
    body: dict[str, Any] = {"prompt": prompt} if api == "completions" else {"messages": prompt}
    body.update(model=model, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, stream=True,
                stream_options={"include_usage": True})
    return body


async def send(client: httpx.AsyncClient, api: Api, body: dict[str, Any], turn: int = 0) -> RequestOutcome:
    """Send one streamed request and time it; HTTP, stream and server errors become a failed outcome."""
    start = time.perf_counter()
    arrivals: list[float] = []
    texts: list[str] = []
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", PATHS[api], json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")
                return RequestOutcome(False, f"HTTP {response.status_code}: {detail[:ERROR_CHARS]}", turn=turn)
            async for event in _events(response):
                if "error" in event:
                    return RequestOutcome(False, f"stream error: {str(event['error'])[:ERROR_CHARS]}", turn=turn)
                piece = _content(api, event)
                if piece:
                    arrivals.append(time.perf_counter())
                    texts.append(piece)
                usage = event.get("usage") or usage
    except httpx.HTTPError as e:
        return RequestOutcome(False, f"{type(e).__name__}: {e}", turn=turn)
    return _outcome(start, time.perf_counter(), arrivals, "".join(texts), usage, turn)


async def _events(response: httpx.Response):
    """The JSON objects of an SSE stream's ``data:`` lines, up to ``[DONE]``."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, "event: ..." and ": keep-alive" lines
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except ValueError:
            yield {"error": f"not JSON: {data[:ERROR_CHARS]}"}


def _content(api: Api, event: dict[str, Any]) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""  # the usage-only chunk
    if api == "completions":
        return choices[0].get("text") or ""
    return (choices[0].get("delta") or {}).get("content") or ""


def _outcome(start: float, end: float, arrivals: list[float], text: str, usage: dict[str, Any] | None,
             turn: int) -> RequestOutcome:
    """A successful outcome; a stream without content has TTFT = E2E (its first token is its end)."""
    first = arrivals[0] if arrivals else end
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    return RequestOutcome(
        ok=True, ttft_s=first - start, itl_s=[b - a for a, b in zip(arrivals, arrivals[1:])], e2e_s=end - start,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or len(arrivals)),
        cached_tokens=details.get("cached_tokens"), text=text, turn=turn,
    )
