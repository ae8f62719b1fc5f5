"""AWQ / GPTQ decode GEMV on CUDA cores (the GEMM is int4.py).

Decode, M <= ``INT_GEMV_MAX_M`` (4), no act-order: ``_int_gemv_kernel``, one template for AWQ and GPTQ (4- and
8-bit; the format is a constexpr). Why: a batch-1 decode reads each weight once, so it should run at the copy
bandwidth, ~13 bytes per clock and SM on an H100 (3.0 TB/s over 132 SMs at ~1.75 GHz), i.e. ~26 int4 weights per
clock and SM, while an SM issues 128 thread-instructions per clock. The ``tl.dot`` path spends far more per weight:
shift + mask + int->float conversion (16 per clock and SM) + scale, a bf16 cast, a trip through shared memory into
the MMA layout, and a 16-row tile of which 15 rows are padding; it measured 16-27% of the 0.5-byte roofline, below
bf16. The GEMV keeps every weight in the registers of the thread that loaded it:

- loads: 16-byte vectors along the contiguous dim (AWQ: ``BLOCK_N / 8`` words of a K row, 128 bytes at 256
  columns; GPTQ: ``BLOCK_N`` words of a packed row), one sub-tile of ``ROWS`` word rows per lane / warp along K, so
  a thread owns whole columns of the step and the loop has no cross-thread reduction (``gemv_row_lanes``);
- dequantization: per 16-bit half of a word one OR with the bits of 2**23 (and one shift for the high half), then
  per value one AND that leaves it in the mantissa: the float is ``2**23 + q * 2**shift`` exactly, and one FADD
  subtracts ``2**23`` (GPTQ) or the zero's own magic float (AWQ: ``(q - z) * 2**shift`` exactly, zero words loaded
  in the weights' layout). ``2**-shift`` is folded into the scale (AWQ, per column) or into x (GPTQ, per row).
  Per weight: ~1.4 LOP3, 1 FADD and one FFMA per row of x; no conversion instruction, no shared memory;
- the values of a word are gathered with ``tl.join`` (register-only), the 8 columns of an AWQ word already in
  column order, so scales load and outputs store contiguously: the interleave costs nothing;
- each K step lies in one group: the ``SUB`` sub-tiles are summed per column in registers (FMA chain), then scaled
  once per step (AWQ ``s 2**-shift * sum x (q - z) 2**shift``, GPTQ ``s (sum x q - z sum x)``); the ROWS axis is
  summed across threads once, after the loop;
- K split (``SPLIT_K``) until ~2 programs per SM, the splits summed by the tile's last program (splitk.py);
  PDL as every kernel here.
Offline SASS for sm_90 (AWQ, 256 columns, 128-row steps, M = 1): ~4 instructions per weight in the loop (LOP3
1.4, FADD 1, FFMA 1, the rest loads, scales, addresses), 168 registers, no local memory, no barrier in the loop
but the scales' layout change. The issue bound is then ~32 weights per clock and SM (above the ~26 the bandwidth
asks); each extra row of x adds one FFMA per weight, hence at most 4 rows (M = 4: ~8.5 per weight, still about
3x fewer than the padded ``tl.dot``; beyond, the GEMM's tensor cores win as M grows).
"""

from __future__ import annotations

try:  # triton is optional (absent on macOS / Windows): then only the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None

from ..pdl import pdl_kwargs
from .splitk import glu_unfused, split_k_buffers

# 2**23 as int32 bits: a value OR-ed into its mantissa reads as 2**23 + value (``_magic_values``).
MAGIC = 0x4B000000

