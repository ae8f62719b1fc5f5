"""GGUF linears on the GPU: one Triton kernel that decodes llama.cpp's blocks in its K loop, and a row decoder for
the embedding lookup.

The weight is read as the file stores it (``qweight`` uint8 ``[N, K / values, bytes]``, gguf_reference.py's
layouts), with no repacking at load. One template serves the eight block formats: the format is a ``constexpr``
(its ``ggml_type`` id), and ``_dequant_tile`` decodes a ``[BLOCK_N, BLOCK_K / 32, 32]`` tile, since every format
is built of sub-blocks of 32 values (one legacy block, or one eighth of a K-quant super-block). Per sub-block it
reads the scale fields once (``[BLOCK_N, G, 1]``) and per value its code bits, so ``BLOCK_K`` is any power of two
from 32 on. The float16 fields sit at even byte offsets of blocks of even size, so the kernels read them through a
float16 view of the same bytes (``QH``) instead of assembling two bytes.

The matmul (``_gguf_matmul_kernel``) has two inner products: ``BLOCK_M >= 16`` multiplies the decoded tile with
``tl.dot`` (prefill, and decode batches of 5-8 rows as a 16-row tile), smaller ``BLOCK_M`` is a GEMV on CUDA
cores (``x[:, None, :] * w[None]`` summed over K: at 1-4 rows a tensor-core tile would be mostly padding, and the
decode is bound by the weight bytes and their decoding). Either splits K (``SPLIT_K`` programs per column strip)
so a 4096-wide output still keeps every SM streaming weights, the splits summed in a fixed order by each tile's
last program (splitk.py).
Accumulation is float32; out-of-range rows and sub-blocks are clamped to valid addresses (their x is zero and
their outputs are never stored), so the decode needs no masks.
"""

from __future__ import annotations

import torch

from ..pdl import pdl_kwargs
from .config import get_quant_config
from .gguf_reference import GGUF_BLOCKS, GGUFBlock
from .int4 import triton
from .splitk import split_k_buffers

