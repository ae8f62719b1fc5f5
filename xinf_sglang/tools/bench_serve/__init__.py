"""``sglite bench serve``: load on a served model through its OpenAI-compatible HTTP API (Xinference first).

It talks HTTP only (``httpx``) and never imports the runtime, so it measures any server the same way:

- :mod:`.options` the command's arguments -> :class:`~.options.ServeOptions`
- :mod:`.text` random prompt text of a given token length from a tokenizer's vocabulary (deterministic)
- :mod:`.datasets` the workloads: ``random-ids``, ``shared-prefix``, ``multi-turn``
- :mod:`.client` one streamed request, timed on the client -> :class:`~.client.RequestOutcome`
- :mod:`.runner` one run: Poisson arrivals, a concurrency cap, conversations turn after turn
- :mod:`.stats` a run's outcomes -> one JSON line with SGLang ``bench_serving``'s key names
- :mod:`.plots` PNGs of a sweep; :mod:`.command` the whole command (checks, warm-up, sweep, A/B)
"""
