"""Loading a model allocates its weights in the target dtype, not a float32 copy first: built in float32 and cast
after, a bfloat16 model needed three times its weights at once (Qwen3-30B-A3B's 61 GB of weights ran an 80 GB H100
out of memory at construction, 2026-12-07). Checked by recording every tensor torch allocates during `load_model`
(a dispatch mode sees each ``aten.empty*`` call): resident memory on the CPU would not show it, since untouched
pages of a float32 ``empty`` are never mapped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xinf_sglang.runtime.model_loader.checkpoint import open_checkpoint
from xinf_sglang.runtime.model_loader.loader import load_model

CONFIGS = Path(__file__).parent.parent / "configs" / "cpu"


class Allocations(TorchDispatchMode):
    """Bytes of the tensors created by ``aten.empty*`` calls, per dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith("empty") and isinstance(out, torch.Tensor):
            self.bytes[out.dtype] = self.bytes.get(out.dtype, 0) + out.numel() * out.element_size()
        return out


@pytest.mark.parametrize("config", ["dense-same-active", "moe-32x2"])
def test_weights_are_allocated_in_the_target_dtype(tmp_path: Path, config: str) -> None:
    (tmp_path / "config.json").write_text((CONFIGS / f"{config}.json").read_text())
    with Allocations() as seen:
        model = load_model(open_checkpoint(str(tmp_path)), torch.bfloat16, torch.device("cpu"), "dummy")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert seen.bytes.get(torch.bfloat16, 0) >= weights
    assert seen.bytes.get(torch.float32, 0) < 0.05 * weights, seen.bytes  # rope tables and such, never weights
