"""The Xinference engine classes of sglite: ``SgliteModel`` (completions) and ``SgliteChatModel`` (chat).

Xinference creates the engine object in the worker process (``__init__``: launch options are validated there,
before any weight is read), pickles it into the model subprocess and calls ``load()`` there, then serves
requests through ``async_generate`` / ``async_chat`` on the model actor's event loop. ``allow_batch = True``
tells the model actor not to serialise requests behind a lock, so concurrent requests reach the runtime
together and share its continuous batch.

One concern per module:

- ``model``: ``SgliteModel``, the engine contract (discovery, lifecycle, metrics, completions);
- ``chat_model``: ``SgliteChatModel``, chat around :class:`xinf_sglang.openai_api.chat.ChatPath`;
- ``launch``: loading, the runtime ``Engine`` from the launch options;
- ``request_input``: request -> runtime (field mapping, text checks, tokenization, ``SamplingParams``);
- ``streams``: each request's runtime stream (bookkeeping, abort) and its OpenAI completion payloads;
- ``errors``: ``SgliteRequestError`` (the HTTP 400); :mod:`xinf_sglang.serving.engine_failure`: an engine that
  failed for good.

Import order. Xinference's model bootstrap (the first import of anything under ``xinference.model``) runs sglite's
engine-registration hook (:mod:`xinf_sglang.registration.engine_tables`), which imports ``model`` and
``chat_model``. A model subprocess starts by unpickling its engine object, so there the first import of
``xinference.model`` comes from this package. The import below makes it happen here, before any class module
starts: the hook then imports complete modules, and no registration has to be deferred. For the same reason only
modules of this package import ``xinference.model`` at module level (the modules they import do it in functions).
"""

import xinference.model  # noqa: F401  (first: Xinference's bootstrap, see above)

from .chat_model import SgliteChatModel
from .errors import SgliteRequestError
from .model import SgliteModel

__all__ = ["SgliteChatModel", "SgliteModel", "SgliteRequestError"]
