"""Small compatibility patches of Xinference 4.1's REST layer, for sglite's structured output and errors.

``xinf_sglang.compat`` is the only place sglite replaces Xinference code (beyond adding itself to the engine tables
in :mod:`xinf_sglang.registration.engine_tables`); this module holds the REST-layer patches, applied once per process
by :func:`install` (:mod:`xinf_sglang._autoload` calls it), :mod:`xinf_sglang.compat.gguf_format` the GGUF format
wrapper the registration hook applies. The patches here wrap methods of ``xinference.api.restful_api.RESTfulAPI``
and call the original for everything that is not sglite's business.

1. **Request errors** (``RESTfulAPI.handle_request_limit_error``). Xinference 4.1 turns exactly one engine
   exception type into an HTTP 400, ``ContextLengthExceeded``, which is why :class:`xinf_sglang.serving.engine.
   errors.SgliteRequestError` subclasses it. On ``/v1/chat/completions`` Xinference calls the handler with
   ``sanitize=True``, which replaces the 400's detail by a fixed "Request exceeds the model's configured context
   length." whatever went wrong (an invalid JSON schema, a bad regex, an unsupported field), and every other
   engine error by a generic 500 text. The wrapper raises ``HTTPException(400, detail=<sglite's message>)`` for
   sglite's own request errors (the exception crosses the model actor boundary pickled, as its own class or an
   Xoscar-made subclass of it; ``isinstance`` holds for both), on every endpoint and with or without
   ``sanitize``. In a chat *stream* the same text becomes the SSE ``error`` event, as an OpenAI error object
   (``{"message": ..., "type": "invalid_request_error", ...}``) so that the OpenAI client raises ``APIError`` with
   sglite's message instead of "An error occurred during streaming" (the call is recognised by its caller, the
   ``stream_results`` generator of Xinference's REST module). Any other exception goes to
   Xinference's handler unchanged, so its sanitizing still covers everything sglite did not write.

   A model whose engine failed for good (:class:`xinf_sglang.serving.engine_failure.SgliteEngineFailure`: a
   tensor-parallel rank died; the model process is ending so that Xinference relaunches it) gets the same
   treatment as an HTTP 503 with sglite's message, so a client sees why instead of a generic 500 text.

   The same errors in the error event of every other stream (``/v1/completions`` with ``stream``) go through
   ``RESTfulAPI._get_model_last_error`` first, which the patch wraps too: the event then carries sglite's message
   without the model actor's ``[address=..., pid=...]`` prefix.

2. **Field aliases** (``RESTfulAPI.extract_guided_params``). Xinference 4.1's request models drop top-level
   fields they do not declare; only the vLLM-style ``guided_*`` fields are forwarded (top level or inside a raw
   ``extra_body`` object). For a request to an sglite model the wrapper also forwards SGLang's names, ``regex`` ->
   ``guided_regex``, ``ebnf`` -> ``guided_grammar``, ``choice`` -> ``guided_choice``, from the same two places;
   which engine serves the model is asked by patch 3's handler wrapper (only for requests that set one of these
   fields), so requests to every other engine get Xinference's own result unchanged. An alias that contradicts
   the guided field it maps to (``regex`` and a different ``guided_regex``) is a 400 instead of a silent pick.
   The other fields forwarded are the top-level ``priority``, ``min_p`` and ``min_tokens`` (what the OpenAI
   client sends for ``extra_body={"min_p": 0.1}``), as they are, for sglite models too: the request models drop
   them, and the engine validates them. Without patch 3 (its handlers changed) nothing of this is added for any model.

3. **n and logit_bias** for sglite models (``RESTfulAPI.create_completion`` / ``create_chat_completion``, in
   :mod:`xinf_sglang.compat.sampling_fields`): Xinference 4.1 drops ``n`` for every engine and answers
   ``logit_bias`` with 501; for a model served by sglite both reach the engine (through patch 2's wrapper, so this
   one needs patch 2), other engines keep Xinference's behaviour. ``SGLITE_XINFERENCE_N_LOGIT_BIAS=0`` switches
   the forwarding off alone: sglite models then answer ``n > 1`` with a 400 saying why.

Guards: the patches are applied once per process (idempotent; a marker on the wrapper), only when Xinference is
4.1.x and the patched attribute is a static method with the signature read from 4.1.0's source. Otherwise one
warning per unavailable feature says which and why, and Xinference runs unpatched: it never crashes because of
this module. ``SGLITE_XINFERENCE_COMPAT=0`` (process environment, read at install time) switches all off.

Installed by :mod:`xinf_sglang._autoload` right after ``xinference.api.restful_api`` is imported, which happens
in the process that serves the REST API (``xinference-local`` on POSIX runs it in its own ``api_worker``
subprocess; the supervisor and worker run elsewhere and need no patch).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from typing import Any, Callable

from . import sampling_fields as sampling_fields
from ..registration.engine_name import ENGINE_NAME

logger = logging.getLogger(__name__)

DISABLE_ENV = "SGLITE_XINFERENCE_COMPAT"
SUPPORTED_SERIES = ("4", "1")  # major, minor of the Xinference the patched internals were read from
# SGLang request field -> the vLLM-style field Xinference 4.1 forwards to engines.
FIELD_ALIASES = {"regex": "guided_regex", "ebnf": "guided_grammar", "choice": "guided_choice"}
# Top-level request fields Xinference 4.1's request models drop, forwarded as they are (vLLM and SGLang read the
# same name). A literal extra_body object reaches engines whole, so its entries need no forwarding.
FORWARDED_FIELDS = ("priority", "min_p", "min_tokens")

ERRORS = "sglite's request-error messages on /v1/chat/completions"
STREAM_ERRORS = "sglite's request-error messages in stream error events, without the actor address"
STREAM_ERRORS_METHOD = "_get_model_last_error"
FIELD_ALIAS_FEATURE = "the SGLang request fields regex/ebnf/choice, priority, min_p and min_tokens over HTTP"

_MARK = "__sglite_compat__"
_ERRORS_MODULE = "xinf_sglang.serving.engine.errors"
_FAILURE_MODULE = "xinf_sglang.serving.engine_failure"
_REST_MODULE = "xinference.api.restful_api"


def enabled() -> bool:
    """Whether the patches may be applied in this process (``SGLITE_XINFERENCE_COMPAT`` not switched off)."""
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def install(api_cls: Any = None, version: str | None = None) -> dict[str, bool]:
    """Apply both patches to ``api_cls`` (default: Xinference's ``RESTfulAPI``). Never raises.

    ``version`` defaults to the installed ``xinference.__version__``. Returns ``{"errors": bool,
    "field_aliases": bool, "n_logit_bias": bool}``: whether each patch is in place now (also when it already was).
    """
    result = {"errors": False, "field_aliases": False, "n_logit_bias": False}
    if not enabled():
        logger.info("sglite: Xinference compatibility patches switched off (%s=0)", DISABLE_ENV)
        return result
    try:
        if api_cls is None:
            from xinference.api.restful_api import RESTfulAPI as api_cls
        if version is None:
            import xinference

            version = str(getattr(xinference, "__version__", "unknown"))
        if tuple(version.split(".")[:2]) != SUPPORTED_SERIES:
            for feature in (ERRORS, FIELD_ALIAS_FEATURE, sampling_fields.FEATURE):
                _unavailable(feature, f"Xinference {version} is not 4.1.x, the version these patches were written for")
            return result
        result["errors"] = _patch(
            api_cls, "handle_request_limit_error", ("e", "sanitize"), _errors_wrapper, ERRORS
        )
        if result["errors"]:
            _patch_stream_errors(api_cls)
        result["field_aliases"] = _patch(
            api_cls, "extract_guided_params", ("raw_body",), _aliases_wrapper, FIELD_ALIAS_FEATURE
        )
        if result["field_aliases"]:  # the fields it takes out of a request reach the engine through patch 2
            result["n_logit_bias"] = sampling_fields.install(
                api_cls, ENGINE_NAME, sglite_only=(*FIELD_ALIASES, *FORWARDED_FIELDS)
            )
        else:
            _unavailable(sampling_fields.FEATURE, "it needs the field-alias patch, which is not applied")
    except Exception as e:  # never break Xinference because of this plugin
        logger.warning("sglite: Xinference compatibility patches not applied: %s", e, exc_info=True)
    return result


def is_patched(api_cls: Any, name: str) -> bool:
    """Whether ``api_cls.name`` is sglite's wrapper."""
    raw = getattr(api_cls, "__dict__", {}).get(name)
    return isinstance(raw, staticmethod) and getattr(raw.__func__, _MARK, False)


def _unavailable(feature: str, why: str) -> None:
    logger.warning("sglite: %s unavailable: %s; Xinference's own behaviour is kept", feature, why)


def _patch(
    api_cls: Any,
    name: str,
    expected_params: tuple[str, ...],
    make_wrapper: Callable[[Callable[..., Any]], Callable[..., Any]],
    feature: str,
) -> bool:
    if is_patched(api_cls, name):
        return True
    raw = getattr(api_cls, "__dict__", {}).get(name)
    if not isinstance(raw, staticmethod):
        _unavailable(feature, f"{getattr(api_cls, '__name__', api_cls)}.{name} is missing or not a static method")
        return False
    original = raw.__func__
    try:
        params = inspect.signature(original).parameters
    except (TypeError, ValueError):
        params = {}
    if tuple(params) != expected_params or (
        "sanitize" in params and params["sanitize"].kind is not inspect.Parameter.KEYWORD_ONLY
    ):
        _unavailable(feature, f"{name}{inspect.signature(original)} does not have the expected signature")
        return False
    wrapper = make_wrapper(original)
    setattr(wrapper, _MARK, True)
    setattr(api_cls, name, staticmethod(wrapper))
    logger.info("sglite: Xinference compatibility patch applied: %s", feature)
    return True


def _patch_stream_errors(api_cls: Any) -> bool:
    """Wrap ``RESTfulAPI._get_model_last_error``, the step every SSE generator of Xinference 4.1 takes before it
    sends ``{"error": str(ex)}`` (completions streams among them): sglite's request errors come back as a plain
    exception with sglite's message, without the model actor's ``[address=..., pid=...]`` prefix."""
    raw = getattr(api_cls, "__dict__", {}).get(STREAM_ERRORS_METHOD)
    if is_patched_method(api_cls, STREAM_ERRORS_METHOD):
        return True
    if not inspect.iscoroutinefunction(raw) or tuple(inspect.signature(raw).parameters) != (
        "self", "replica_model_uid", "e"
    ):
        _unavailable(STREAM_ERRORS, f"{STREAM_ERRORS_METHOD} is missing or does not have the expected signature")
        return False

    @functools.wraps(raw)
    async def _get_model_last_error(self: Any, replica_model_uid: Any, e: Exception) -> Exception:
        if is_sglite_request_error(e):
            # sglite's class again (still a 400 where a handler follows), rebuilt from the message alone
            return sys.modules[_ERRORS_MODULE].SgliteRequestError(request_error_message(e))
        if is_sglite_engine_failure(e):
            return sys.modules[_FAILURE_MODULE].SgliteEngineFailure(request_error_message(e))
        return await raw(self, replica_model_uid, e)

    setattr(_get_model_last_error, _MARK, True)
    setattr(api_cls, STREAM_ERRORS_METHOD, _get_model_last_error)
    logger.info("sglite: Xinference compatibility patch applied: %s", STREAM_ERRORS)
    return True


def is_patched_method(api_cls: Any, name: str) -> bool:
    """Whether the (non-static) method ``api_cls.name`` is sglite's wrapper."""
    return getattr(getattr(api_cls, "__dict__", {}).get(name), _MARK, False)


def is_sglite_request_error(e: BaseException) -> bool:
    """Whether ``e`` is sglite's own request error (or Xoscar's traceback-carrying subclass of it).

    An unpickled ``SgliteRequestError`` can only exist once its module is imported, so the module is looked up,
    never imported, here.
    """
    return _is_instance(e, _ERRORS_MODULE, "SgliteRequestError")


def is_sglite_engine_failure(e: BaseException) -> bool:
    """Whether ``e`` is sglite's error for a model whose engine failed for good (looked up like a request error)."""
    return _is_instance(e, _FAILURE_MODULE, "SgliteEngineFailure")


def _is_instance(e: BaseException, module: str, name: str) -> bool:
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(e, cls)


def request_error_message(e: BaseException) -> str:
    """sglite's own message of ``e``, without what the actor RPC added on the way.

    Xoscar re-raises a remote exception as a generated subclass whose ``str`` starts with the model actor's
    address and pid (``[address=127.0.0.1:45485, pid=24320] ...``); the original exception is its ``__wrapped__``.
    """
    inner = e
    for _ in range(8):  # one level per actor hop; a request error makes one
        wrapped = getattr(type(inner), "__wrapped__", None)
        if not isinstance(wrapped, BaseException):
            break
        inner = wrapped
    return BaseException.__str__(inner)


def _errors_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def handle_request_limit_error(e: Exception, *, sanitize: bool = False) -> Any:
        status = 400 if is_sglite_request_error(e) else 503 if is_sglite_engine_failure(e) else None
        if status is not None:
            from fastapi import HTTPException

            # Safe to show even where Xinference sanitizes: every SgliteRequestError message is written by sglite
            # (request mapping, the engine's checks, the runtime's request validation and grammar compiler) and
            # names only the offending request field, its value, or limits of the model; none holds credentials,
            # file paths, actor addresses or other worker internals. Keep it that way when adding messages.
            # SgliteEngineFailure's message says which tensor-parallel rank ended how (and its pid), or which device
            # error the runtime saw (torch's text of it), only.
            message = request_error_message(e)
            if _called_from_a_stream():
                # Xinference sends the detail as the stream's {"error": detail} event; the OpenAI client shows
                # error.message from an object there, and only a generic text for a plain string.
                raise HTTPException(status_code=status, detail=_openai_error(message, status))
            raise HTTPException(status_code=status, detail=message)
        return original(e, sanitize=sanitize)

    return handle_request_limit_error


def _called_from_a_stream() -> bool:
    """Whether the handler was called by one of Xinference 4.1's SSE generators (``stream_results`` in
    ``RESTfulAPI.create_chat_completion``), which turn the 400's detail into the stream's error event."""
    frame = sys._getframe(2)  # 0: this function, 1: the wrapper, 2: Xinference's caller
    return frame.f_code.co_name == "stream_results" and frame.f_globals.get("__name__") == _REST_MODULE


def _openai_error(message: str, status: int = 400) -> dict[str, Any]:
    """An OpenAI-style error object (what ``openai.APIError`` reads its message from)."""
    kind = "invalid_request_error" if status == 400 else "server_error"
    return {"message": message, "type": kind, "param": None, "code": status}


def _aliases_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def extract_guided_params(raw_body: dict) -> dict:
        kwargs = original(raw_body=raw_body)
        if not isinstance(raw_body, dict) or not sampling_fields.is_sglite_request():
            return kwargs  # another engine's model (or one that could not be told): Xinference's own result
        extra_body = raw_body.get("extra_body")
        sources = [raw_body] + ([extra_body] if isinstance(extra_body, dict) else [])
        for source in sources:
            for alias, guided in FIELD_ALIASES.items():
                value = source.get(alias)
                if value is None:
                    continue
                present = kwargs.get(guided)
                if present is not None and present != value:
                    from fastapi import HTTPException

                    raise HTTPException(
                        status_code=400,
                        detail=f"{alias!r} and {guided!r} are the same constraint with different values; send one",
                    )
                kwargs[guided] = value
        for name in FORWARDED_FIELDS:
            if raw_body.get(name) is not None:
                kwargs[name] = raw_body[name]
        kwargs.update(sampling_fields.forwarded_fields())  # n / logit_bias of a request to an sglite model
        return kwargs

    return extract_guided_params
