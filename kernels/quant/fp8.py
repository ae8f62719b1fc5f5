"""FP8 linears on the GPU (W8A8): dynamic per-token-group quantization of the activations, then one Triton GEMM of
the two FP8 operands accumulating in float32 (the DeepSeek-V3 / SGLang ``w8a8_block_fp8_matmul`` algorithm).

Block-scaled weights (``weight_scale_inv [ceil(N/bn), ceil(K/bk)]``): x is quantized per row and group of ``bk``
columns, so each K step of ``BLOCK_K = bk`` (or a divisor of it) has one activation scale per row and one weight
scale per column: ``acc += dot(a, b) * a_scale[:, None] * b_scale[None, :]``. Per-channel weights: x is quantized
per row over all of K, the raw dot accumulates, and both scales are applied once at the end (``SCALE_AT_END``).
``fp8_channel_linear_triton`` prefers ``torch._scaled_mm`` (cuBLASLt / CUTLASS row-wise scaling) where it exists.

The quantization kernel rounds to the e4m3 grid itself before the cast (``_round_to_e4m3``): the cast of an
already representable value is exact everywhere, while Triton's CPU interpreter rounds fp32 -> fp8 wrongly (no
mantissa carry: 127.3 becomes 64), which would make the CPU tests meaningless. On a GPU the result is the same as
the hardware's round-to-nearest-even cast; the few integer operations hide under the memory traffic.
"""

from __future__ import annotations

import torch

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from ..pdl import pdl_kwargs
from .config import get_quant_config
from .reference import FP8_DTYPE, FP8_EPS, FP8_MAX, channel_scale

if triton is not None:
    from ..pdl import pdl_wait

    # Globals a jit function reads must be constexpr.
    _FP8_MAX = tl.constexpr(FP8_MAX)
    _FP8_EPS = tl.constexpr(FP8_EPS)

    @triton.jit
    def _round_to_e4m3(v):
        """float32 ``v`` (|v| <= 448) rounded to the nearest e4m3 value (ties to even), still in float32."""
        a = tl.abs(v)
        # Below 2**-6 e4m3 is subnormal with a fixed step of 2**-9: shift into [2**-6, 2**-5), whose normal step
        # is the same, round there, shift back.
        sub = a < 0.015625
        a = tl.where(sub, a + 0.015625, a)
        bits = a.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000  # keep 3 of the 23 mantissa bits, ties to even
        r = bits.to(tl.float32, bitcast=True)
        r = tl.where(sub, r - 0.015625, r)
        return tl.where(v < 0, -r, r)

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
        q = _round_to_e4m3(tl.clamp(tl.math.div_rn(x, scale), -_FP8_MAX, _FP8_MAX))
        tl.store(XQ + row * sq_m + cols, q.to(XQ.dtype.element_ty), mask=mask)
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
            x, xq, xs, k, x.stride(0), xq.stride(0), xs.stride(0), GROUP=group_size, BLOCK=block,
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
                            config: dict[str, int] | None = None) -> torch.Tensor:
    """W8A8 with the contract of ``fp8_block_linear_ref`` (whose activations are not quantized: the two differ by
    x's FP8 rounding). ``config`` overrides ``get_quant_config`` (the tuner passes each candidate)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use fp8_block_linear_ref")
    _check(x, weight, bias)
    n, k = weight.shape
    bn, bk = block_size
    x2 = x.reshape(-1, k)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        cfg = config or get_quant_config("fp8_block", n, k, x2.shape[0], x.dtype, x.device)
        cfg = dict(cfg, BLOCK_SIZE_K=min(cfg["BLOCK_SIZE_K"], bk))
        xq, xs = fp8_quantize_per_token_group_triton(x2, bk)
        _launch_gemm(xq, xs, weight, weight_scale_inv.float(), bias, out, bn, bk, False, cfg)
    return out.view(*x.shape[:-1], n)


def scaled_mm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._scaled_mm`` with row-wise scales takes this call: Hopper or newer, bf16 output (the only
    one its row-wise path has), both dims multiples of 16."""
    if not x.is_cuda or not hasattr(torch, "_scaled_mm") or x.dtype != torch.bfloat16:
        return False
    n, k = weight.shape
    return torch.cuda.get_device_capability(x.device) >= (9, 0) and n % 16 == 0 and k % 16 == 0


def fp8_channel_linear_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                              bias: torch.Tensor | None = None, *, config: dict[str, int] | None = None,
                              use_scaled_mm: bool | None = None) -> torch.Tensor:
    """W8A8 with the contract of ``fp8_channel_linear_ref``: per-token activation scales, per-channel (or
    per-tensor) weight scales. ``torch._scaled_mm`` where ``scaled_mm_usable`` (``use_scaled_mm`` overrides),
    else the Triton GEMM with both scales applied after the K loop."""
    if triton is None:
        raise RuntimeError("triton is not installed; use fp8_channel_linear_ref")
    _check(x, weight, bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    scale = channel_scale(weight_scale, n).contiguous()
    if m == 0:
        return x.new_empty((*x.shape[:-1], n))
    xq, xs = fp8_quantize_per_token_group_triton(x2, k)
    if scaled_mm_usable(x, weight) if use_scaled_mm is None else use_scaled_mm:
        out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.view(1, n), out_dtype=x.dtype)
        if bias is not None:
            out += bias
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        cfg = config or get_quant_config("fp8_channel", n, k, m, x.dtype, x.device)
        _launch_gemm(xq, xs, weight, scale, bias, out, 1, k, True, cfg)
    return out.view(*x.shape[:-1], n)
