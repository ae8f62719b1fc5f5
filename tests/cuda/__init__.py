"""The GPU tier: Triton kernels at real shapes and dtypes, greedy parity with HF transformers on the same GPU,
logprobs, n > 1, CUDA graphs, SmolLM2, and tensor parallelism over 2 GPUs. Every test here is marked ``cuda``; a GPU
user runs ``pytest -m cuda`` (or ``pytest tests/cuda``), as its own run: Triton chooses between its CPU interpreter
(the CPU tier's kernel tests) and the GPU compiler once per process, and tests/conftest.py leaves the interpreter
off only for a run of this tier. Without a GPU each module skips itself when it is collected, before it imports
anything that needs CUDA.

On a machine without network access (the GPU device machines), scripts/prepare_offline_wheels.py prepares what
these tests need: sglite's wheel, pydantic / llguidance / gguf, and the SmolLM2 GGUF of the ``smollm2`` fixture.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

LLAMA_3_1_8B = Path(__file__).resolve().parents[2] / "configs" / "llama-3.1-8b.json"


def require_gpus(count: int = 1) -> None:
    """Skip the calling test module, at its import, unless ``count`` CUDA devices are there and Triton compiles
    for them (not interpreted: a run that mixes this tier with the CPU tier has TRITON_INTERPRET=1)."""
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU: torch.cuda.is_available() is False", allow_module_level=True)
    if torch.cuda.device_count() < count:
        pytest.skip(f"needs {count} GPUs, this machine has {torch.cuda.device_count()}", allow_module_level=True)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("Triton runs interpreted in this run (TRITON_INTERPRET=1, for the CPU tier's kernel tests); run "
                    "the GPU tier on its own: pytest -m cuda", allow_module_level=True)


def randn(*size: int, dtype: torch.dtype, scale: float = 1.0, device: torch.device | str = "cuda") -> torch.Tensor:
    """Standard normal values on the GPU, drawn in float32 and cast (the same numbers in every dtype)."""
    return (torch.randn(*size, device=device) * scale).to(dtype)


def uses_graphs(engine) -> bool:
    """Whether the engine decodes as CUDA-graph replays (its model runner holds captured graphs)."""
    return engine.run_on_scheduler(lambda scheduler: scheduler.runner.graphs is not None)
