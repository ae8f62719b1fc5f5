"""sglite's embedded runtime: continuous batching on a token-level KV pool with a radix prefix cache.

Public API: ``Engine``, ``EngineConfig``, ``SamplingParams`` (and the output types in ``engine.outputs``). Names are
loaded on first use, so importing a light submodule (``xinf_sglang.runtime.config``) does not import torch.
"""

from __future__ import annotations

from .lazy_exports import lazy_getattr

# public name -> submodule that defines it
_EXPORTS = {
    "ConfigError": "errors",
    "Engine": "engine.engine",
    "EngineConfig": "config",
    "GenerateOutput": "engine.outputs",
    "InvalidRequestError": "errors",
    "SamplingParams": "sampling.sampling_params",
    "StreamChunk": "engine.outputs",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
