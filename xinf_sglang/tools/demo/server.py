"""A real ``xinference-local`` for the demo: started on 127.0.0.1 with auth off in a fresh ``XINFERENCE_HOME``, the
demo checkpoint registered as a custom LLM and launched with ``xinference launch --model-engine sglite``; the whole
process group shut down at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ...registration.custom_model import custom_llm_family
from .console import DemoError, say, wait_with_progress
from .model import DemoModel

MODEL_NAME = "sglite-demo"
MODEL_UID = "sglite-demo"
SERVER_START_TIMEOUT = 300.0
LAUNCH_TIMEOUT = 600.0  # a first launch builds the C++ CPU kernels: 1-3 min on 2 cores, more on a busy machine


class LocalXinference:
    """One ``xinference-local`` process group and its temporary home."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.bin = Path(sys.executable).parent
        self.home: Path | None = None
        self.log: Path | None = None
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    def start(self) -> None:
        """Start the server and wait until it serves ``/v1/models`` (a tick every 15 s meanwhile)."""
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", self.port)) == 0:
                raise DemoError(f"port {self.port} is in use; pass --port N")
        self.home = Path(tempfile.mkdtemp(prefix="sglite-demo-xinference-"))
        self.log = self.home / "xinference-local.log"
        self.env = self._env()
        say(f"starting xinference-local on {self.endpoint} (log: {self.log}) ...")
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [str(self.bin / "xinference-local"), "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so shutdown also reaches the model processes
            )
        waited = wait_with_progress(
            self._serves, SERVER_START_TIMEOUT, "Xinference to start",
            lambda s: f"still starting ({s:.0f}s; Xinference imports its model catalog)",
        )
        say(f"Xinference is up after {waited:.0f}s")

    def register(self, model: DemoModel) -> None:
        """Register ``model`` as the custom LLM ``sglite-demo`` and check that Xinference offers sglite for it."""
        # The chat template goes into the registration so that clients can read it (xinf_sglang.lang.OpenAI
        # renders a program's roles with it; examples/lang_*.py run against this server).
        family = custom_llm_family(model.path, MODEL_NAME, f"sglite demo: {model.label}", chat_template=True)
        say(f"registering {model.label} as the custom LLM {MODEL_NAME!r} (POST /v1/model_registrations/LLM)")
        status, body = self.http("POST", "/v1/model_registrations/LLM", {"model": json.dumps(family), "persist": True})
        if status != 200:
            raise DemoError(f"registration failed ({status}): {body}")
        status, engines = self.http("GET", f"/v1/engines/{MODEL_NAME}")
        if status != 200 or not isinstance(engines, dict) or not isinstance(engines.get("sglite"), list):
            reason = engines.get("sglite") if isinstance(engines, dict) else engines
            raise DemoError(f"Xinference does not offer the sglite engine for {MODEL_NAME}: {reason}")

    def launch(self) -> None:
        """``xinference launch --model-engine sglite``, with a tick while it loads that says whether sglite's C++ CPU
        kernels are being built."""
        assert self.home is not None and self.log is not None
        command = [
            str(self.bin / "xinference"), "launch", "--model-engine", "sglite", "--model-name", MODEL_NAME,
            "--model-uid", MODEL_UID, "--context-length", "2048", "--mem_fraction_static", "0.5",
            "--max_total_tokens", "16384", "-e", self.endpoint,
        ]
        say("launching: " + " ".join(["xinference", *command[1:]]))
        output = self.home / "launch.out"
        with open(output, "wb") as out:
            launcher = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            waited = wait_with_progress(
                lambda: launcher.poll() is not None, LAUNCH_TIMEOUT, "the model launch", self._launch_progress
            )
        finally:
            if launcher.poll() is None:
                launcher.kill()
        if launcher.returncode != 0:
            raise DemoError(f"launch failed:\n{output.read_text(errors='replace').strip()}\n(server log: {self.log})")
        say(f"model {MODEL_UID!r} is ready after {waited:.0f}s")

    def runtime_metrics(self) -> dict[str, Any] | None:
        """sglite's runtime metrics of the demo model, or None (said) if they cannot be read."""
        try:
            from ...serving.metrics import get_runtime_metrics

            return get_runtime_metrics(self.endpoint, MODEL_UID, timeout=30)
        except Exception as e:  # noqa: BLE001 (informative only: the demo goes on without them)
            say(f"(runtime metrics unavailable: {e})")
            return None

    def serve_until_interrupted(self) -> None:
        """Block until Ctrl-C (or SIGTERM); an exit of the server on its own is an error."""
        say("serving; press Ctrl-C to stop")
        with contextlib.suppress(KeyboardInterrupt):
            while self.process is not None and self.process.poll() is None:
                time.sleep(1)
        if self.process is not None and self.process.poll() is not None:
            raise DemoError(f"xinference-local exited with code {self.process.returncode}; see {self.log}")

    def shutdown(self) -> None:
        """Terminate the model and the server (the whole process group) and remove the temporary home."""
        if self.process is not None and self.process.poll() is None:
            say("shutting down: terminating the model and Xinference ...")
            with contextlib.suppress(Exception):
                self.http("DELETE", f"/v1/models/{MODEL_UID}", timeout=60, quiet=True)
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, sig)
                try:
                    self.process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # model processes left in the group
        self.process = None
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None
            say("done")

    def http(
        self, method: str, path: str, body: Any = None, timeout: float = 120, quiet: bool = False
    ) -> tuple[int, Any]:
        """(status, decoded JSON or text) of one REST call; HTTP errors are returned, connection errors raised
        (or returned as status 0 when ``quiet``)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.endpoint + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except OSError:
            if quiet:
                return 0, None
            raise
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def _serves(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise DemoError(f"xinference-local exited with code {self.process.returncode}; see {self.log}")
        return self.http("GET", "/v1/models", timeout=5, quiet=True)[0] == 200

    def _launch_progress(self, elapsed: float) -> str:
        # torch holds a `lock` file in an extension's build folder while it compiles it (and the model process
        # waits on that lock if another process builds the same source), so its presence says what the wait is.
        building = sorted(p.parent.name for p in Path(self.env["TORCH_EXTENSIONS_DIR"]).glob("sglite_*/lock"))
        if building:
            return (f"still launching ({elapsed:.0f}s): building sglite's C++ CPU kernels ({', '.join(building)}), "
                    "once per source change, 1-3 min")
        return f"still launching ({elapsed:.0f}s): the model process loads the checkpoint"

    def _env(self) -> dict[str, str]:
        from torch.utils.cpp_extension import get_default_build_root

        env = dict(os.environ)
        # Xinference points XDG_CACHE_HOME into its XINFERENCE_HOME, which is fresh for every demo run: without a
        # fixed TORCH_EXTENSIONS_DIR each run would build sglite's C++ CPU kernels again (1-3 min).
        env.setdefault("TORCH_EXTENSIONS_DIR", get_default_build_root())
        env.update(
            XINFERENCE_HOME=str(self.home),
            XINFERENCE_AUTH_ADVANCED="0",  # a local demo: no login (Xinference 4.x turns auth on by default)
            HF_HUB_OFFLINE="1",  # the demo needs no model hub
            TRANSFORMERS_OFFLINE="1",
            PYTHONUNBUFFERED="1",  # the log is current when a failure message points at it
        )
        return env
