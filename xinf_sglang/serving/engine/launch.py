"""Loading: the runtime ``Engine`` of one model process, built from its validated launch options.

Runs in the model subprocess (``SgliteModel.load``). torch and the runtime are imported in the functions: the
worker and the supervisor import the engine classes too (to match families) and never need them.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import TYPE_CHECKING, Any, Dict, Tuple, Union

from ...registration.engine_name import ENGINE_NAME
from ...registration.matching import GGUF_FORMAT, gguf_file
from ..launch_options import LaunchOptions, to_engine_config

if TYPE_CHECKING:
    from ...runtime import Engine

logger = logging.getLogger(__name__)

RUNTIME_LIBS = ("torch", "transformers", "safetensors")


def check_lib() -> Union[bool, Tuple[bool, str]]:
    """Whether the runtime's dependencies are importable (checked without importing torch)."""
    missing = [m for m in RUNTIME_LIBS if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"{ENGINE_NAME} needs {', '.join(missing)}; reinstall xinf-sglang"
    return True


def checkpoint_path(model_path: str, spec: Any) -> str:
    """What the runtime opens: the model folder, or for ``ggufv2`` the spec's GGUF file in it."""
    if spec.model_format == GGUF_FORMAT:
        return gguf_file(model_path, spec)
    return model_path


def launch_engine(options: LaunchOptions, checkpoint: str, replica_uid: str, labels: Dict[str, str]) -> "Engine":
    """The runtime engine for ``checkpoint`` (logged as ``replica_uid``, its series labelled ``labels``);
    ``device=auto`` picks CUDA when available. A configuration the
    runtime refuses (weights that do not fit, a bad option combination) is a ``ValueError``: a failed launch."""
    import torch

    from ...runtime import Engine
    from ...runtime.errors import ConfigError

    if options.device == "auto":
        options = options.model_copy(update={"device": "cuda" if torch.cuda.is_available() else "cpu"})
    started = time.monotonic()
    try:
        engine = Engine(to_engine_config(options, checkpoint), metric_labels=labels)
    except ConfigError as e:
        raise ValueError(f"{ENGINE_NAME} cannot load {checkpoint}: {e}") from None
    if engine.metrics_endpoint is not None:
        logger.info("%s: %s serves Prometheus metrics at %s", ENGINE_NAME, replica_uid, engine.metrics_endpoint.url)
    logger.info("%s: %s loaded on %s in %.1fs, context_length=%d", ENGINE_NAME, replica_uid, options.device,
                time.monotonic() - started, int(engine.context_length))
    return engine
