"""sglite's embedded runtime: continuous batching on a token-level KV pool with a radix prefix cache.

Public API: ``Engine``, ``EngineConfig``, ``SamplingParams`` (and the output types in ``outputs``).
"""

from .config import EngineConfig
from .engine import Engine
from .errors import ConfigError, InvalidRequestError
from .outputs import GenerateOutput, StreamChunk
from .sampling_params import SamplingParams

__all__ = [
    "ConfigError",
    "Engine",
    "EngineConfig",
    "GenerateOutput",
    "InvalidRequestError",
    "SamplingParams",
    "StreamChunk",
]