if triton is not None:
    from ..pdl import pdl_wait
    from .splitk import split_k_store

    @triton.jit
    def _magic_values(w, magic, BITS: tl.constexpr, AWQ: tl.constexpr):
        """int32 words ``[1, R, C]`` -> float32 ``[1, R, C, 32 // BITS]``: ``2**23 + q * 2**shift`` for value ``q``
        of each word (AWQ: column ``j`` of its 8, in column order; GPTQ: row ``j`` of its pack), exactly. Each
        value is masked where it sits in its 16-bit half, inside the mantissa of 2**23: one LOP3 per value (the
        OR with ``magic`` = 0x4B000000 is shared by the word's half), no shift per value and no int -> float
        conversion (16 per clock and SM on Hopper). ``magic`` comes in as an argument: as a literal, ptxas folds
        the OR into every LOP3 and re-materializes the constant with a MOV each time. ``tl.join`` keeps the
        values in the registers of the thread that loaded the word (no layout conversion)."""
        lo = w | magic
        hi = (w >> 16) | magic
        if BITS == 8:  # GPTQ 8-bit: rows 0, 1 in the low half, 2, 3 in the high one
            v = tl.join(tl.join(lo & (magic | 0xFF), hi & (magic | 0xFF)),
                        tl.join(lo & (magic | 0xFF00), hi & (magic | 0xFF00)))
        elif AWQ:  # column c sits in nibble (c // 2) + 4 (c % 2): even columns in the low half, odd in the high
            v = tl.join(tl.join(tl.join(lo & (magic | 0xF), lo & (magic | 0xF00)),
                                tl.join(lo & (magic | 0xF0), lo & (magic | 0xF000))),
                        tl.join(tl.join(hi & (magic | 0xF), hi & (magic | 0xF00)),
                                tl.join(hi & (magic | 0xF0), hi & (magic | 0xF000))))
        else:  # GPTQ 4-bit: rows 0-3 in the low half, 4-7 in the high one
            v = tl.join(tl.join(tl.join(lo & (magic | 0xF), hi & (magic | 0xF)),
                                tl.join(lo & (magic | 0xF00), hi & (magic | 0xF00))),
                        tl.join(tl.join(lo & (magic | 0xF0), hi & (magic | 0xF0)),
                                tl.join(lo & (magic | 0xF000), hi & (magic | 0xF000))))
        return tl.reshape(v, (w.shape[0], w.shape[1], w.shape[2], 32 // BITS)).to(tl.float32, bitcast=True)

    @triton.jit
    def _inverse_shift(j, BITS: tl.constexpr, AWQ: tl.constexpr):
        """``2**-shift`` (float32, exact) of value ``j`` of a word as ``_magic_values`` returns it."""
        if AWQ:
            shift = 4 * (j // 2)
        else:
            shift = BITS * (j % (16 // BITS))
        return ((127 - shift) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _int_gemv_kernel(
        X, QW, SC, QZ, BIAS, Y, WS, LOCKS,
        M, N, K, group, k_per_split, magic,
        sx_m, sqw, ssc, sqz, sy_m, glu_tiles,
        AWQ: tl.constexpr, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, SPLIT: tl.constexpr, GLU: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, ROWS: tl.constexpr, SUB: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        # Y[:M, columns] = X[:M, :] @ dequant(W)[:, columns]; program (columns, split) sums its K range, then
        # split_k_store adds the splits.
        # A K step is SUB sub-tiles of [1, ROWS, words] (ROWS word rows: one per lane / warp along K, so that a
        # thread owns whole columns of the step), unrolled; the step lies in one group. AWQ: sub-tiles of
        # ROWS K rows x BLOCK_N / 8 words, the zero subtracted per value through its magic float (its words
        # load in the same layout as the weights'), the scale applied per step. GPTQ: ROWS x p K rows x BLOCK_N
        # words, x pre-scaled by each row's 2**-shift, sum_k x (q - z) s = s (sum_k x q - z sum_k x) per step.
        # The accumulator keeps the ROWS axis (no cross-thread reduction in the loop); it is summed at the end.
        PACK: tl.constexpr = 32 // BITS
        pdl_wait(USE_PDL)
        pid_k = tl.program_id(1)
        k_start = pid_k * k_per_split
        k_end = tl.minimum(K, k_start + k_per_split)
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        r = tl.arange(0, ROWS)
        j = tl.arange(0, PACK)
        if AWQ:
            WORDS: tl.constexpr = BLOCK_N // PACK
            STEP: tl.constexpr = ROWS * SUB
            wcol = tl.program_id(0) * WORDS + tl.arange(0, WORDS)
            w_ok = (wcol < N // PACK)[None, None, :]
            w_ptr = QW + (k_start + r).to(tl.int64)[None, :, None] * sqw + wcol[None, None, :]  # [1, ROWS, W]
            z_ptr = QZ + r[None, :, None] * 0 + wcol[None, None, :]  # the zero words, in the weights' layout
            x_ptr = X + offs_m[:, None] * sx_m + (k_start + r)[None, :]  # [M, ROWS]
            cols = wcol[:, None] * PACK + j[None, :]  # [W, 8]: the values' columns, in order
            inv = _inverse_shift(j, BITS, AWQ)[None, :]  # folded into the scales
            acc = tl.zeros([BLOCK_M, ROWS, WORDS, PACK], dtype=tl.float32)
        else:
            STEP: tl.constexpr = ROWS * SUB * PACK
            cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            w_ok = (cols < N)[None, None, :]
            w_ptr = QW + (k_start // PACK + r).to(tl.int64)[None, :, None] * sqw + cols[None, None, :]
            x_ptr = X + offs_m[:, None, None] * sx_m + (k_start + r[None, :, None] * PACK + j[None, None, :])
            inv = _inverse_shift(j, BITS, AWQ)[None, None, :]  # folded into x
            zshift = BITS * (cols % PACK)
            acc = tl.zeros([BLOCK_M, ROWS, BLOCK_N], dtype=tl.float32)
        col_ok = cols < N
        for k0 in range(k_start, k_end, STEP):
            grp = k0 // group
            if AWQ:
                if EVEN_N:
                    mz = _magic_values(tl.load(z_ptr + grp * sqz), magic, BITS, AWQ)
                else:
                    mz = _magic_values(tl.load(z_ptr + grp * sqz, mask=w_ok, other=0), magic, BITS, AWQ)
            else:
                xs = tl.zeros([BLOCK_M, ROWS], dtype=tl.float32)
            for t in tl.static_range(SUB):
                # Rows past K (the last step of a ragged K): their x is zero and their words are not read.
                if AWQ:
                    row_ok = (r < K - k0 - t * ROWS)[None, :]
                    if EVEN_K:
                        x = tl.load(x_ptr + t * ROWS, mask=mask_m[:, None], other=0.0).to(tl.float32)
                    else:
                        x = tl.load(x_ptr + t * ROWS, mask=mask_m[:, None] & row_ok, other=0.0).to(tl.float32)
                    x = x[:, :, None, None]
                else:
                    row_ok = (r < (K - k0) // PACK - t * ROWS)[None, :]
                    if EVEN_K:
                        x = tl.load(x_ptr + t * ROWS * PACK, mask=mask_m[:, None, None], other=0.0)
                    else:
                        x = tl.load(x_ptr + t * ROWS * PACK, mask=mask_m[:, None, None] & row_ok[:, :, None],
                                    other=0.0)
                    x = x.to(tl.float32)
                    xs += tl.sum(x, axis=2)
                    x = (x * inv)[:, :, None, :]
                if EVEN_K and EVEN_N:
                    words = tl.load(w_ptr + t * ROWS * sqw)
                elif EVEN_K:
                    words = tl.load(w_ptr + t * ROWS * sqw, mask=w_ok, other=0)
                else:
                    words = tl.load(w_ptr + t * ROWS * sqw, mask=w_ok & row_ok[:, :, None], other=0)
                v = _magic_values(words, magic, BITS, AWQ)  # [1, ROWS, words, p]
                if AWQ:
                    v -= mz  # (q - z) 2**shift, exact
                else:
                    v -= 8388608.0  # q 2**-shift
                if t == 0:
                    part = x * v
                else:
                    part += x * v
            s = tl.load(SC + grp * ssc + cols, mask=col_ok, other=0.0).to(tl.float32)
            if AWQ:
                acc += (s * inv)[None, None] * part
            else:
                zq = tl.load(QZ + grp * sqz + cols // PACK, mask=col_ok, other=0)
                z = (((zq >> zshift) & ((1 << BITS) - 1)) + ZERO_OFFSET).to(tl.float32)
                acc += s[None, None, :] * (tl.sum(part, axis=3) - z[None, None, :] * xs[:, :, None])
            x_ptr += STEP
            w_ptr += (STEP if AWQ else STEP // PACK) * sqw
        out = tl.sum(acc, axis=1)  # the one cross-thread reduction: over the lanes / warps along K
        if AWQ:
            split_k_store(out, Y, WS, LOCKS, BIAS, M, N, offs_m[:, None, None], cols[None, :, :], sy_m, glu_tiles,
                          SPLIT, HAS_BIAS, GLU)
        else:
            split_k_store(out, Y, WS, LOCKS, BIAS, M, N, offs_m[:, None], cols[None, :], sy_m, glu_tiles, SPLIT,
                          HAS_BIAS, GLU)


def gemv_row_lanes(words: int, num_warps: int) -> int:
    """The lanes x warps along K of a ``[rows, words]`` int32 tile in Triton's coalesced layout (16-byte vectors:
    4 words a thread, lanes and then warps along the row first): the word rows one pass of the CTA covers. The
    GEMV loads its K steps as sub-tiles of exactly this height, so that each thread owns its columns' rows."""
    lanes_n = min(32, max(1, words // 4))
    warps_n = min(num_warps, max(1, words // (4 * lanes_n)))
    return 32 // lanes_n * (num_warps // warps_n)


def int_gemv_supported(fmt: str, bits: int, group: int, k: int, has_gidx: bool) -> bool:
    """Whether ``_int_gemv_kernel`` takes the call: not act-order (the per-row group gather stays with the GEMM)
    and groups of whole packed GPTQ words along K."""
    return not has_gidx and (fmt == "awq" or group >= k or (group & -group) >= 32 // bits)


def _int_gemv(x2, qweight, scales, qzeros, fmt: str, bits: int, group: int, bias, out, cfg: dict,
              glu: bool = False) -> None:
    """The GEMV into ``out [M, N]``; ``glu``: into ``out [M, N / 2]``, SiLU-and-mul of the product's halves, fused
    in the epilogue when ``N / 2`` is a whole number of column tiles (splitk.py), else after."""
    (m, k), n = x2.shape, scales.shape[1]
    pack = 32 // bits
    awq = fmt == "awq"
    bn = max(cfg["BLOCK_SIZE_N"], pack if awq else 1)
    if glu and (n // 2) % bn:
        return glu_unfused(out, lambda full: _int_gemv(x2, qweight, scales, qzeros, fmt, bits, group, bias, full, cfg))
    per_row = 1 if awq else pack  # K rows per word row
    limit = 1 << 30 if group >= k else group & -group  # a step must divide the group
    rows = min(gemv_row_lanes(bn // pack if awq else bn, cfg["num_warps"]), max(1, limit // per_row))
    sub = max(1, min(cfg["BLOCK_SIZE_K"], limit) // (rows * per_row))
    step = rows * sub * per_row
    k_per_split = triton.cdiv(triton.cdiv(k, max(1, cfg["SPLIT_K"])), step) * step
    split = triton.cdiv(k, k_per_split)
    ws, locks = split_k_buffers(out, split, triton.cdiv(n, bn), n if glu else None)
    _int_gemv_kernel[(triton.cdiv(n, bn), split)](
        x2, qweight, scales, qzeros, bias if bias is not None else out, out, ws, locks,
        m, n, k, group, k_per_split, MAGIC,
        x2.stride(0), qweight.stride(0), scales.stride(0), qzeros.stride(0), out.stride(0), n // 2 // bn,
        AWQ=awq, BITS=bits, ZERO_OFFSET=0 if awq else 1, HAS_BIAS=bias is not None, EVEN_K=k % step == 0,
        EVEN_N=n % bn == 0, SPLIT=split, GLU=glu, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=bn, ROWS=rows,
        SUB=sub,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_kwargs(x2.device),
    )
