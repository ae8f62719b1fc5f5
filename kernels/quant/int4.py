"""AWQ / GPTQ linears on the GPU: a Triton GEMM that dequantizes the packed weights in its K loop, and a GEMV on
CUDA cores for decode.

The weights are read in their checkpoint layouts (reference.py's docstring), with no repacking at load: AWQ's
``[K, N/8]`` tiles are unpacked along N in its interleaved order, GPTQ's ``[K/p, N]`` tiles along K. Each K step
loads ``[BLOCK_K, BLOCK_N]`` packed integers, the group's scales and zeros, makes ``(q - z) * s`` in float32, casts
it to x's dtype and feeds ``tl.dot`` (float32 accumulator). When the group size is a multiple of ``BLOCK_K`` a step
lies in one group and reads one row of scales and zeros (``GROUP_PER_TILE``); otherwise (small groups, or
act-order ``g_idx`` with ``HAS_GIDX``) each K row gathers its group's scales and zeros, which stay in L1 / L2.
With ``GEMV_MAX_M`` or fewer rows (act-order, or M of 5-8) it runs as a skinny GEMM: one 16-row tile and split K.

Decode, M <= ``INT_GEMV_MAX_M`` (4), no act-order: the CUDA-core GEMV of int_gemv.py (its docstring says why).
"""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from ..activation import silu_and_mul
from ..pdl import pdl_kwargs
from .config import INT_GEMV_MAX_M, get_quant_config
from .int_gemv import _int_gemv, int_gemv_supported
from .reference import gptq_bits, resolve_group
from .splitk import split_k_buffers

