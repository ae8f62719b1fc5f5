"""Fixtures of the GPU tier (tests/cuda/__init__.py says how it runs)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from . import LLAMA_3_1_8B


@pytest.fixture(autouse=True)
def _exact_float32_references() -> Iterator[None]:
    """The torch references (and HF's float32 reference models) run true float32 matmuls: TF32 would round their
    inputs to 10 mantissa bits and the comparisons would measure that instead of the kernels."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="session")
def shape():
    """Llama-3.1-8B's kernel shapes (configs/llama-3.1-8b.json): hidden 4096, 32 query / 8 KV heads of 128,
    intermediate 14336, vocabulary 128256, Llama 3.1's rotary scaling."""
    from xinf_sglang.runtime.bench.layer_chain import KernelShape

    return KernelShape.from_config(LLAMA_3_1_8B)
