"""Errors the runtime raises to its callers."""


class InvalidRequestError(ValueError):
    """A request (prompt, sampling parameters, grammar) that cannot be served as asked.

    Raised before anything is queued; the message says what was wrong and what is allowed. The plugin maps it
    to an HTTP 400.
    """


class ConfigError(ValueError):
    """An engine configuration that cannot work (bad value, weights that do not fit, unknown architecture)."""
