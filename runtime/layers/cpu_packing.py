"""Pack a CPU model's dense linear weights once, at engine start, into oneDNN's blocked layout
(``kernels/cpu/packed_linear.py``): every later ``kernels.linear`` call on them skips oneDNN's per-call re-pack.

Each packed weight replaces the row-major parameter (same bytes; the row-major tensor is freed as soon as it is
packed), so weights take no more memory. Outputs equal ``F.linear`` on the row-major weights bit for bit.
Packed: the projections of the decoder blocks (QKV, merged gate/up, row-parallel) and an untied LM head, when
their weights are dense bfloat16 (float16 where oneDNN has it on this CPU). Not packed: float32 (MKL's sums
differ from oneDNN's), quantized formats, a tied LM head (the embedding lookups read the same row-major table),
and the MoE router (read as a dense tensor elsewhere).

Off unless ``SGLITE_CPU_PACK_LINEARS=1`` is in the environment; the startup log says which. Measured in the engine
(2026-12-07, 2-core AVX-512 BF16 VM, SmolLM2-135M bf16, ``sglite bench decode``, interleaved, median of 3): batch 40
54.6 -> 52.8 ms per step, but batch 1 12.8 -> 18.7 ms, since the packed weight replaces the row-major one that the
skinny GEMV for <= 16 rows reads (oneDNN pays its thread team's fork/join on each of ~200 small calls per step).
Keeping both layouts would double the weights' memory; a GEMV over oneDNN's blocked layout would make it pay.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from xinf_sglang.kernels.cpu import packed_linear

from .embedding import ParallelLMHead
from .linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from .quantization.base import UnquantizedLinearMethod

ENV_SWITCH = "SGLITE_CPU_PACK_LINEARS"
_PACKED_TYPES = (QKVParallelLinear, MergedColumnParallelLinear, RowParallelLinear)


def _candidates(model: nn.Module) -> list[nn.Module]:
    """The modules whose ``weight`` may be packed (see the module docstring)."""
    found = []
    for module in model.modules():
        if isinstance(module, _PACKED_TYPES) and isinstance(module.quant_method, UnquantizedLinearMethod):
            found.append(module)
        elif type(module) is ParallelLMHead and module.qtype is None:
            found.append(module)
    return found


def pack_cpu_linears(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    """Pack ``model``'s eligible weights in place when the model runs on the CPU; return the startup-log line that
    says what was packed, or why nothing was."""
    if device.type != "cpu":
        return "not on the CPU"
    if os.environ.get(ENV_SWITCH, "0") != "1":
        return (f"row-major (packing for oneDNN is off: {ENV_SWITCH}=1 turns it on, faster from ~40 rows, slower "
                "at <= 16)")
    reason = packed_linear.unavailable_reason(dtype)
    if reason is not None:
        return f"none ({reason})"
    modules = [m for m in _candidates(model) if m.weight.device.type == "cpu" and m.weight.dtype == dtype]
    nbytes = 0
    for module in modules:
        weight = module.weight
        nbytes += weight.numel() * weight.element_size()
        packed = nn.Parameter(packed_linear.pack_weight(weight.data), requires_grad=False)
        for attr in ("param_layout", "keeps_dtype"):  # what the loaders and the cast look up on a parameter
            if hasattr(weight, attr):
                setattr(packed, attr, getattr(weight, attr))
        module.weight = packed
        del weight  # the row-major copy goes now, before the next one is packed: no second set of weights
    return f"{len(modules)} dense weights ({nbytes / 2**20:.0f} MiB) packed for oneDNN"
