"""Errors the runtime raises to its callers, and `brief`, how their messages show a client's value."""

BRIEF_CHARS = 80
"""Most characters of a client's value an error message repeats (`brief`): a message goes to the client and to the
server's log, so a megabyte-long value must not come back in it, nor fill the log."""


class InvalidRequestError(ValueError):
    """A request (prompt, sampling parameters, grammar) that cannot be served as asked.

    Raised before anything is queued; the message says what was wrong and what is allowed. The plugin maps it
    to an HTTP 400.
    """


class EngineFailure(RuntimeError):
    """The engine cannot run another step: its device failed for good (a sticky CUDA error). Every request is
    refused with this error from then on; only a new process can serve again (tensor parallelism's lost rank is
    the same situation: ``tp.RankFailure``)."""


class ConfigError(ValueError):
    """An engine configuration that cannot work (bad value, weights that do not fit, unknown architecture)."""


def brief(value: object, limit: int = BRIEF_CHARS) -> str:
    """``repr(value)`` for an error message: whole when it is at most ``limit`` characters, else its first
    ``limit`` characters, an ellipsis and the full length (``'aaaa…' (200002 characters)``)."""
    try:
        text = repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits() refuses to be written out
        text = f"<{type(value).__name__} too large to show>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"
