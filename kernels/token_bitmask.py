"""Apply a packed token bitmask (constrained decoding) to logits: disallowed tokens get -inf.

Mask layout (the one grammar backends such as llguidance fill): ``bitmask [B, ceil(V / 32)]`` int32, bit ``j``
(little-endian, bit 0 = least significant) of word ``w`` covers token ``32 * w + j``; a set bit allows the token.
An all-ones row (every word -1) allows everything, which is how unconstrained rows are reset each step.
"""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None


def _check(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a 2-D float tensor [B, V], got {tuple(logits.shape)} {logits.dtype}")
    if bitmask.dim() != 2 or bitmask.dtype != torch.int32:
        raise ValueError(f"bitmask must be a 2-D int32 tensor [B, ceil(V/32)], got {tuple(bitmask.shape)} {bitmask.dtype}")
    words = (logits.shape[1] + 31) // 32
    if bitmask.shape[0] != logits.shape[0] or bitmask.shape[1] < words:
        raise ValueError(
            f"bitmask {tuple(bitmask.shape)} does not cover logits {tuple(logits.shape)}: need [{logits.shape[0]}, >={words}]"
        )
    if bitmask.device != logits.device:
        raise ValueError(f"bitmask is on {bitmask.device}, logits on {logits.device}")


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """In place: ``logits[b, t] = -inf`` wherever bit ``t`` of row b of ``bitmask`` is 0; returns ``logits``.

    ``logits [B, V]`` float, ``bitmask [B, W]`` int32 with ``W >= ceil(V / 32)`` (words past the vocab are ignored).
    """
    _check(logits, bitmask)
    v = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    # Arithmetic shift keeps the sign bit in place, so bit 31 reads correctly with "& 1".
    bits = (bitmask[:, :, None] >> shifts) & 1  # [B, W, 32]
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :v].bool()
    return logits.masked_fill_(~allowed, float("-inf"))


if triton is not None:

    @triton.jit
    def _apply_token_bitmask_kernel(LOGITS, BITMASK, s_l, s_m, vocab, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_vocab = offs < vocab
        # One word covers 32 neighbouring tokens: the load repeats addresses, which the cache serves.
        words = tl.load(BITMASK + row * s_m + offs // 32, mask=in_vocab, other=-1)
        banned = ((words >> (offs % 32)) & 1) == 0
        # Write only the banned entries: allowed logits are never touched (no read of logits at all).
        neg_inf = tl.full([BLOCK], float("-inf"), LOGITS.dtype.element_ty)
        tl.store(LOGITS + row * s_l + offs, neg_inf, mask=in_vocab & banned)


def apply_token_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Triton launcher with the contract of ``apply_token_bitmask_ref`` (in place, returns ``logits``).

    ``logits`` must have a contiguous last dim; ``block`` (a power of two) is the number of tokens per program.
    """
    if triton is None:
        raise RuntimeError("triton is not installed; use apply_token_bitmask_ref")
    _check(logits, bitmask)
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous in the last dim (they are written in place)")
    bitmask = bitmask if bitmask.stride(-1) == 1 else bitmask.contiguous()
    b, v = logits.shape
    if b == 0 or v == 0:
        return logits
    grid = (b, triton.cdiv(v, block))
    _apply_token_bitmask_kernel[grid](logits, bitmask, logits.stride(0), bitmask.stride(0), v, BLOCK=block, num_warps=4)
    return logits


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Dispatching in-place bitmask apply: Triton for CUDA logits with a contiguous last dim when triton is
    installed, the reference elsewhere. ``logits [B, V]`` float, ``bitmask [B, >=ceil(V/32)]`` int32 on the same device; returns ``logits``."""
    if logits.is_cuda and triton is not None and logits.stride(-1) == 1:
        return apply_token_bitmask_triton(logits, bitmask)
    return apply_token_bitmask_ref(logits, bitmask)
