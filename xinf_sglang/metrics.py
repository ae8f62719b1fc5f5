"""Read a running sglite model's runtime metrics from outside the server.

Xinference 4.1 has no REST endpoint for engine-specific state, but its model actor forwards unknown method
calls to the engine object (``ModelActor.__getattr__``), and ``GET /v1/address`` gives the supervisor's actor
address. So ``get_runtime_metrics`` asks the supervisor for the model's actor and calls
``SgliteModel.sglite_metrics()`` on it over Xoscar, the RPC Xinference itself uses between its processes:
KV pool tokens (total / free / evictable), running / waiting requests, cache hit rate, aborted requests,
retractions, peak batch size, plus the plugin's own counters.

Needs network access to the cluster's actor ports (same host, or same network), and no Xinference auth on
those ports (they never had any).
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

SUPERVISOR_UID = "supervisor"  # xinference.core.supervisor.SupervisorActor.default_uid(), without the import


def supervisor_address(endpoint: str, timeout: float = 10.0, api_key: str | None = None) -> str:
    """The supervisor's Xoscar address (``host:port``) of the Xinference server at ``endpoint``."""
    request = urllib.request.Request(endpoint.rstrip("/") + "/v1/address")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


async def get_runtime_metrics_async(endpoint: str, model_uid: str, timeout: float = 30.0) -> dict[str, Any]:
    """Async form of :func:`get_runtime_metrics`."""
    import xoscar as xo

    address = await asyncio.to_thread(supervisor_address, endpoint, timeout)

    async def call() -> dict[str, Any]:
        supervisor = await xo.actor_ref(address=address, uid=SUPERVISOR_UID)
        model = await supervisor.get_model(model_uid)
        return await model.sglite_metrics()

    return await asyncio.wait_for(call(), timeout)


def get_runtime_metrics(endpoint: str, model_uid: str, timeout: float = 30.0) -> dict[str, Any]:
    """Runtime metrics of the sglite model ``model_uid`` served by the Xinference at ``endpoint``.

    Raises ``TimeoutError`` after ``timeout`` seconds, and whatever the model actor raises (e.g. the model
    is not an sglite model: ``AttributeError``).
    """
    return asyncio.run(get_runtime_metrics_async(endpoint, model_uid, timeout))
