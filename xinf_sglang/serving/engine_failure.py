"""A model whose engine failed for good: its requests get a clear error, then its process ends for Xinference.

A tensor-parallel engine cannot run another step once a rank died or hung (`runtime.tp.RankFailure`): the ranks
are out of step and the other ones were stopped. Only a new model process can serve again, and Xinference 4.1
relaunches a model when, and only when, its model process dies: the worker's pool monitor (every 0.5 s) sees
the sub pool gone and calls ``WorkerActor.recover_sub_pool``, which terminates the model
(``is_model_die=True``) and launches it again with the same launch arguments, forever by default or as many
times as ``XINFERENCE_MODEL_ACTOR_AUTO_RECOVER_LIMIT`` says (then it drops the replica). A process that stays up
with a failed engine is never noticed. Xinference's own fatal-error path (``ModelActor._handle_oom_error``)
ends the process with ``os._exit(1)`` for the same reason: ``sys.exit`` would be swallowed by Xoscar.

A single-device engine fails for good the same way after a sticky device error (an illegal memory access, a
device-side assert: the runtime's loop then sets ``Scheduler.failure``, a `runtime.errors.EngineFailure`, and
refuses every request with it), so it ends its process the same way.

So `FailureWatch` polls the failure signal of the engine (`FailureWatch.for_engine` picks it): the launcher of a
tensor-parallel engine (`TPLauncher.check`: a rank that died while the engine idled counts too), the scheduler's
``failure`` otherwise (`DeviceFailure`), and once the engine failed it lets the requests in flight leave with
their error (`SgliteEngineFailure`, an HTTP 503 with sglite's message through :mod:`xinf_sglang.compat.patches`),
shuts the engine down (bounded) and exits the process. Requests that arrive meanwhile are refused with the same
error at once.

This module is imported by the REST process too (to unpickle `SgliteEngineFailure`): nothing heavy here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)

__all__ = ["DeviceFailure", "EXIT_CODE", "FailureWatch", "SgliteEngineFailure"]

POLL_S = 0.5  # how often the ranks are checked (Xinference's pool monitor polls at the same rate)
DRAIN_S = 10.0  # how long the failed requests may take to leave the model actor with their error
DELIVER_S = 1.0  # after they left: time for their replies to cross from the model actor to the REST process
SHUTDOWN_S = 10.0  # the engine's own shutdown (grammar workers, ranks) before the process exits anyway
EXIT_CODE = 1  # what Xinference's OOM path exits with; any exit makes the worker relaunch the model


class SgliteEngineFailure(RuntimeError):
    """The model's engine failed for good; the model process is ending so that Xinference relaunches it.

    Its message is written by sglite (which rank ended how, or which device error the runtime saw) and is shown to
    clients as an HTTP 503.
    """


class DeviceFailure:
    """The failure signal of a single-device engine in the shape `FailureWatch` reads a `runtime.tp.TPLauncher`
    in: ``check()`` reads the engine's ``failure`` (no round trip to the scheduler, no wait) and keeps it in
    ``failure``, which is read on the model actor's event loop."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.failure: BaseException | None = None

    def check(self) -> BaseException | None:
        """The engine's failure, or None while it serves."""
        if self.failure is None:
            self.failure = self._engine.failure
        return self.failure


class FailureWatch:
    """Watches ``launcher`` (a `runtime.tp.TPLauncher`, or a `DeviceFailure`: ``failure`` and ``check()``) from a
    thread; on failure ends this process (see the module docstring). ``in_flight`` counts the model's requests
    still open; ``shutdown`` stops the engine."""

    @classmethod
    def for_engine(cls, model_uid: str, engine: Any, in_flight: Callable[[], int]) -> "FailureWatch":
        """The watch of a runtime ``Engine``: its tensor-parallel launcher, else its scheduler's failure."""
        source = engine.tp if engine.tp is not None else DeviceFailure(engine)
        return cls(model_uid, source, in_flight, engine.shutdown)

    def __init__(
        self, model_uid: str, launcher: Any, in_flight: Callable[[], int], shutdown: Callable[[], None]
    ) -> None:
        self._model_uid = model_uid
        self._launcher = launcher
        self._in_flight = in_flight
        self._shutdown = shutdown
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sglite-failure-watch", daemon=True)
        self._thread.start()

    def error(self) -> SgliteEngineFailure | None:
        """The error for a request of this model once its engine failed; None while it serves. Never waits (it
        is called on the model actor's event loop), so it reads the failure a step or `check` recorded."""
        failure = self._launcher.failure
        if failure is None:
            return None
        return SgliteEngineFailure(f"sglite model {self._model_uid}: {failure}; its process is ending so that "
                                   "Xinference relaunches it")

    def stop(self) -> None:
        """Stop watching (the model is being stopped normally: ranks ending then are no failure)."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=POLL_S + 5.0)

    def _run(self) -> None:
        while not self._stopped.wait(POLL_S):
            failure = self._launcher.check()
            if failure is not None:
                self._end_process(failure)
                return

    def _end_process(self, failure: BaseException) -> None:
        """Let the failed requests leave, stop the engine, exit (unless the model is being stopped anyway)."""
        logger.error(
            "sglite: model %s failed: %s. Its %d open requests get this error; then the model process (pid %d) "
            "exits with code %d so that Xinference marks the model failed and relaunches it "
            "(XINFERENCE_MODEL_ACTOR_AUTO_RECOVER_LIMIT bounds the relaunches)",
            self._model_uid, failure, self._in_flight(), os.getpid(), EXIT_CODE,
        )
        deadline = time.monotonic() + DRAIN_S
        while self._in_flight() and time.monotonic() < deadline and not self._stopped.is_set():
            time.sleep(0.1)
        if self._stopped.wait(DELIVER_S):
            return
        stopper = threading.Thread(target=self._shutdown, name="sglite-failed-shutdown", daemon=True)
        stopper.start()
        stopper.join(SHUTDOWN_S)
        if stopper.is_alive():
            logger.warning("sglite: model %s: the engine did not shut down within %.0f s; exiting anyway",
                           self._model_uid, SHUTDOWN_S)
        logger.error("sglite: model %s: ending the model process now (exit code %d)", self._model_uid, EXIT_CODE)
        for handler in logging.getLogger().handlers:  # os._exit skips the interpreter's flushing
            handler.flush()
        os._exit(EXIT_CODE)
