"""FP8 linears on the GPU (W8A8): dynamic per-token-group quantization of the activations, then one Triton GEMM of
the two FP8 operands accumulating in float32 (the DeepSeek-V3 / SGLang ``w8a8_block_fp8_matmul`` algorithm).

Block-scaled weights (``weight_scale_inv [ceil(N/bn), ceil(K/bk)]``): x is quantized per row and group of ``bk``
columns, so each K step of ``BLOCK_K = bk`` (or a divisor of it) has one activation scale per row and one weight
scale per column: ``acc += dot(a, b) * a_scale[:, None] * b_scale[None, :]``. Per-channel weights: x is quantized
per row over all of K, the raw dot accumulates, and both scales are applied once at the end (``SCALE_AT_END``).
``fp8_channel_linear_triton`` prefers ``torch._scaled_mm`` (cuBLASLt / CUTLASS row-wise scaling) where it exists.

The quantization kernel encodes the e4m3 bytes itself (``_e4m3_code``, integer operations with one rounding) and
stores them through a uint8 view: Triton's CPU interpreter rounds fp32 -> fp8 wrongly (no mantissa carry: 127.3
becomes 64), and an earlier round-then-cast version rounded subnormals twice and lost the sign of negative values
that round to zero (3 codes of 917,504 differed from torch's cast on an H100, 2026-12-07). The codes equal torch's
round-to-nearest-even cast bit for bit; the few integer operations hide under the memory traffic.

Decode, M <= ``FP8_GEMV_MAX_M`` (4): ``_fp8_gemv_kernel``, weight-only (W8A16). At M = 1 the W8A8 path is two
launches (the quantization kernel, then a GEMM whose ``tl.dot`` tile pads M to 16) for a call that should take
~1.5 us at qkv's 6 MB; it measured 47-58% of the 1-byte roofline. The GEMV reads x as it is and converts each
weight on CUDA cores: one ``cvt`` per two e4m3 values to f16x2, one per value to float32, one FMA per row of x
(~4-5 instructions per weight in the sm_90 SASS, against ~13 weights per clock and SM the bandwidth asks: half
the issue rate). Tiles are ``[BLOCK_N, BLOCK_K / 16, 16]``: 16 contiguous bytes per thread, lanes along K; the 16
values of a thread are summed in registers and the partials accumulate elementwise (block scales applied per
step, the step inside one K block; per-channel scales once at the end), summed across threads after the loop;
split K through int4.py's deterministic reduce. 64-wide K steps keep x's load small enough for Triton to load it
in the product's layout (no shared-memory round trip in the loop). Accuracy is the reference's: x is not
rounded to FP8.
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
from .config import FP8_GEMV_MAX_M, get_quant_config
from .reference import FP8_DTYPE, FP8_EPS, FP8_MAX, channel_scale
from .splitk import glu_unfused, split_k_buffers

if triton is not None:
    from ..pdl import pdl_wait
    from .splitk import split_k_store

    # Globals a jit function reads must be constexpr.
    _FP8_MAX = tl.constexpr(FP8_MAX)
    _FP8_EPS = tl.constexpr(FP8_EPS)

    @triton.jit
    def _e4m3_code(v):
        """float32 ``v`` (|v| <= 448) -> its e4m3 byte (int32 0..255), rounded to nearest even with ONE rounding,
        all in integer / exact float operations, so the codes are the same under the interpreter and on any GPU.
        Normal range: keep 3 of the 23 mantissa bits (ties to even) and re-bias the exponent (127 -> 7). Below
        2**-6 e4m3 is subnormal with a step of 2**-9: ``a * 512`` is exact, and adding 2**23 rounds it to an
        integer in one IEEE rounding (the low bits of the sum are that integer; 8 is the smallest normal's code).
        The sign is the sign bit of ``v`` (so -0.0 and negatives rounding to zero give 0x80, as torch's cast)."""
        bits = v.to(tl.int32, bitcast=True)
        a = tl.abs(v)
        abits = a.to(tl.int32, bitcast=True)
        rounded = (abits + 0x7FFFF + ((abits >> 20) & 1)) & -0x100000
        normal = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)
        sub = (a * 512.0 + 8388608.0).to(tl.int32, bitcast=True) & 0xF
        code = tl.where(a < 0.015625, sub, normal)
        return tl.where(bits < 0, code | 0x80, code)

    @triton.jit
    def _group_quant_kernel(X, XQ, XS, K, sx_m, sq_m, ss_m, GROUP: tl.constexpr, BLOCK: tl.constexpr,
                            USE_PDL: tl.constexpr):
        # One program per (row, group of GROUP columns): scale = amax / 448, x_q = x / scale.
        pdl_wait(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        grp = tl.program_id(1)
        cols = grp * GROUP + tl.arange(0, BLOCK)
        mask = (tl.arange(0, BLOCK) < GROUP) & (cols < K)
        x = tl.load(X + row * sx_m + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), _FP8_EPS) / _FP8_MAX
        # IEEE division (``/`` is the fast approximate one on CUDA): the codes equal torch's at FP8 rounding ties.
        q = _e4m3_code(tl.clamp(tl.math.div_rn(x, scale), -_FP8_MAX, _FP8_MAX))
        tl.store(XQ + row * sq_m + cols, q.to(tl.uint8), mask=mask)  # XQ is the FP8 tensor viewed as bytes
        tl.store(XS + row * ss_m + grp, scale)

    @triton.jit
    def _fp8_gemm_kernel(
        A, AS, B, BS, BIAS, C,
        M, N, K,
        sa_m, sas_m, sb_n, sbs_n, sc_m,
        SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, SCALE_AT_END: tl.constexpr, HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        # C = (A * AS) @ (B * BS)^T: A [M, K] fp8 with AS [M, K/SCALE_K]; B [N, K] fp8 with BS [N/SCALE_N, K/SCALE_K]
        # (block mode) or BS [N] and AS [M, 1] (SCALE_AT_END).
        pdl_wait(USE_PDL)
        pid = tl.program_id(0)
        blocks_m = tl.cdiv(M, BLOCK_M)
        blocks_n = tl.cdiv(N, BLOCK_N)
        # Grouped order: GROUP_M row blocks sweep the column blocks together, so their weight tiles stay in L2.
        per_group = GROUP_M * blocks_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_rows
        pid_n = (pid % per_group) // group_rows
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        a_ptr = A + offs_m.to(tl.int64)[:, None] * sa_m + offs_k[None, :]
        b_ptr = B + offs_n.to(tl.int64)[None, :] * sb_n + offs_k[:, None]
        as_ptr = AS + offs_m.to(tl.int64) * sas_m
        bs_ptr = BS + (tl.minimum(offs_n, N - 1) // SCALE_N) * sbs_n
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptr, mask=mask_m[:, None], other=0.0)
                b = tl.load(b_ptr, mask=mask_n[None, :], other=0.0)
            else:
                k_ok = offs_k < K - k0
                a = tl.load(a_ptr, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptr, mask=k_ok[:, None] & mask_n[None, :], other=0.0)
            if SCALE_AT_END:
                acc = tl.dot(a, b, acc)
            else:
                # BLOCK_K divides SCALE_K: the whole step shares one scale group along K.
                a_s = tl.load(as_ptr + k0 // SCALE_K, mask=mask_m, other=0.0)
                b_s = tl.load(bs_ptr + k0 // SCALE_K)
                acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            a_ptr += BLOCK_K
            b_ptr += BLOCK_K
        if SCALE_AT_END:
            acc *= tl.load(as_ptr, mask=mask_m, other=0.0)[:, None] * tl.load(bs_ptr)[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        c_ptr = C + offs_m.to(tl.int64)[:, None] * sc_m + offs_n[None, :]
        tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


    @triton.jit
    def _fp8_gemv_kernel(
        X, W, WS, BIAS, Y, PARTS, LOCKS,
        M, N, K, k_per_split,
        sx_m, sw_n, sws_n, sy_m, glu_tiles,
        SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, SCALE_AT_END: tl.constexpr, HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, SPLIT: tl.constexpr, GLU: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        # Y[split, :M, columns] (or Y) = X[:M, K range] @ (W * scale)[columns, K range]^T, weight-only: x stays in
        # its dtype, each FP8 weight becomes float32 (cvt e4m3x2 -> f16x2 -> f32) and meets x in one FMA. A step
        # is a [1, BLOCK_N, BLOCK_K / 16, 16] tile: 16 contiguous bytes per thread (one 16-byte load), lanes along
        # K, then along N; the 16 values of a thread are summed in registers and the [BLOCK_N, BLOCK_K / 16]
        # partials accumulate elementwise, scaled per step by the weight's K block (block scales) or once at
        # the end (per channel); the one cross-thread reduction is after the loop.
        pdl_wait(USE_PDL)
        pid_k = tl.program_id(1)
        k_start = pid_k * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kk = tl.arange(0, BLOCK_K // 16)[:, None] * 16 + tl.arange(0, 16)[None, :]  # [BLOCK_K / 16, 16]
        w_ptr = W + offs_n.to(tl.int64)[None, :, None, None] * sw_n + (k_start + kk)[None, None, :, :]
        x_ptr = X + offs_m[:, None, None, None] * sx_m + (k_start + kk)[None, None, :, :]
        s_ptr = WS + (tl.minimum(offs_n, N - 1) // SCALE_N)[None, :, None] * sws_n  # [1, BLOCK_N, 1]
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K // 16], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptr, mask=mask_m[:, None, None, None], other=0.0)
                if EVEN_N:
                    w = tl.load(w_ptr)
                else:
                    w = tl.load(w_ptr, mask=mask_n[None, :, None, None], other=0.0)
            else:
                k_ok = (kk < K - k0)[None, None, :, :]
                x = tl.load(x_ptr, mask=mask_m[:, None, None, None] & k_ok, other=0.0)
                w = tl.load(w_ptr, mask=mask_n[None, :, None, None] & k_ok, other=0.0)
            part = tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=3)  # [M, N, BLOCK_K / 16]
            if SCALE_AT_END:
                acc += part
            else:  # BLOCK_K divides SCALE_K: the step lies in one K block
                acc += part * tl.load(s_ptr + k0 // SCALE_K)
            x_ptr += BLOCK_K
            w_ptr += BLOCK_K
        out = tl.sum(acc, axis=2)
        if SCALE_AT_END:
            out *= tl.load(WS + tl.minimum(offs_n, N - 1))[None, :]
        split_k_store(out, Y, PARTS, LOCKS, BIAS, M, N, offs_m[:, None], offs_n[None, :], sy_m, glu_tiles, SPLIT,
                      HAS_BIAS, GLU)


def fp8_quantize_per_token_group_triton(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher with the contract of ``fp8_quantize_per_token_group_ref``: ``x [M, K]`` (contiguous last
    dim) -> ``(x_q [M, K] float8_e4m3fn, scales [M, ceil(K/group_size)] float32)``."""
    if triton is None:
        raise RuntimeError("triton is not installed; use fp8_quantize_per_token_group_ref")
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    groups = triton.cdiv(k, group_size)
    xq = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    xs = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    if m > 0:
        block = triton.next_power_of_2(group_size)
        _group_quant_kernel[(m, groups)](
            x, xq.view(torch.uint8), xs, k, x.stride(0), xq.stride(0), xs.stride(0), GROUP=group_size, BLOCK=block,
            num_warps=max(1, min(8, block // 256)), **pdl_kwargs(x.device),
        )
    return xq, xs


def _launch_gemm(xq, xs, weight, ws, bias, out, scale_n: int, scale_k: int, at_end: bool, cfg: dict) -> None:
    m, k = xq.shape
    n = weight.shape[0]
    bm, bn, bk = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    if not at_end and scale_k % bk:
        raise ValueError(f"BLOCK_SIZE_K {bk} must divide the weight's K block {scale_k}")
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _fp8_gemm_kernel[grid](
        xq, xs, weight, ws, bias if bias is not None else out, out,
        m, n, k,
        xq.stride(0), xs.stride(0), weight.stride(0), ws.stride(0), out.stride(0),
        SCALE_N=scale_n, SCALE_K=scale_k, SCALE_AT_END=at_end, HAS_BIAS=bias is not None, EVEN_K=k % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_SIZE_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_kwargs(xq.device),
    )


def fp8_gemv(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
             out: torch.Tensor, scale_n: int, scale_k: int, at_end: bool, cfg: dict, glu: bool = False) -> None:
    """Launch the weight-only GEMV into ``out [M, N]``: ``scale`` float32 ``[ceil(N/scale_n), ceil(K/scale_k)]``
    block scales, or ``[N]`` per-channel ones with ``at_end``; split K (``SPLIT_K``) summed in the kernel
    (splitk.py). ``glu``: into ``out [M, N / 2]``, SiLU-and-mul of the product's halves, fused in the epilogue when
    ``N / 2`` is a whole number of column tiles, else after."""
    (m, k), n = x2.shape, weight.shape[0]
    bn = cfg["BLOCK_SIZE_N"]
    if glu and (n // 2) % bn:
        return glu_unfused(out, lambda full: fp8_gemv(x2, weight, scale, bias, full, scale_n, scale_k, at_end, cfg))
    bk = max(16, cfg["BLOCK_SIZE_K"] if at_end else min(cfg["BLOCK_SIZE_K"], scale_k & -scale_k))
    k_per_split = triton.cdiv(triton.cdiv(k, max(1, cfg["SPLIT_K"])), bk) * bk
    split = triton.cdiv(k, k_per_split)
    parts, locks = split_k_buffers(out, split, triton.cdiv(n, bn), n if glu else None)
    _fp8_gemv_kernel[(triton.cdiv(n, bn), split)](
        x2, weight, scale, bias if bias is not None else out, out, parts, locks,
        m, n, k, k_per_split,
        x2.stride(0), weight.stride(0), scale.stride(0), out.stride(0), n // 2 // bn,
        SCALE_N=scale_n, SCALE_K=scale_k, SCALE_AT_END=at_end, HAS_BIAS=bias is not None, EVEN_K=k % bk == 0,
        EVEN_N=n % bn == 0, SPLIT=split, GLU=glu, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=bn, BLOCK_K=bk,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_kwargs(x2.device),
    )


def _use_gemv(gemv: bool | None, m: int, scale_k: int) -> bool:
    """The weight-only GEMV up to ``FP8_GEMV_MAX_M`` rows (``gemv`` forces it); its K step must divide the
    weight's K block, so blocks narrower than 16 stay with the W8A8 GEMM."""
    if gemv is None:
        gemv = m <= FP8_GEMV_MAX_M
    if gemv and scale_k & -scale_k < 16:
        raise ValueError(f"the FP8 GEMV needs K blocks of a multiple of 16 columns, got {scale_k}")
    return gemv


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dtype != FP8_DTYPE or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} does not fit the float8_e4m3fn weight {tuple(weight.shape)} "
                         f"{weight.dtype}")
    if weight.stride(-1) != 1:
        raise ValueError("weight must have a contiguous last dim")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def fp8_block_linear_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                            block_size: tuple[int, int] = (128, 128), bias: torch.Tensor | None = None, *,
                            config: dict[str, int] | None = None, gemv: bool | None = None,
                            silu_mul: bool = False) -> torch.Tensor:
    """The contract of ``fp8_block_linear_ref``. Up to ``FP8_GEMV_MAX_M`` rows the weight-only GEMV (kind
    ``fp8_block_gemv``; x unquantized, so it matches the reference to the summation order), otherwise W8A8
    (kind ``fp8_block``; x's FP8 rounding apart). ``gemv`` forces the choice; ``config`` overrides
    ``get_quant_config`` for the kernel chosen (the tuner passes each candidate). ``silu_mul``: SiLU-and-mul of
    the result's halves, ``[..., N / 2]`` (in the GEMV's epilogue)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use fp8_block_linear_ref")
    _check(x, weight, bias)
    n, k = weight.shape
    bn, bk = block_size
    x2 = x.reshape(-1, k)
    if x2.shape[0] > 0 and _use_gemv(gemv, x2.shape[0], bk):
        out = torch.empty((x2.shape[0], n // 2 if silu_mul else n), dtype=x.dtype, device=x.device)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        cfg = config or get_quant_config("fp8_block_gemv", n, k, x2.shape[0], x.dtype, x.device)
        fp8_gemv(x2, weight, weight_scale_inv.float().contiguous(), bias, out, bn, bk, False, cfg, silu_mul)
        return out.view(*x.shape[:-1], out.shape[1])
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        cfg = config or get_quant_config("fp8_block", n, k, x2.shape[0], x.dtype, x.device)
        cfg = dict(cfg, BLOCK_SIZE_K=min(cfg["BLOCK_SIZE_K"], bk))
        xq, xs = fp8_quantize_per_token_group_triton(x2, bk)
        _launch_gemm(xq, xs, weight, weight_scale_inv.float(), bias, out, bn, bk, False, cfg)
    out = out.view(*x.shape[:-1], n)
    return silu_and_mul(out) if silu_mul else out


def scaled_mm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise scales takes this call: Hopper or newer, bf16 output (the only
    one its row-wise path has), both dims multiples of 16."""
    if not x.is_cuda or not hasattr(torch, "_scaled_mm") or x.dtype != torch.bfloat16:
        return False
    n, k = weight.shape
    return torch.cuda.get_device_capability(x.device) >= (9, 0) and n % 16 == 0 and k % 16 == 0


def fp8_channel_linear_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                              bias: torch.Tensor | None = None, *, config: dict[str, int] | None = None,
                              use_scaled_mm: bool | None = None, gemv: bool | None = None,
                              silu_mul: bool = False) -> torch.Tensor:
    """The contract of ``fp8_channel_linear_ref`` (per-channel or per-tensor weight scales). Up to
    ``FP8_GEMV_MAX_M`` rows the weight-only GEMV (kind ``fp8_channel_gemv``; ``gemv`` forces the choice).
    Otherwise W8A8 with per-token activation scales: ``torch._scaled_mm`` where ``scaled_mm_usable``
    (``use_scaled_mm`` overrides), else the Triton GEMM with both scales applied after the K loop. ``config``
    overrides ``get_quant_config`` for the Triton kernel chosen. ``silu_mul``: SiLU-and-mul of the result's halves,
    ``[..., N / 2]`` (in the GEMV's epilogue)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use fp8_channel_linear_ref")
    _check(x, weight, bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    scale = channel_scale(weight_scale, n).contiguous()
    if m == 0:
        return x.new_empty((*x.shape[:-1], n // 2 if silu_mul else n))
    if _use_gemv(gemv, m, 16):
        out = torch.empty((m, n // 2 if silu_mul else n), dtype=x.dtype, device=x.device)
        cfg = config or get_quant_config("fp8_channel_gemv", n, k, m, x.dtype, x.device)
        fp8_gemv(x2 if x2.stride(-1) == 1 else x2.contiguous(), weight, scale, bias, out, 1, k, True, cfg, silu_mul)
        return out.view(*x.shape[:-1], out.shape[1])
    xq, xs = fp8_quantize_per_token_group_triton(x2, k)
    if scaled_mm_usable(x, weight) if use_scaled_mm is None else use_scaled_mm:
        out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.view(1, n), out_dtype=x.dtype)
        if bias is not None:
            out += bias
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        cfg = config or get_quant_config("fp8_channel", n, k, m, x.dtype, x.device)
        _launch_gemm(xq, xs, weight, scale, bias, out, 1, k, True, cfg)
    out = out.view(*x.shape[:-1], n)
    return silu_and_mul(out) if silu_mul else out
