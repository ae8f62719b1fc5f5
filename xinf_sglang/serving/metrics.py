"""sglite's metrics in Xinference: the labels of a model process's Prometheus endpoint, and reading one replica's
runtime metrics from outside the server.

Why an endpoint per model process: Xinference 4.1's worker exporter (``--metrics-exporter-port``) serves the
worker process's aioprometheus registry, and the only way a model process reaches it is
``ModelActor.record_metrics(name, op, kwargs)`` -> ``WorkerActor.record_metrics`` ->
``xinference.core.metrics.record_metrics``, which looks ``name`` up among the module's predefined collectors
(request counts, token counts, a TTFT histogram) and drops anything else. An engine can neither add a metric
there nor push a histogram snapshot, and every push is an actor call. So each sglite model process serves its
own ``/metrics`` when launched with ``metrics_port`` (``runtime/metrics/server.py``), and every series carries
the labels Xinference's own model series use (``model_uid``, ``replica_index``, ``model_name``, ``engine``), so
the two join in PromQL.

Per replica without moving the round-robin: ``GET /v1/models/{uid}/replicas`` lists each replica's replica
model uid (``<uid>-rep<n>``) and worker address; ``WorkerActor.get_model(replica_model_uid)`` is that replica's
model actor, whose unknown attributes reach the engine (``ModelActor.__getattr__``), here
``SgliteModel.sglite_metrics()``. The supervisor's ``get_model(uid)``, which requests use, advances the replica
cycle on every call; it is never called here. Needs network access to the cluster's actor ports (they have no
Xinference auth).
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from typing import Any

WORKER_UID = "worker"  # xinference.core.worker.WorkerActor.default_uid(), without the import
_REPLICA_SUFFIX = re.compile(r"^(?P<uid>.+)-rep(?P<rep>\d+)$")  # xinference.core.utils.build_replica_model_uid

__all__ = ["get_runtime_metrics", "get_runtime_metrics_async", "metric_labels", "model_replicas", "replica_model_uid"]


def replica_model_uid(model_uid: str) -> str:
    """The replica model uid (``<uid>-rep<n>``) of the model process this runs in; ``model_uid`` if unknown.

    The engine object only gets the model's uid; the replica is known to its ``ModelActor``, which (4.1) titles
    the process ``Model: <replica model uid>`` just before it calls the engine's ``load`` (``setproctitle``, a
    dependency of Xinference)."""
    try:
        import setproctitle
    except ImportError:
        return model_uid
    title = setproctitle.getproctitle().removeprefix("Model: ")
    m = _REPLICA_SUFFIX.match(title)
    return title if m and m.group("uid") == model_uid else model_uid


def metric_labels(replica_model_uid: str, model_name: str) -> dict[str, str]:
    """The labels of a model process's series, spelled as Xinference's own model series spell them."""
    m = _REPLICA_SUFFIX.match(replica_model_uid)
    uid, replica = (m.group("uid"), m.group("rep")) if m else (replica_model_uid, "0")
    return {"model_uid": uid, "replica_index": replica, "model_name": model_name, "engine": "sglite"}


def _get_json(url: str, timeout: float, api_key: str | None) -> Any:
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def model_replicas(endpoint: str, model_uid: str, timeout: float = 10.0, api_key: str | None = None) -> list[dict]:
    """Xinference's replica list of ``model_uid``: ``replica_id``, ``replica_model_uid``, ``worker_address``,
    ``status``, ... (``GET /v1/models/{uid}/replicas``), in replica order."""
    rows = _get_json(f"{endpoint.rstrip('/')}/v1/models/{model_uid}/replicas", timeout, api_key)
    return sorted(rows, key=lambda r: r["replica_id"])


def _pick(rows: list[dict], model_uid: str, replica: int | None) -> dict:
    ids = [r["replica_id"] for r in rows]
    if not rows:
        raise ValueError(f"model {model_uid} has no replicas")
    if replica is None:
        if len(rows) > 1:
            raise ValueError(f"model {model_uid} has {len(rows)} replicas {ids}; pass replica= one of them")
        return rows[0]
    for row in rows:
        if row["replica_id"] == replica:
            return row
    raise ValueError(f"model {model_uid} has no replica {replica}; its replicas are {ids}")


async def get_runtime_metrics_async(
    endpoint: str, model_uid: str, timeout: float = 30.0, replica: int | None = None, api_key: str | None = None
) -> dict[str, Any]:
    """Async form of :func:`get_runtime_metrics`."""
    import xoscar as xo

    rows = await asyncio.to_thread(model_replicas, endpoint, model_uid, timeout, api_key)
    row = _pick(rows, model_uid, replica)

    async def call() -> dict[str, Any]:
        worker = await xo.actor_ref(address=row["worker_address"], uid=WORKER_UID)
        model = await worker.get_model(row["replica_model_uid"])
        return await model.sglite_metrics()

    return await asyncio.wait_for(call(), timeout)


def get_runtime_metrics(
    endpoint: str, model_uid: str, timeout: float = 30.0, replica: int | None = None, api_key: str | None = None
) -> dict[str, Any]:
    """Runtime metrics of one replica of the sglite model ``model_uid`` served by the Xinference at ``endpoint``:
    KV pool tokens (total / free / evictable), running / waiting requests, cache hit rate, retractions, peak
    batch size, ..., the plugin's own counters, ``replica_model_uid`` and ``prometheus_url`` (None unless
    launched with ``metrics_port``).

    ``replica``: which one (Xinference's replica id, 0..); may be left out for a model with one replica. Reading
    it does not change which replica serves the next request. Raises ``ValueError`` for an unknown replica,
    ``TimeoutError`` after ``timeout`` seconds, and whatever the model actor raises (e.g. the model is not an
    sglite model: ``AttributeError``).
    """
    return asyncio.run(get_runtime_metrics_async(endpoint, model_uid, timeout, replica, api_key))