if triton is not None:
    import triton.language as tl

    from ..pdl import pdl_wait
    from .splitk import split_k_store

    @triton.jit
    def _legacy_tile(QW, QH, base, lane, TYPE: tl.constexpr):
        """Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 sub-blocks (one block each) at byte offsets ``base [BN, G, 1]``."""
        d = tl.load(QH + base // 2).to(tl.float32)
        if TYPE == 8:  # Q8_0: d, qs[32] int8
            q = tl.load(QW + base + 2 + lane).to(tl.int32)
            w = d * ((q ^ 128) - 128).to(tl.float32)  # the uint8 byte read as int8
        else:
            HAS_MIN: tl.constexpr = (TYPE == 3) or (TYPE == 7)
            FIVE: tl.constexpr = (TYPE == 6) or (TYPE == 7)
            QH_AT: tl.constexpr = 4 if HAS_MIN else 2
            QS_AT: tl.constexpr = QH_AT + 4 if FIVE else QH_AT
            # Values 0-15 are the low nibbles of qs[0..16), values 16-31 the high ones.
            byte = tl.load(QW + base + QS_AT + (lane % 16)).to(tl.int32)
            q = (byte >> (4 * (lane // 16))) & 15
            if FIVE:  # bit 4 of value j is bit j of the little-endian qh
                q = q | (((tl.load(QW + base + QH_AT + lane // 8).to(tl.int32) >> (lane % 8)) & 1) << 4)
            if HAS_MIN:
                w = d * q.to(tl.float32) + tl.load(QH + base // 2 + 1).to(tl.float32)
            else:
                w = d * (q - (16 if FIVE else 8)).to(tl.float32)
        return w

    @triton.jit
    def _k45_tile(QW, QH, base, sub, lane, FIVE: tl.constexpr):
        """Q4_K / Q5_K: sub-block ``sub [1, G, 1]`` of the super-blocks at ``base``; ggml's get_scale_min_k4
        unpacks its 6-bit scale and min from the 12 bytes at offset 4."""
        d = tl.load(QH + base // 2).to(tl.float32)
        dmin = tl.load(QH + base // 2 + 1).to(tl.float32)
        low = sub < 4
        a = tl.load(QW + base + 4 + sub).to(tl.int32)  # scales[sub]
        b = tl.load(QW + base + 4 + (sub + 4)).to(tl.int32)  # scales[sub + 4]
        c = tl.load(QW + base + 4 + tl.where(low, sub, sub - 4)).to(tl.int32)  # scales[sub - 4] (high half)
        scale = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4)).to(tl.float32)
        mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4)).to(tl.float32)
        QS_AT: tl.constexpr = 48 if FIVE else 16
        # Sub-blocks 2i and 2i + 1 are the low and high nibbles of qs[32 i .. 32 i + 32).
        byte = tl.load(QW + base + QS_AT + 32 * (sub // 2) + lane).to(tl.int32)
        q = (byte >> (4 * (sub % 2))) & 15
        if FIVE:  # bit `sub` of qh[lane] is bit 4 of the value
            q = q | (((tl.load(QW + base + 16 + lane).to(tl.int32) >> sub) & 1) << 4)
        return d * scale * q.to(tl.float32) - dmin * mn

    @triton.jit
    def _q6k_tile(QW, QH, base, sub, lane):
        """Q6_K: sub-block ``sub = 4 half + c`` (values ``128 half + 32 c + lane``) of the super-blocks at
        ``base``: 4 low bits in ql, 2 high bits in qh, an int8 scale per 16 values, d at byte 208."""
        half = sub // 4
        c = sub % 4
        ql = tl.load(QW + base + 64 * half + 32 * (c % 2) + lane).to(tl.int32)
        qh = tl.load(QW + base + 128 + 32 * half + lane).to(tl.int32)
        q = (((ql >> (4 * (c // 2))) & 15) | (((qh >> (2 * c)) & 3) << 4)) - 32
        scale = tl.load(QW + base + 192 + 8 * half + 2 * c + lane // 16).to(tl.int32)
        scale = ((scale ^ 128) - 128).to(tl.float32)  # int8
        return tl.load(QH + base // 2 + 104).to(tl.float32) * scale * q.to(tl.float32)

    @triton.jit
    def _dequant_tile(QW, QH, rows, sb, row_bytes, TYPE: tl.constexpr, VALUES: tl.constexpr,
                      BYTES: tl.constexpr):
        """float32 ``[len(rows), len(sb), 32]``: sub-blocks of 32 values ``sb`` (global index along K, valid) of
        the weight rows ``rows`` (int64, valid)."""
        SUBS: tl.constexpr = VALUES // 32
        base = rows[:, None, None] * row_bytes + (sb // SUBS).to(tl.int64)[None, :, None] * BYTES
        sub = (sb % SUBS)[None, :, None]
        lane = tl.arange(0, 32)[None, None, :]
        if VALUES == 32:
            w = _legacy_tile(QW, QH, base, lane, TYPE)
        elif TYPE == 14:
            w = _q6k_tile(QW, QH, base, sub, lane)
        else:
            w = _k45_tile(QW, QH, base, sub, lane, TYPE == 13)
        return w

    @triton.jit
    def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row block, first column) of program ``pid``: GROUP_M row blocks sweep the column blocks together, so
        the weight tiles they share stay in L2."""
        blocks_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * blocks_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_rows, ((pid % per_group) // group_rows) * BLOCK_N

    @triton.jit
    def _gguf_matmul_kernel(
        X, QW, QH, BIAS, Y, WS, LOCKS, M, N, K, k_per_split, row_bytes, sx_m, sy_m,
        TYPE: tl.constexpr, VALUES: tl.constexpr, BYTES: tl.constexpr, HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        # Y = X @ dequant(W).T; program_id(1) is the split of K, summed by split_k_store.
        pdl_wait(USE_PDL)
        pid_m, n0 = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)
        k_start = tl.program_id(1) * k_per_split
        x_ptr = X + offs_m.to(tl.int64)[:, None] * sx_m + (k_start + offs_k)[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_start, tl.minimum(K, k_start + k_per_split), BLOCK_K):
            sb = tl.minimum(k0 // 32 + tl.arange(0, BLOCK_K // 32), K // 32 - 1)
            w = tl.reshape(_dequant_tile(QW, QH, rows, sb, row_bytes, TYPE, VALUES, BYTES), (BLOCK_N, BLOCK_K))
            if EVEN_K:  # padded rows (M < BLOCK_M) are zeros; their outputs are never stored
                x = tl.load(x_ptr, mask=mask_m[:, None], other=0.0)
            else:
                x = tl.load(x_ptr, mask=mask_m[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
            if BLOCK_M >= 16:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
            x_ptr += BLOCK_K
        split_k_store(acc, Y, WS, LOCKS, BIAS, M, N, offs_m[:, None], offs_n[None, :], sy_m, 1, SPLIT, HAS_BIAS, False)

    @triton.jit
    def _gguf_rows_kernel(QW, QH, IDS, OUT, K, row_bytes, TYPE: tl.constexpr, VALUES: tl.constexpr,
                          BYTES: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
        # OUT[i, k0:k0 + BLOCK_K] = dequant(W)[IDS[i], k0:k0 + BLOCK_K] in OUT's dtype (embedding lookup).
        pdl_wait(USE_PDL)
        i = tl.program_id(0).to(tl.int64)
        k0 = tl.program_id(1) * BLOCK_K
        row = tl.load(IDS + i).to(tl.int64) + tl.zeros([1], dtype=tl.int64)
        sb = tl.minimum(k0 // 32 + tl.arange(0, BLOCK_K // 32), K // 32 - 1)
        w = tl.reshape(_dequant_tile(QW, QH, row, sb, row_bytes, TYPE, VALUES, BYTES), (BLOCK_K,))
        cols = k0 + tl.arange(0, BLOCK_K)
        tl.store(OUT + i * K + cols, w.to(OUT.dtype.element_ty), mask=cols < K)


def gguf_block(qtype: str) -> GGUFBlock:
    """The block format named ``qtype``; ValueError naming the kept ones otherwise."""
    block = GGUF_BLOCKS.get(qtype)
    if block is None:
        raise ValueError(f"GGUF type {qtype!r} has no kernel; kept types: {', '.join(GGUF_BLOCKS)}")
    return block


def gguf_views(qweight: torch.Tensor, block: GGUFBlock, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``qweight`` as ``[N, K / values, bytes]`` uint8 and the float16 view of the same bytes the kernels read
    the scale fields through. ValueError if it is not ``K`` values of ``block`` per row, contiguous."""
    if qweight.dtype != torch.uint8 or qweight.dim() not in (2, 3) or not qweight.is_contiguous():
        raise ValueError(f"{block.name} weight must be contiguous uint8 [N, K / {block.values}, {block.bytes}], "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    if k % block.values or qweight[0].numel() != k // block.values * block.bytes:
        raise ValueError(f"{block.name} weight {tuple(qweight.shape)} does not hold K={k} values per row")
    blocks = qweight.view(qweight.shape[0], k // block.values, block.bytes)
    return blocks, blocks.view(torch.float16)


def _launch(x2, blocks, halves, block: GGUFBlock, bias, out, cfg: dict[str, int]) -> None:
    (m, k), n = x2.shape, blocks.shape[0]
    bm, bn, bk = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    if bk < 32 or bk & (bk - 1):
        raise ValueError(f"BLOCK_SIZE_K of a GGUF kernel must be a power of two >= 32 (sub-blocks), got {bk}")
    k_per_split = triton.cdiv(triton.cdiv(k, max(1, cfg["SPLIT_K"])), bk) * bk
    split = triton.cdiv(k, k_per_split)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    ws, locks = split_k_buffers(out, split, tiles)
    _gguf_matmul_kernel[(tiles, split)](
        x2, blocks, halves, bias if bias is not None else out, out, ws, locks, m, n, k, k_per_split,
        blocks.stride(0), x2.stride(0), out.stride(0),
        TYPE=block.ggml_type, VALUES=block.values, BYTES=block.bytes, HAS_BIAS=bias is not None,
        EVEN_K=k % bk == 0, SPLIT=split, DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_SIZE_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_kwargs(x2.device),
    )


def gguf_linear_triton(x: torch.Tensor, qweight: torch.Tensor, qtype: str, bias: torch.Tensor | None = None, *,
                       config: dict[str, int] | None = None) -> torch.Tensor:
    """Triton launcher with the contract of ``gguf_linear_ref``: ``x [..., K]`` (float32 / bf16 / fp16) times the
    blocks ``qweight`` uint8 ``[N, K / values, bytes]`` of ``qtype`` plus ``bias [N]`` -> ``[..., N]`` in x's
    dtype, float32 accumulation. ``config`` overrides ``get_quant_config`` (the tuner passes each candidate)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use gguf_linear_ref")
    block = gguf_block(qtype)
    k = x.shape[-1]
    blocks, halves = gguf_views(qweight, block, k)
    n = blocks.shape[0]
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        cfg = config or get_quant_config(f"gguf_{qtype.lower()}", n, k, x2.shape[0], x.dtype, x.device)
        _launch(x2, blocks, halves, block, bias, out, cfg)
    return out.view(*x.shape[:-1], n)


def gguf_rows_triton(qweight: torch.Tensor, ids: torch.Tensor, qtype: str, in_features: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Rows ``ids`` (any shape, int) of the ``[N, in_features]`` weight in ``qtype``'s blocks, dequantized to
    ``dtype``: ``[*ids.shape, in_features]`` (the contract of ``gguf_rows_ref``)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use gguf_rows_ref")
    block = gguf_block(qtype)
    blocks, halves = gguf_views(qweight, block, in_features)
    flat = ids.reshape(-1)
    out = torch.empty((flat.numel(), in_features), dtype=dtype, device=qweight.device)
    if flat.numel() > 0:
        bk = min(256, triton.next_power_of_2(in_features))
        _gguf_rows_kernel[(flat.numel(), triton.cdiv(in_features, bk))](
            blocks, halves, flat, out, in_features, blocks.stride(0), TYPE=block.ggml_type, VALUES=block.values,
            BYTES=block.bytes, BLOCK_K=bk, num_warps=4, **pdl_kwargs(qweight.device),
        )
    return out.view(*ids.shape, in_features)