if triton is not None:
    from ..pdl import pdl_wait
    from .splitk import split_k_store

    @triton.jit
    def _unpack_weights(QW, k0, n0, K, N, sqw, AWQ: tl.constexpr, BITS: tl.constexpr, EVEN_K: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """The ``[BLOCK_K, BLOCK_N]`` unsigned integers of rows ``k0..`` and columns ``n0..`` (int32)."""
        PACK: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        j = tl.arange(0, PACK)
        if AWQ:  # [K, N/8]: each int32 holds 8 columns of one row, column c at nibble (c // 2) + 4 * (c % 2)
            rows = k0 + tl.arange(0, BLOCK_K)
            pc = n0 // PACK + tl.arange(0, BLOCK_N // PACK)
            mask = (pc < N // PACK)[None, :]
            if not EVEN_K:
                mask = mask & (rows < K)[:, None]
            packed = tl.load(QW + rows.to(tl.int64)[:, None] * sqw + pc[None, :], mask=mask, other=0)
            shifts = BITS * ((j // 2) + (j % 2) * 4)
            q = (packed[:, :, None] >> shifts[None, None, :]) & MASK
        else:  # [K/p, N]: each int32 holds p consecutive rows of one column, row k0 + i at bits BITS * (i % p)
            pr = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
            cols = n0 + tl.arange(0, BLOCK_N)
            mask = (cols < N)[None, :]
            if not EVEN_K:
                mask = mask & (pr < K // PACK)[:, None]
            packed = tl.load(QW + pr.to(tl.int64)[:, None] * sqw + cols[None, :], mask=mask, other=0)
            q = (packed[:, None, :] >> (BITS * j)[None, :, None]) & MASK
        return tl.reshape(q, (BLOCK_K, BLOCK_N))

    @triton.jit
    def _dequant_tile(QW, SC, QZ, GIDX, k0, n0, K, N, group, sqw, ssc, sqz,
                      AWQ: tl.constexpr, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_GIDX: tl.constexpr,
                      GROUP_PER_TILE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr):
        """``(q - z) * s`` in float32 for the ``[BLOCK_K, BLOCK_N]`` tile at (k0, n0)."""
        PACK: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        q = _unpack_weights(QW, k0, n0, K, N, sqw, AWQ, BITS, EVEN_K, BLOCK_K, BLOCK_N)
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        c = cols % PACK
        zshift = BITS * ((c // 2) + (c % 2) * 4) if AWQ else BITS * c  # zeros are packed along N in both formats
        if GROUP_PER_TILE:
            grp = k0 // group  # one group for the whole step: one row of scales and zeros
            s = tl.load(SC + grp * ssc + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            zq = tl.load(QZ + grp * sqz + cols // PACK, mask=col_ok, other=0)
            z = (((zq >> zshift) & MASK) + ZERO_OFFSET)[None, :]
        else:
            rows = tl.minimum(k0 + tl.arange(0, BLOCK_K), K - 1)
            grp = tl.load(GIDX + rows) if HAS_GIDX else rows // group
            grp = grp.to(tl.int64)[:, None]
            s = tl.load(SC + grp * ssc + cols[None, :], mask=col_ok[None, :], other=0.0).to(tl.float32)
            zq = tl.load(QZ + grp * sqz + (cols // PACK)[None, :], mask=col_ok[None, :], other=0)
            z = ((zq >> zshift[None, :]) & MASK) + ZERO_OFFSET
        return (q - z).to(tl.float32) * s

    @triton.jit
    def _int4_gemm_kernel(
        X, QW, SC, QZ, GIDX, BIAS, Y, WS, LOCKS,
        M, N, K, group, k_per_split,
        sx_m, sqw, ssc, sqz, sy_m,
        AWQ: tl.constexpr, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_GIDX: tl.constexpr,
        GROUP_PER_TILE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        # Y = X @ dequant(W); program_id(1) is the split of K, summed by split_k_store.
        pdl_wait(USE_PDL)
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        blocks_m = tl.cdiv(M, BLOCK_M)
        blocks_n = tl.cdiv(N, BLOCK_N)
        # Grouped order: GROUP_M row blocks sweep the column blocks together, so their weight tiles stay in L2.
        per_group = GROUP_M * blocks_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        n0 = ((pid % per_group) // group_rows) * BLOCK_N
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        k_start = pid_k * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        x_ptr = X + offs_m.to(tl.int64)[:, None] * sx_m + (k_start + offs_k)[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            # Padded rows (M < BLOCK_M at decode) are zeros; their outputs are never stored.
            if EVEN_K:
                x = tl.load(x_ptr, mask=mask_m[:, None], other=0.0)
            else:
                x = tl.load(x_ptr, mask=mask_m[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
            w = _dequant_tile(QW, SC, QZ, GIDX, k0, n0, K, N, group, sqw, ssc, sqz, AWQ, BITS, ZERO_OFFSET,
                              HAS_GIDX, GROUP_PER_TILE, EVEN_K, BLOCK_K, BLOCK_N)
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
            x_ptr += BLOCK_K
        split_k_store(acc, Y, WS, LOCKS, BIAS, M, N, offs_m[:, None], offs_n[None, :], sy_m, 1, SPLIT, HAS_BIAS, False)


def int4_shapes(x: torch.Tensor, qweight: torch.Tensor, fmt: str) -> tuple[int, int, int]:
    """``(bits, N, K)`` of a call, read from x and the packed weight; ValueError if they do not fit."""
    k = x.shape[-1]
    if fmt == "awq":
        if qweight.shape[0] != k:
            raise ValueError(f"AWQ qweight {tuple(qweight.shape)} does not fit K={k}")
        return 4, qweight.shape[1] * 8, k
    if fmt == "gptq":
        return gptq_bits(qweight, k), qweight.shape[1], k
    raise ValueError(f"unknown int4 format {fmt!r}; expected 'awq' or 'gptq'")


def int4_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                       g_idx: torch.Tensor | None, fmt: str, group_size: int, bias: torch.Tensor | None = None, *,
                       config: dict[str, int] | None = None, gemv: bool | None = None,
                       silu_mul: bool = False) -> torch.Tensor:
    """Triton launcher with the contract of ``int4_linear_ref`` (checkpoint layouts, no repacking). For GPTQ pass
    ``g_idx=None`` when it is ``k // group_size`` (``trivial_g_idx``): a given g_idx takes the per-row gather
    path. Up to ``INT_GEMV_MAX_M`` rows the CUDA-core GEMV runs (launch-config kind ``awq_gemv`` / ``gptq_gemv``),
    unless act-order; otherwise the ``tl.dot`` kernel (kind ``int4``). ``gemv`` forces the choice (True is an error
    where the GEMV does not apply); ``config`` overrides ``get_quant_config`` for the kernel chosen (the tuner passes
    each candidate). ``silu_mul``: SiLU-and-mul of the result's halves, ``[..., N / 2]`` (in the GEMV's epilogue)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use int4_linear_ref")
    bits, n, k = int4_shapes(x, qweight, fmt)
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if not (qweight.is_contiguous() and scales.is_contiguous() and qzeros.is_contiguous()):
        raise ValueError("qweight, scales and qzeros must be contiguous")
    group = resolve_group(group_size, k)
    has_gidx = fmt == "gptq" and g_idx is not None
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*x.shape[:-1], n // 2 if silu_mul else n))
    supported = int_gemv_supported(fmt, bits, group, k, has_gidx)
    if gemv and not supported:
        raise ValueError(f"the int GEMV does not take {fmt} with group size {group_size}"
                         f"{' and act-order g_idx' if has_gidx else ''}")
    if supported and (m <= INT_GEMV_MAX_M if gemv is None else gemv):
        cfg = config or get_quant_config(f"{fmt}_gemv", n, k, m, x.dtype, x.device)
        out = torch.empty((m, n // 2 if silu_mul else n), dtype=x.dtype, device=x.device)
        _int_gemv(x2, qweight, scales, qzeros, fmt, bits, group, bias, out, cfg, silu_mul)
        return out.view(*x.shape[:-1], out.shape[1])
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _int4_gemm(x2, qweight, scales, qzeros, g_idx if has_gidx else None, fmt, bits, group, bias, out,
               config or get_quant_config("int4", n, k, m, x.dtype, x.device))
    out = out.view(*x.shape[:-1], n)
    return silu_and_mul(out) if silu_mul else out


def _int4_gemm(x2, qweight, scales, qzeros, g_idx, fmt: str, bits: int, group: int, bias, out, cfg: dict) -> None:
    """``_int4_gemm_kernel`` (split K when the config says so, summed in the kernel: splitk.py) into ``out``."""
    (m, k), n = x2.shape, out.shape[1]
    bm, bn, bk = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    k_per_split = triton.cdiv(triton.cdiv(k, max(1, cfg["SPLIT_K"])), bk) * bk
    split = triton.cdiv(k, k_per_split)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    ws, locks = split_k_buffers(out, split, tiles)
    _int4_gemm_kernel[(tiles, split)](
        x2, qweight, scales, qzeros, g_idx if g_idx is not None else qweight, bias if bias is not None else out,
        out, ws, locks, m, n, k, group, k_per_split,
        x2.stride(0), qweight.stride(0), scales.stride(0), qzeros.stride(0), out.stride(0),
        AWQ=fmt == "awq", BITS=bits, ZERO_OFFSET=1 if fmt == "gptq" else 0, HAS_GIDX=g_idx is not None,
        GROUP_PER_TILE=g_idx is None and group % bk == 0, HAS_BIAS=bias is not None, EVEN_K=k % bk == 0,
        SPLIT=split, DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_SIZE_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_kwargs(x2.device),
    )


def trivial_g_idx(g_idx: torch.Tensor | None, group_size: int) -> bool:
    """Whether a GPTQ ``g_idx`` says nothing beyond ``k // group_size`` (no act-order), so that the runtime can
    pass None and take the faster path. Reads the tensor (a device sync): call once at load."""
    if g_idx is None:
        return True
    k = g_idx.numel()
    expected = torch.arange(k, device=g_idx.device) // resolve_group(group_size, k)
    return bool(torch.equal(g_idx.to(expected.dtype), expected))
