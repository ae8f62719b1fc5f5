"""Linear layers on the CPU over weights pre-packed once for oneDNN: ``y = x @ W^T (+ bias)`` in bfloat16 (float16
where oneDNN has it on this CPU).

``F.linear`` in bfloat16 runs oneDNN's brgemm on a row-major ``W [N, K]``, and every call re-packs the weight into
the blocked layout the micro-kernel reads (``copy_b_chunk_in_buffer`` in a profile). Packing each weight once
(``torch.ops.mkldnn._reorder_linear_weight``, the path torch's inductor freezing uses) and calling
``torch.ops.mkldnn._linear_pointwise`` skips that copy. Measured on the 2-core AVX-512 BF16 machine
(2026-12-07), SmolLM2-135M's 120 decoder weights of one step, 30 distinct layers (cold in the caches), 2 threads,
min of 7: 14.3 ms at 40 rows against ``F.linear``'s ~19, 20.5 at 64 rows against ~28, 6.2 at one row against
``F.linear``'s ~11 and the skinny bf16 GEMV's (``linear16.py``) ~7. The packed tensor replaces the row-major one
(an MKLDNN-layout tensor, ``weight.is_mkldnn``), so memory does not grow and the skinny GEMV no longer applies.

The result equals ``F.linear`` on the row-major weight bit for bit (same oneDNN kernel, same reduction order; the
tests check it on random inputs for many row counts). float32 is not packed: ``F.linear`` runs MKL's sgemm there,
whose sums differ from oneDNN's in the last bits.
"""

from __future__ import annotations

import functools

import torch

DTYPES = (torch.bfloat16, torch.float16)
# The row count oneDNN is told to expect when packing (a layout hint only): 1, 16, 64 and 256 gave the same
# times within 5% at 1-128 rows.
BATCH_HINT = 64


@functools.cache
def unavailable_reason(dtype: torch.dtype) -> str | None:
    """Why weights of ``dtype`` cannot be packed on this machine (None: they can)."""
    if dtype not in DTYPES:
        return f"{str(dtype).removeprefix('torch.')} weights are not packed (only bfloat16 / float16)"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    mkldnn = torch.ops.mkldnn
    if not hasattr(mkldnn, "_reorder_linear_weight") or not hasattr(mkldnn, "_linear_pointwise"):
        return "this torch build lacks torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise"
    supported = mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else mkldnn._is_mkldnn_fp16_supported()
    if not supported:
        return f"oneDNN has no {str(dtype).removeprefix('torch.')} matmul on this CPU"
    return None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` (CPU, a dtype that `unavailable_reason` accepts) in oneDNN's blocked layout, as an
    MKLDNN tensor for `linear_packed`. Raises ValueError for anything else."""
    reason = unavailable_reason(weight.dtype)
    if reason is not None or weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError(f"cannot pack {tuple(weight.shape)} {weight.dtype} on {weight.device}: "
                         f"{reason or 'needs a 2-D CPU tensor'}")
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)


def is_packed(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a `pack_weight` result (the dispatcher's test)."""
    return weight.is_mkldnn


def linear_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for ``packed = pack_weight(W)``: ``x [..., K]`` of W's dtype -> ``[..., N]``."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
