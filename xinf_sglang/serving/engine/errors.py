"""The request error of sglite's engine (an HTTP 400), and what a runtime abort in mid-stream becomes.

Xinference 4.1's REST layer turns exactly one exception type from an engine into an HTTP 400,
``xinference.model.llm.context_length.ContextLengthExceeded`` (everything else is a 500). So invalid requests
raise :class:`SgliteRequestError`, a subclass of it. Xinference's chat endpoint replaces the detail of that 400
by a fixed "Request exceeds the model's configured context length." text; :mod:`xinf_sglang.compat.patches`
patches that so sglite's own message is shown there too (messages of this class must stay free of credentials
and worker internals: they are shown to clients).

The REST process imports this module to unpickle a request error (through the engine package, which bootstraps
Xinference first: see there), and :mod:`xinf_sglang.compat.patches` looks the class up here.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Type

from xinference.model.llm.context_length import ContextLengthExceeded

__all__ = ["SgliteRequestError", "request_errors", "stream_error"]


class SgliteRequestError(ContextLengthExceeded):
    """An invalid request (bad sampling value, unsupported field, prompt too long). Becomes an HTTP 400.

    Subclasses ``ContextLengthExceeded`` only because that is the one engine exception Xinference 4.1's REST
    layer maps to 400; the message says what was actually wrong.
    """


@contextmanager
def request_errors(*kinds: Type[Exception]) -> Iterator[None]:
    """Re-raise ``kinds`` (errors that describe the client's request) as :class:`SgliteRequestError`, same message."""
    try:
        yield
    except kinds as e:
        raise SgliteRequestError(str(e)) from None


# Runtime abort messages caused by the request's own constraint (a 400), as opposed to engine failures (a 500,
# whose text may name internals and stays in the server log).
_REQUEST_ABORTS = ("grammar rejected token",)


def stream_error(request_id: str, error: str) -> Exception:
    """The exception for a request the runtime aborted mid-stream."""
    if error.startswith(_REQUEST_ABORTS):
        return SgliteRequestError(f"sglite stopped request {request_id}: {error}")
    return RuntimeError(f"sglite aborted request {request_id}: {error}")
