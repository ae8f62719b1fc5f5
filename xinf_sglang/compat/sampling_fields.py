"""Patch 3 of :mod:`xinf_sglang.compat.patches`: ``n`` and ``logit_bias`` reach sglite models over HTTP.

(It also lets ``max_tokens=0``, prompt scoring with ``echo`` and ``logprobs``, reach sglite models: Xinference's
request model refuses it (``ge=1``); it is taken out of the body the same way and forwarded as ``max_new_tokens``.)

Xinference 4.1's ``RESTfulAPI.create_completion`` and ``create_chat_completion`` leave ``n`` and ``logit_bias``
out of the generate config of every engine (their ``exclude`` sets), so ``n=3`` silently gives one choice, and
they answer any ``logit_bias`` with a 501 "Not implemented" before the model is even looked up. The patch wraps
both handlers. For a request that sets either field (``n`` other than 1, or any ``logit_bias``) it asks the
supervisor which engine serves the model (``describe_model``'s ``model_engine``, one actor call, only for such
requests); for an sglite model it takes both fields out of the request body (Starlette caches the parsed body, so
the handler reads the same dict: its 501 check no longer fires) and hands them to patch 2's
``extract_guided_params`` wrapper through a context variable, which adds them to the generate config the engine
receives. Requests to every other engine, and requests without these fields, go through untouched, so other
engines keep Xinference's behaviour (one choice, 501).

The same question decides patch 2's extra fields (the SGLang aliases ``regex`` / ``ebnf`` / ``choice``,
``priority``, ``min_p``, ``min_tokens``: the names ``install`` gets as ``sglite_only``): a request that names one of
them at the top level or in a raw ``extra_body`` object asks the supervisor too, and ``extract_guided_params``
adds them only when the model is sglite's (`handling_sglite_request`); requests to other engines get exactly
Xinference's own generate config.

``SGLITE_XINFERENCE_N_LOGIT_BIAS=0`` switches the forwarding off (``SGLITE_XINFERENCE_COMPAT=0`` switches every
patch off): an sglite model then answers ``n > 1`` with a 400 that says so instead of one choice in silence, and
``logit_bias`` with Xinference's own 501. With every patch off sglite never sees the request's ``n``; Xinference
then drops it as it does for every engine (the README says so).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import os
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

logger = logging.getLogger(__name__)

FORWARD_ENV = "SGLITE_XINFERENCE_N_LOGIT_BIAS"
FEATURE = "n and logit_bias for sglite models over HTTP"
HANDLERS = ("create_completion", "create_chat_completion")
FIELDS = ("n", "logit_bias")
_MARK = "__sglite_compat__"

# For a request to an sglite model, the sglite-only fields taken out of its body (possibly none); None for any
# other request. Set by the handler wrapper, read by extract_guided_params within the same handler call (the same
# task and context).
_FORWARDED: contextvars.ContextVar[Optional[Dict[str, Any]]] = contextvars.ContextVar(
    "sglite_forwarded_fields", default=None
)


def forwarding_enabled() -> bool:
    """Whether ``n`` / ``logit_bias`` are forwarded (``SGLITE_XINFERENCE_N_LOGIT_BIAS`` not switched off)."""
    return os.environ.get(FORWARD_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def forwarded_fields() -> Dict[str, Any]:
    """The fields to add to the generate config of the request being handled (empty for all but sglite models)."""
    return dict(_FORWARDED.get() or {})


def is_sglite_request() -> bool:
    """Whether the request being handled is for an sglite model (known only for requests that set an sglite-only
    field; False outside a wrapped handler)."""
    return _FORWARDED.get() is not None


@contextlib.contextmanager
def handling_sglite_request(fields: Optional[Dict[str, Any]] = None) -> Iterator[None]:
    """Within it, the request being handled is one for an sglite model, with ``fields`` to forward."""
    token = _FORWARDED.set(dict(fields or {}))
    try:
        yield
    finally:
        _FORWARDED.reset(token)


def install(api_cls: Any, engine_name: str, sglite_only: Iterable[str] = ()) -> bool:
    """Wrap both handlers of ``api_cls`` (once; each must be ``async def name(self, request)``). Never raises.

    ``sglite_only``: the further request fields that make the wrapper ask which engine serves the model (patch
    2's aliases and forwarded fields)."""
    originals = {}
    for name in HANDLERS:
        raw = getattr(api_cls, "__dict__", {}).get(name)
        if getattr(raw, _MARK, False):
            continue
        if not inspect.iscoroutinefunction(raw) or tuple(inspect.signature(raw).parameters) != ("self", "request"):
            logger.warning("sglite: %s unavailable: RESTfulAPI.%s is missing or does not have the expected "
                           "signature; Xinference's own behaviour is kept", FEATURE, name)
            return False
        originals[name] = raw
    for name, raw in originals.items():
        setattr(api_cls, name, _wrap(raw, engine_name, tuple(sglite_only)))
    logger.info("sglite: Xinference compatibility patch applied: %s (forwarding %s)", FEATURE,
                "on" if forwarding_enabled() else f"off: {FORWARD_ENV}=0, n > 1 is refused")
    return True


def _wrap(original: Callable[..., Any], engine_name: str, sglite_only: Tuple[str, ...]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def handler(self: Any, request: Any) -> Any:
        token = _FORWARDED.set(await _take_fields(self, request, engine_name, sglite_only))
        try:
            return await original(self, request)
        finally:
            _FORWARDED.reset(token)

    setattr(handler, _MARK, True)
    return handler


async def _take_fields(
    api: Any, request: Any, engine_name: str, sglite_only: Tuple[str, ...]
) -> Optional[Dict[str, Any]]:
    """Take ``n`` / ``logit_bias`` out of a request to an sglite model (see the module docstring); None when the
    request is not one, or sets no field that only sglite models get."""
    try:
        body = await request.json()
    except Exception:  # not JSON: Xinference's handler answers it
        return None
    if not isinstance(body, dict):
        return None
    asked = {k: body[k] for k in FIELDS if body.get(k) is not None}
    if asked.get("n") == 1:
        del asked["n"]  # one choice is what Xinference gives anyway
    if body.get("max_tokens") == 0 and not isinstance(body["max_tokens"], bool):
        # Prompt scoring (echo + logprobs, nothing generated): Xinference's request model wants max_tokens >= 1,
        # and its handler overwrites an unset max_tokens afterwards, so it travels as sglite's max_new_tokens.
        asked["max_tokens"] = 0
    if not (asked or _names_any(body, sglite_only)) or not await _served_by(api, body.get("model"), engine_name):
        return None
    if asked and not forwarding_enabled():
        n = asked.get("n")
        if n is not None:
            from fastapi import HTTPException

            raise HTTPException(status_code=400, detail=(
                f"n={n!r} cannot reach {engine_name}: forwarding n through Xinference's REST layer is switched off "
                f"({FORWARD_ENV}=0), and Xinference would return one choice; send n separate requests, or unset "
                f"{FORWARD_ENV}"))
        asked = {}  # logit_bias: Xinference's own 501 (patch 2's fields still reach the engine)
    for key in asked:
        del body[key]
    return {("max_new_tokens" if key == "max_tokens" else key): value for key, value in asked.items()}


def _names_any(body: Dict[str, Any], names: Tuple[str, ...]) -> bool:
    """Whether ``body`` sets one of ``names`` at its top level or in a raw ``extra_body`` object."""
    extra = body.get("extra_body")
    return any(body.get(k) is not None or (isinstance(extra, dict) and extra.get(k) is not None) for k in names)


async def _served_by(api: Any, model_uid: Any, engine_name: str) -> bool:
    """Whether ``model_uid`` runs on ``engine_name`` (False when it cannot be told: Xinference's handler then
    reports the unknown or loading model itself)."""
    if not isinstance(model_uid, str):
        return False
    try:
        desc = await (await api._get_supervisor_ref()).describe_model(model_uid)
    except Exception:
        return False
    return str(desc.get("model_engine") or "").lower() == engine_name
