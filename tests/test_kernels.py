"""Every Triton kernel of kernels/ against its torch reference, on fresh random inputs.

CI has no GPU, so the Triton launchers (``*_triton``) run on CPU tensors under the Triton interpreter with tiny
shapes. The interpreter is chosen when triton is *imported* (triton.language's own helpers such as ``tl.sum`` are
jitted then) and when each kernel is defined, so ``TRITON_INTERPRET=1`` must be in the environment before anything
imports triton: tests/conftest.py sets it (not in a run of the cuda tier, which needs the GPU compiler and where this
module is only collected, so it must not set it either); without it every test here fails with that explanation.
bf16 arithmetic is wrong in the interpreter, so half precision is tested in fp16; bf16 is covered by the GPU tier
(tests/cuda/test_cuda_kernels.py, ``pytest -m cuda``).
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from .pool_helpers import TOL, random_pool, random_table, rel_err  # noqa: E402

# Modules by full name: the package re-exports functions named like some of its modules (store_kv, ...).
norm, activation, rotary, token_bitmask, linear, argmax, step_inputs = (
    importlib.import_module(f"xinf_sglang.kernels.{name}")
    for name in ("norm", "activation", "rotary", "token_bitmask", "linear", "argmax", "step_inputs")
)
store_kv, decode_attention, decode_attention_kernel, extend_attention = (
    importlib.import_module(f"xinf_sglang.kernels.attention.{name}")
    for name in ("store_kv", "decode_attention", "decode_attention_kernel", "extend_attention")
)

INTERPRETED = isinstance(tl.sum, InterpretedFunction) and isinstance(norm._rms_norm_kernel, InterpretedFunction)


@pytest.fixture(autouse=True)
def _needs_interpreter() -> None:
    # conftest.py sets TRITON_INTERPRET=1 before anything imports triton; getting here without it means the
    # kernels were compiled for a GPU this machine does not have, and every test below would be meaningless.
    assert INTERPRETED, "triton was imported without TRITON_INTERPRET=1 (set it before importing triton)"


def randint(lo: int, hi: int) -> int:
    """Uniform in [lo, hi] from torch's (seeded) generator."""
    return int(torch.randint(lo, hi + 1, ()).item())


# ---------------------------------------------------------------- argmax


@pytest.mark.parametrize(
    "dtype,rows", [(torch.float32, 1), (torch.float16, 5), (torch.bfloat16, 5), (torch.float32, 16)]
)
def test_argmax_equals_torch_with_ties(dtype: torch.dtype, rows: int) -> None:
    """The first maximal index, as torch's argmax: ties inside a chunk, across chunks and at chunk borders, rows
    that are all -inf, vocabularies that do not split evenly into the chunks (empty last chunks too)."""
    torch.manual_seed(rows)
    for vocab in (argmax.ARGMAX_CHUNKS * 37, argmax.ARGMAX_CHUNKS * 37 + 5, 100, 3):
        logits = torch.randn(rows, vocab).round(decimals=1).to(dtype)  # many exact ties
        width = -(-vocab // argmax.ARGMAX_CHUNKS)
        for col in (3, width - 1, width, 5 * width + 2):
            if col < vocab:
                logits[0, col] = 9.0
        if rows > 1:
            logits[1, [vocab - 1, min(2 * width, vocab - 1)]] = 9.0
            logits[2:3] = float("-inf")
        out = argmax.argmax_triton(logits)
        assert out.dtype == torch.int64 and torch.equal(out, argmax.argmax_ref(logits)), vocab


# ---------------------------------------------------------------- decode step inputs


@pytest.mark.parametrize("b,p", [(1, 1), (3, 4), (5, 8), (0, 2), (17, 24)])
def test_fill_decode_inputs(b: int, p: int) -> None:
    """One launch writes the real rows and the padding rows of the graph inputs, and each real row's new slot
    into the request->token table (and nothing else there), as the torch reference does."""
    torch.manual_seed(b * 31 + p)
    rows, ctx = 20, 40
    req_rows = torch.randperm(rows)[:b]
    positions = torch.randint(0, ctx, (b,))
    host = torch.stack([positions, req_rows, positions + 1]).contiguous()
    ids, slots = torch.randint(0, 1000, (b,)), torch.randint(1, 5000, (b,))
    before = torch.randint(0, 5000, (rows, ctx), dtype=torch.int32)
    outs = []
    for fill in (step_inputs.fill_decode_inputs_triton, step_inputs.fill_decode_inputs_ref):
        static = torch.full((5, 32), -7, dtype=torch.int64)  # stale values of an earlier, larger batch
        table = before.clone()
        fill(static[:, :p], host, ids, slots, table)
        outs.append((static, table))
        assert torch.equal(static[:, :b], torch.stack([ids, positions, req_rows, positions + 1, slots]))
        assert torch.equal(static[:, b:p], torch.tensor(step_inputs.DECODE_PADDING)[:, None].expand(5, p - b))
        assert (static[:, p:] == -7).all()  # beyond the captured size: untouched
        changed = (table != before).nonzero().tolist()
        assert all((r, c) in set(zip(req_rows.tolist(), positions.tolist())) for r, c in changed)
        assert torch.equal(table[req_rows, positions], slots.to(torch.int32))
    assert all(torch.equal(x, y) for x, y in zip(*outs))


# ---------------------------------------------------------------- skinny linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear(dtype: torch.dtype, m: int, with_bias: bool) -> None:
    torch.manual_seed(m + 10 * with_bias)
    n, k = randint(40, 80), randint(40, 300)  # not multiples of the tiles: masked tails in N and K
    x = torch.randn(m, k).to(dtype)
    w = (torch.randn(n, k) * k**-0.5).to(dtype)
    b = torch.randn(n).to(dtype) if with_bias else None
    ref = linear.linear_ref(x.double(), w.double(), b.double() if with_bias else None)
    # The default launch shape, and one whose tiles divide K and N exactly (the unmasked loads).
    k_even, n_even = k - k % 32, n - n % 32
    for out, want in (
        (linear.linear_triton(x, w, b), ref),
        (
            linear.linear_triton(x[:, :k_even], w[:n_even, :k_even], config=linear.SkinnyConfig(32, 32, 4, 2)),
            linear.linear_ref(x[:, :k_even].double(), w[:n_even, :k_even].double()),
        ),
    ):
        assert out.dtype == dtype and out.shape == want.shape
        assert rel_err(out, want) < TOL[dtype]


@pytest.mark.parametrize("m,with_bias", [(1, True), (5, False), (16, True)])
def test_linear_silu_mul_epilogue(m: int, with_bias: bool) -> None:
    """A ``[gate | up]`` weight with ``silu_mul``: each program streams a gate strip and its up strip and writes
    SiLU-and-mul of the two (float32 here: the roundings to the dtype are exact no-ops), against the reference
    product followed by SiLU-and-mul; ragged halves (masked strips) and tiles dividing them; the dispatcher on the
    CPU applies SiLU-and-mul after its kernel."""
    torch.manual_seed(m)
    half, k = randint(20, 60), randint(40, 300)
    x = torch.randn(m, k)
    w = torch.randn(2 * half, k) * k**-0.5
    b = torch.randn(2 * half) if with_bias else None
    want = activation.silu_and_mul_ref(linear.linear_ref(x.double(), w.double(), b.double() if with_bias else None))
    for cfg in (None, linear.SkinnyConfig(32, 32, 4, 2)):
        out = linear.linear_triton(x, w, b, config=cfg, silu_mul=True)
        assert out.shape == (m, half) and rel_err(out, want) < TOL[torch.float32]
    assert rel_err(linear.linear(x, w, b, silu_mul=True), want) < TOL[torch.float32]
    with pytest.raises(ValueError, match="even number"):
        linear.linear_triton(x, w[1:], silu_mul=True)


def test_linear_float32_weight_with_half_x() -> None:
    """DeepSeek's router: a float32 weight with fp16 x computes in float32 (x cast exactly in the kernel), the
    dispatcher on the CPU casts x first; the result is float32."""
    torch.manual_seed(8)
    x, w = torch.randn(3, 72).half(), torch.randn(16, 72)
    want = linear.linear_ref(x.float(), w)
    got = linear.linear_triton(x, w)
    assert got.dtype == torch.float32 and rel_err(got, want) < 1e-6
    assert linear.linear(x, w).dtype == torch.float32 and rel_err(linear.linear(x, w), want) < 1e-6


def test_linear_leading_dims_and_errors() -> None:
    x, w = torch.randn(2, 3, 40), torch.randn(24, 40)
    out = linear.linear_triton(x, w)
    assert out.shape == (2, 3, 24) and rel_err(out, linear.linear_ref(x, w)) < 1e-5
    with pytest.raises(ValueError, match="at most 16 rows"):
        linear.linear_triton(torch.randn(17, 40), w)
    with pytest.raises(ValueError, match="does not fit"):  # dtypes differ (a half weight with float32 x)
        linear.linear_triton(torch.randn(1, 40), w.half())
    with pytest.raises(ValueError, match="does not fit"):
        linear.linear_triton(torch.randn(1, 41), w)
    # On the CPU the dispatcher takes the threaded decode kernel for float32 inputs of up to 16 rows
    # (kernels/cpu/linear.py, tested in tests/test_cpu_linear.py) and the reference for everything else.
    from xinf_sglang.kernels.cpu import linear as cpu_linear

    assert torch.equal(linear.linear(x, w), cpu_linear.linear_cpu(x, w))
    big = torch.randn(17, 40)
    assert torch.equal(linear.linear(big, w), linear.linear_ref(big, w))
    assert torch.equal(linear.linear(x.double(), w.double()), linear.linear_ref(x.double(), w.double()))


# ---------------------------------------------------------------- elementwise / row kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype: torch.dtype, with_residual: bool) -> None:
    torch.manual_seed(1 + with_residual)
    lead = (randint(1, 3), randint(1, 4))
    n = randint(8, 100)  # mostly not a power of two: exercises the masked tail
    x = torch.randn(*lead, n).mul(3).to(dtype)
    w = torch.randn(n).to(dtype)
    res = torch.randn(*lead, n).to(dtype) if with_residual else None
    eps = 1e-6
    out, new_res = norm.rms_norm_triton(x, w, eps, res)
    ref, ref_res = norm.rms_norm_ref(x, w, eps, res)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel_err(out, ref) < TOL[dtype]
    if with_residual:
        assert torch.equal(new_res, ref_res)  # one rounding of the exact sum in both
    else:
        assert new_res is None


def test_rms_norm_strided_input_and_fp32_weight() -> None:
    torch.manual_seed(3)
    base = torch.randn(4, 2 * 48)
    x = base[:, :48]  # row stride 96: the kernel reads strided rows
    w = torch.randn(48)
    out, _ = norm.rms_norm_triton(x.half(), w, 1e-5)  # fp32 weight * fp16 row -> fp32, as in torch
    ref, _ = norm.rms_norm_ref(x.half(), w, 1e-5)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-5
    out, _ = norm.rms_norm_triton(x, w, 1e-5)
    assert rel_err(out, norm.rms_norm_ref(x, w, 1e-5)[0]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qk_rms_norm_reads_the_qkv_views(dtype: torch.dtype) -> None:
    """Qwen3's q/k head norms in one launch, straight from the strided q and k views of a qkv output (ragged
    head_dim: the masked tail), equal to ``rms_norm_ref`` per tensor; fp32 weights promote as in torch."""
    torch.manual_seed(6)
    t, hq, hk, d = 3, 4, 2, 24
    qkv = torch.randn(t, (hq + 2 * hk) * d).mul(3).to(dtype)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.reshape(t, hq, d), k.reshape(t, hk, d)
    for wdtype in (dtype, torch.float32):
        wq, wk = torch.randn(d).to(wdtype), torch.randn(d).to(wdtype)
        got_q, got_k = norm.qk_rms_norm_triton(q, k, wq, wk, 1e-6)
        for got, x, w in ((got_q, q, wq), (got_k, k, wk)):
            ref = norm.rms_norm_ref(x, w, 1e-6)[0]
            assert got.shape == ref.shape and got.dtype == ref.dtype and got.is_contiguous()
            assert rel_err(got, ref) < TOL[dtype]
    with pytest.raises(ValueError, match="must be"):
        norm.qk_rms_norm_triton(q, k[..., :8], wq, wk, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    h = randint(5, 70)
    x = torch.randn(randint(1, 3), randint(1, 4), 2 * h).mul(4).to(dtype)
    out = activation.silu_and_mul_triton(x)
    ref = activation.silu_and_mul_ref(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < TOL[dtype]


def _llama3_inv_freq(head_dim: int) -> torch.Tensor:
    from xinf_sglang.runtime.model_loader.model_config import RopeConfig
    from xinf_sglang.runtime.layers.rope import rope_inv_freq

    rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, original_max_position_embeddings=64)
    return rope_inv_freq(rope, head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scaling", ["default", "llama3"])
def test_apply_rotary(dtype: torch.dtype, scaling: str) -> None:
    torch.manual_seed(5 + (scaling == "llama3"))
    t, hq, hkv, d = randint(1, 9), 4, 2, 32
    if scaling == "llama3":
        inv_freq = _llama3_inv_freq(d)
        # The scaling must actually change something, or this case tests nothing new.
        assert not torch.allclose(inv_freq, 1.0 / 500000.0 ** (torch.arange(0, d, 2).float() / d))
    else:
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2).float() / d)
    positions = torch.randint(0, 4096, (t,))
    cos, sin = rotary.rotary_cos_sin(inv_freq, positions, dtype)
    # q and k as views of a fused qkv projection (token stride != heads * D), as the model produces them.
    qkv = torch.randn(t, (hq + 2 * hkv) * d).to(dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    q_out, k_out = rotary.apply_rotary_triton(q, k, cos, sin)
    q_ref, k_ref = rotary.apply_rotary_ref(q, k, cos, sin)
    assert q_out.dtype == q_ref.dtype and k_out.shape == k_ref.shape
    assert rel_err(q_out, q_ref) < TOL[dtype] and rel_err(k_out, k_ref) < TOL[dtype]
    assert torch.equal(qkv[:, : hq * d].view(t, hq, d), q)  # inputs untouched


@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.float16])
def test_store_kv(buf_dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    num_slots, hkv, d = 50, 2, 16
    t = randint(1, 12)
    loc = torch.randperm(num_slots)[:t] + 1  # distinct, never the dummy slot 0
    kv = torch.randn(t, 2 * hkv * d)  # float32 source, cast into the buffer dtype
    k = kv[:, : hkv * d].view(t, hkv, d)
    v = kv[:, hkv * d :].view(t, hkv, d)
    bufs = [torch.randn(num_slots + 1, hkv, d).to(buf_dtype) for _ in range(2)]
    ref = [b.clone() for b in bufs]
    store_kv.store_kv_triton(bufs[0], bufs[1], loc, k, v)
    store_kv.store_kv_ref(ref[0], ref[1], loc, k, v)
    assert torch.equal(bufs[0], ref[0]) and torch.equal(bufs[1], ref[1])


# ---------------------------------------------------------------- attention over the pool




@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (4, 1, 32), (2, 2, 16)])
def test_decode_attention(dtype: torch.dtype, hq: int, hkv: int, d: int) -> None:
    torch.manual_seed(7 + hq * hkv + d)
    bs = randint(2, 3)
    seq = [randint(1, 40) for _ in range(bs)]
    seq[0], seq[1] = 40, 1  # a long one (many splits) and a single-token history
    num_slots = 160
    kb, vb = random_pool(num_slots, hkv, d, dtype)
    table, rows = random_table(seq, num_slots, width=48)
    seq_lens = torch.tensor(seq)
    q = torch.randn(bs, hq, d).to(dtype)
    sm_scale = 1.0 / math.sqrt(d)
    ref = decode_attention.decode_attention_ref(q, kb, vb, table, rows, seq_lens, sm_scale)
    # (num_splits, min_split_tokens): one split; splits of >= 8 tokens (request 0 uses 3 tiles of 16); more splits
    # than a request can use (the rest must be skipped); the heuristic's own choice.
    for num_splits, min_tokens in [(1, 8), (3, 8), (7, 1), (None, 8)]:
        out = decode_attention.decode_attention_triton(
            q, kb, vb, table, rows, seq_lens, sm_scale, num_splits=num_splits, min_split_tokens=min_tokens, block_n=16
        )
        assert out.shape == ref.shape and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], (num_splits, min_tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (4, 1, 32)])
@pytest.mark.parametrize("large", [False, True], ids=["one-launch", "rotary-store-first"])
def test_decode_attention_new_token(dtype: torch.dtype, hq: int, hkv: int, d: int, large: bool) -> None:
    """Rotary + store-KV + attention of the step's own token (``NewToken``; one launch for small batches, the
    rotary and store kernels first for larger ones) against the three references in a row: the output, and the
    pool after it, where each token's rotated K and its V must land at its slot."""
    torch.manual_seed(9 + hq * hkv + d + large)
    # A long history (several splits), the token alone in a split of its own (17 = 16 + 1 with splits of 16),
    # a first decode token with no history, and one of random length; more rows past the small-batch bound.
    seq = [40, 17, 1, randint(2, 40)]
    seq += [randint(1, 40) for _ in range(decode_attention.DECODE_SMALL_BATCH + 1 - len(seq) if large else 0)]
    bs, num_slots = len(seq), 400
    kb, vb = random_pool(num_slots, hkv, d, dtype)
    table, rows = random_table(seq, num_slots, width=48)
    seq_lens = torch.tensor(seq)
    loc = table[rows, seq_lens - 1].long()  # the table already maps the token's position to its slot
    # q, k and v as views of one fused projection, as the model produces them.
    qkv = torch.randn(bs, (hq + 2 * hkv) * d).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
    q, k, v = q.view(bs, hq, d), k.view(bs, hkv, d), v.view(bs, hkv, d)
    cos, sin = rotary.rotary_cos_sin(_llama3_inv_freq(d), seq_lens - 1, dtype)
    new = decode_attention.NewToken(k, v, cos, sin, loc)
    kr, vr = kb.clone(), vb.clone()
    ref = decode_attention.decode_attention_ref(q, kr, vr, table, rows, seq_lens, 0.3, new)
    for num_splits, min_tokens in [(1, 8), (3, 16), (7, 1)]:
        kt, vt = kb.clone(), vb.clone()
        out = decode_attention.decode_attention_triton(
            q, kt, vt, table, rows, seq_lens, 0.3, new_token=new, num_splits=num_splits,
            min_split_tokens=min_tokens, block_n=16,
        )
        assert rel_err(out, ref) < TOL[dtype], (num_splits, min_tokens)
        assert torch.equal(kt, kr) and torch.equal(vt, vr), (num_splits, min_tokens)
    # The unfused contract on the pool the fused launch left: the same attention.
    out = decode_attention.decode_attention_triton(q=rotary.apply_rotary_ref(q, k, cos, sin)[0], k_buffer=kr,
        v_buffer=vr, req_to_token=table, req_pool_indices=rows, seq_lens=seq_lens, sm_scale=0.3, block_n=16)
    assert rel_err(out, ref) < TOL[dtype]
    # A row without a position (seq_len 0) gets zeros; its token is still stored, as every row's is.
    kt, vt = kb.clone(), vb.clone()
    empty = seq_lens.clone()
    empty[1] = 0
    out = decode_attention.decode_attention_triton(q, kt, vt, table, rows, empty, 0.3, new_token=new, block_n=16)
    assert torch.equal(out[1], torch.zeros(hq, d, dtype=dtype))
    assert torch.equal(kt, kr) and torch.equal(vt, vr)
    with pytest.raises(ValueError, match="dtype"):
        decode_attention.decode_attention_triton(
            q, kt, vt, table, rows, seq_lens, 0.3, new_token=decode_attention.NewToken(k, v, cos.double(), sin, loc)
        )
    with pytest.raises(ValueError, match="new_token k/v"):
        decode_attention.decode_attention_triton(
            q, kt, vt, table, rows, seq_lens, 0.3, new_token=decode_attention.NewToken(k[:2], v, cos, sin, loc)
        )


def test_decode_attention_preallocated_buffers() -> None:
    """The CUDA-graph path: oversized, NaN-filled intermediate buffers and a fixed out; stale splits must not leak."""
    torch.manual_seed(8)
    hq, hkv, d = 4, 2, 16
    seq = [33, 5, 17]
    kb, vb = random_pool(80, hkv, d, torch.float32)
    table, rows = random_table(seq, 80, width=40)
    seq_lens = torch.tensor(seq)
    q = torch.randn(3, hq, d)
    mid_o = torch.full((5, hq, 6, d), float("nan"))
    mid_lse = torch.full((5, hq, 6), float("nan"))
    out = torch.empty(3, hq, d)
    counters = decode_attention.decode_split_counters(5, hkv, q.device)
    ref = decode_attention.decode_attention_ref(q, kb, vb, table, rows, seq_lens, 0.3)
    for _ in range(2):  # the second launch reuses the counters the first one left behind
        res = decode_attention.decode_attention_triton(
            q, kb, vb, table, rows, seq_lens, 0.3, num_splits=4, mid_o=mid_o, mid_lse=mid_lse,
            split_counters=counters, out=out, min_split_tokens=4, block_n=16,
        )
        assert res.data_ptr() == out.data_ptr()
        assert rel_err(out, ref) < 1e-5
        # The program that merged a request's splits re-zeroed its counter (invariant of the one-launch merge).
        assert not counters.any()
    # An empty padded row (seq_len 0) gives zeros, not NaN.
    out0 = decode_attention.decode_attention_triton(
        q, kb, vb, table, rows, torch.tensor([33, 0, 17]), 0.3, num_splits=4, min_split_tokens=4, block_n=16
    )
    assert torch.equal(out0[1], torch.zeros(hq, d)) and rel_err(out0[0], ref[0]) < 1e-5
    with pytest.raises(ValueError, match="split_counters"):
        decode_attention.decode_attention_triton(
            q, kb, vb, table, rows, seq_lens, 0.3, split_counters=torch.zeros(5, dtype=torch.int64)
        )
    with pytest.raises(ValueError, match="mid_o"):
        decode_attention.decode_attention_triton(
            q, kb, vb, table, rows, seq_lens, 0.3, num_splits=8, mid_o=mid_o, mid_lse=mid_lse
        )


def test_decode_num_splits() -> None:
    f = decode_attention.decode_num_splits
    assert f(1, 8, num_sms=132) == decode_attention.DECODE_MAX_SPLITS  # small batches are split to fill the GPU
    assert f(78, 8, num_sms=132) == 4  # ceil(16 * 132 / (78 * 8)): several short programs per SM
    assert f(512, 8, num_sms=132) == 1  # 4096 programs already fill it
    assert f(1, 1, num_sms=132) == decode_attention.DECODE_MAX_SPLITS
    assert f(1, 8, num_sms=132, max_seq_len=300) == 3  # >= DECODE_MIN_SPLIT_TOKENS (128) tokens per split
    assert f(1, 8, num_sms=132, max_seq_len=300, min_split_tokens=512) == 1  # short histories: one split, no merge
    assert f(1, 8, num_sms=132, max_seq_len=1) == 1
    assert all(f(b, 8, num_sms=132) >= f(b + 1, 8, num_sms=132) >= 1 for b in range(1, 300))
    with pytest.raises(ValueError):
        f(0, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (4, 4, 32)])
def test_extend_attention(dtype: torch.dtype, hq: int, hkv: int, d: int) -> None:
    torch.manual_seed(9 + hkv + d)
    # (prefix, extend): no prefix and several q blocks; a prefix with a one-token extend; a random one.
    reqs = [(0, randint(17, 36)), (randint(1, 20), 1), (randint(0, 20), randint(1, 20))]
    seq = [p + n for p, n in reqs]
    ext = [n for _, n in reqs]
    num_slots = 160
    kb, vb = random_pool(num_slots, hkv, d, dtype)
    table, rows = random_table(seq, num_slots, width=64)
    q = torch.randn(sum(ext), hq, d).to(dtype)
    seq_lens, ext_lens = torch.tensor(seq), torch.tensor(ext)
    ext_start = torch.cumsum(ext_lens, 0) - ext_lens
    sm_scale = 1.0 / math.sqrt(d)
    args = (q, kb, vb, table, rows, seq_lens, ext_lens, ext_start, sm_scale)
    ref = extend_attention.extend_attention_ref(*args)
    out = extend_attention.extend_attention_triton(*args, block_m=16, block_n=16)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    # max_extend_len given by the host (no device read) and a tile that covers whole requests.
    out2 = extend_attention.extend_attention_triton(*args, max_extend_len=max(ext), block_m=64, block_n=32)
    assert rel_err(out2, ref) < TOL[dtype]


# ---------------------------------------------------------------- grammar bitmask


def _bitmask_by_loop(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The layout spelled out token by token: bit j of word w (LSB first) covers token 32 * w + j."""
    out = logits.clone()
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            word = int(bitmask[b, t // 32]) & 0xFFFFFFFF
            if not (word >> (t % 32)) & 1:
                out[b, t] = float("-inf")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_bitmask(dtype: torch.dtype) -> None:
    torch.manual_seed(10)
    bs, vocab = 3, randint(70, 200)  # vocab not a multiple of 32: the last word is partial
    words = (vocab + 31) // 32
    logits = torch.randn(bs, vocab).to(dtype)
    bitmask = torch.randint(-(2**31), 2**31, (bs, words), dtype=torch.int64).to(torch.int32)
    bitmask[1] = -1  # an unconstrained row: allow all
    bitmask[2, 0] = -(2**31)  # only bit 31 set: the sign bit must read as "allowed"
    expected = _bitmask_by_loop(logits, bitmask)
    ref = token_bitmask.apply_token_bitmask_ref(logits.clone(), bitmask)
    assert torch.equal(ref, expected)
    assert torch.equal(ref[1], logits[1])
    got = logits.clone()
    res = token_bitmask.apply_token_bitmask_triton(got, bitmask, block=64)  # several programs per row
    assert res.data_ptr() == got.data_ptr()
    assert torch.equal(got, expected)


def test_token_bitmask_rejects_short_mask() -> None:
    with pytest.raises(ValueError, match="does not cover"):
        token_bitmask.apply_token_bitmask_ref(torch.zeros(2, 65), torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        token_bitmask.apply_token_bitmask_ref(torch.zeros(2, 64), torch.zeros(2, 2, dtype=torch.int64))


# ---------------------------------------------------------------- dispatch and import


def test_cpu_dispatch_uses_reference() -> None:
    from xinf_sglang import kernels

    from xinf_sglang.kernels.cpu import elementwise as cpu_elementwise

    torch.manual_seed(11)
    x, w = torch.randn(3, 8), torch.randn(8)
    # float32 / bfloat16 / float16 CPU rows take the fused C++ kernels (kernels/cpu/elementwise.py;
    # tests/test_cpu_elementwise.py)
    assert torch.equal(kernels.rms_norm(x, w, 1e-6)[0], cpu_elementwise.rms_norm_cpu(x, w, 1e-6)[0])
    gu = torch.randn(2, 10)
    assert torch.equal(kernels.silu_and_mul(gu), cpu_elementwise.silu_and_mul_cpu(gu))
    assert torch.equal(kernels.silu_and_mul(gu.bfloat16()), cpu_elementwise.silu_and_mul_cpu(gu.bfloat16()))
    # other dtypes the reference
    xd, wd = x.double(), w.double()
    assert torch.equal(kernels.rms_norm(xd, wd, 1e-6)[0], kernels.rms_norm_ref(xd, wd, 1e-6)[0])
    assert torch.equal(kernels.silu_and_mul(gu.double()), kernels.silu_and_mul_ref(gu.double()))
    logits, mask = torch.randn(2, 40), torch.randint(-5, 5, (2, 2), dtype=torch.int32)
    assert torch.equal(kernels.apply_token_bitmask_(logits.clone(), mask), kernels.apply_token_bitmask_ref(logits, mask))


def test_package_imports_without_triton() -> None:
    """macOS / Windows have no triton: the package must import and run its references."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "import xinf_sglang.kernels as k\n"
        "x = torch.randn(2, 8, dtype=torch.float64)\n"
        "w = torch.ones(8, dtype=torch.float64)\n"
        "assert torch.equal(k.rms_norm(x, w, 1e-6)[0], k.rms_norm_ref(x, w, 1e-6)[0])\n"
        "from xinf_sglang.kernels import norm\n"
        "assert norm.triton is None\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_cpu_only_torch_treats_triton_as_absent(tmp_path, tiny_model) -> None:
    """A torch without CUDA / ROCm cannot launch a Triton kernel: with TRITON_INTERPRET unset the process treats
    triton as not installed (kernels/__init__.py; ~70 MiB saved), every model module imports, and an engine (a
    GGUF, its linears in their blocks) answers as it does with triton imported."""
    if torch.version.cuda is not None or torch.version.hip is not None:
        pytest.skip("this torch has a GPU backend: triton is imported there")
    from xinf_sglang.runtime.testing.gguf_writer import write_gguf

    from .engine_helpers import engine_greedy

    model = write_gguf(tiny_model("llama"), tmp_path / "tiny.gguf", "Q8_0")
    prompt = [[5, 17, 42, 8, 99]]
    code = (
        "import importlib, pkgutil, sys\n"
        "from xinf_sglang.runtime import Engine, EngineConfig, SamplingParams\n"
        "import xinf_sglang.runtime.models as models\n"
        "for m in pkgutil.walk_packages(models.__path__, 'xinf_sglang.runtime.models.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert sys.modules.get('triton', 0) is None and importlib.util.find_spec('triton') is None\n"
        f"e = Engine(EngineConfig(model_path={str(model)!r}, device='cpu', dtype='float32'))\n"
        f"out = e.generate(input_ids={prompt!r}, sampling_params=SamplingParams(max_new_tokens=8, temperature=0, "
        "ignore_eos=True))\n"
        "e.shutdown()\n"
        "print(out[0].token_ids)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(engine_greedy(model, prompt, 8)[0])


# ---------------------------------------------------------------- programmatic dependent launch

# The kernels of the model's forward: each may be launched with PDL on Hopper (kernels/pdl.py).
PDL_KERNELS = [
    (norm, "_rms_norm_kernel"), (norm, "_qk_norm_kernel"), (activation, "_silu_and_mul_kernel"), (rotary, "_rotary_kernel"),
    (store_kv, "_store_kv_kernel"), (decode_attention_kernel, "decode_kernel"), (extend_attention, "_extend_kernel"),
    (linear, "_skinny_linear_kernel"),
]


@pytest.mark.parametrize("module,kernel", PDL_KERNELS, ids=[k for _, k in PDL_KERNELS])
def test_pdl_kernels_wait_before_any_memory_access(module, kernel: str) -> None:
    """The PDL contract (kernels/pdl.py): a kernel that may start before its predecessor has finished waits for it
    (``pdl_wait(USE_PDL)``) before any store or atomic, and before any load of what a predecessor may write, so its
    launch is as ordered as a plain one. Everything outside the statements that follow the wait in its block (what
    comes before it, and what runs without it, such as a program that exits early) may only do index arithmetic,
    ``prefetch_l2`` and loads of the module's ``PDL_EARLY_READS`` (step inputs written before the forward), directly
    or through a jit helper that only loads (no store, no atomic) and gets only pointers of that list."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(inspect.getsource(module))
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == kernel)
    assert "USE_PDL" in [a.arg for a in fn.args.args]
    pointers = {a.arg for a in fn.args.args if a.arg.isupper() and not a.annotation}  # X, W, KB, ... by convention

    def ordered(block: list[ast.stmt]) -> list[ast.stmt] | None:
        """The statements after the wait in ``block`` or in an ``if`` body inside it; None if there is no wait."""
        for i, stmt in enumerate(block):
            if ast.unparse(stmt) == "pdl_wait(USE_PDL)":
                return block[i + 1 :]
            if isinstance(stmt, ast.If) and (found := ordered(stmt.body)) is not None:
                return found
        return None

    def root(expr: ast.expr) -> ast.expr:
        while isinstance(expr, (ast.BinOp, ast.Subscript)):
            expr = expr.left if isinstance(expr, ast.BinOp) else expr.value
        return expr

    def call_name(call: ast.Call) -> str:
        return call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")

    after = ordered(fn.body)
    assert after is not None, f"{kernel} never calls pdl_wait(USE_PDL)"
    waited = {id(node) for stmt in after for node in ast.walk(stmt)}
    calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and id(n) not in waited]
    names = {call_name(c) for c in calls}
    memory = {n for n in names if n == "store" or n.startswith("atomic")}
    assert not memory, f"{kernel} writes memory outside what follows pdl_wait: {sorted(memory)}"
    # Loads without the wait only from the kernel's declared step inputs, which no kernel of the forward writes.
    early = set(getattr(module, "PDL_EARLY_READS", ()))
    allowed = {"program_id", "arange", "minimum", "maximum", "cdiv", "to", "static_range", "prefetch_l2", "load",
               "zeros", "pdl_wait", "_split_len"}
    for call in calls:
        name = call_name(call)
        if name == "load":
            r = root(call.args[0])
            assert isinstance(r, ast.Name) and r.id in early, (
                f"{kernel} loads {ast.unparse(call.args[0])} before pdl_wait; allowed: {sorted(early)}"
            )
        elif name not in allowed:
            helper = getattr(module, name, None)
            assert helper is not None and hasattr(helper, "fn"), f"{kernel} calls {name} before pdl_wait"
            source = textwrap.dedent(inspect.getsource(helper.fn))
            body = {call_name(c) for c in ast.walk(ast.parse(source)) if isinstance(c, ast.Call)}
            assert not {n for n in body if n == "store" or n.startswith("atomic")}, f"{name} writes memory"
            passed = {a.id for a in map(root, call.args) if isinstance(a, ast.Name) and a.id in pointers}
            assert passed <= early, f"{kernel} passes {sorted(passed - early)} to {name} before pdl_wait"


def test_pdl_is_off_without_a_hopper_gpu() -> None:
    """PDL only on CUDA devices that have it: never for CPU tensors (the interpreter), and the kernel flag and
    triton's launch option always agree."""
    from xinf_sglang.kernels import pdl

    assert pdl.pdl_kwargs(torch.device("cpu")) == {"USE_PDL": False, "launch_pdl": False}
    code = (
        "import torch\n"
        "from xinf_sglang.kernels import pdl\n"
        "assert not pdl.pdl_supported(torch.device('cpu'))\n"
        "print(pdl.HAS_GDC)\n"
    )
    # Also without the interpreter and with the off switch: still off on a machine without a GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"SGLITE_DISABLE_PDL": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- the Triton attention backend


def _backend_batches(num_slots: int):
    """An extend batch (prefix 0 / > 0 / extend 1) and the decode batch that follows it, with their pool table."""
    from xinf_sglang.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode

    reqs = [(0, 9), (12, 1), (5, 20)]  # (cached prefix, new tokens)
    seq = [p + n for p, n in reqs]
    table, rows = random_table([s + 1 for s in seq], num_slots, width=48)  # room for one decode token each
    ext = torch.tensor([n for _, n in reqs])
    seq_lens = torch.tensor(seq)
    start = torch.cumsum(ext, 0) - ext
    loc = torch.cat([table[r, p : p + n] for r, (p, n) in zip(rows.tolist(), reqs)]).long()
    positions = torch.cat([torch.arange(p, p + n) for p, n in reqs])
    t = int(ext.sum())
    extend = ForwardBatch(
        ForwardMode.EXTEND, torch.zeros(t, dtype=torch.int64), positions, loc, rows, seq_lens, ext, start,
        start + ext - 1,
    )
    dec_lens = seq_lens + 1
    dec_loc = table[rows, seq_lens].long()
    ones = torch.ones(len(reqs), dtype=torch.int64)
    decode = ForwardBatch(
        ForwardMode.DECODE, torch.zeros(len(reqs), dtype=torch.int64), seq_lens.clone(), dec_loc, rows, dec_lens,
        ones, torch.arange(len(reqs)), torch.arange(len(reqs)),
    )
    return table, extend, decode


@pytest.mark.parametrize("with_heads", [True, False])
def test_triton_backend_matches_torch_backend(with_heads: bool) -> None:
    """The whole seam (store K/V, extend, decode, CUDA-graph metadata) against the reference backend."""
    from xinf_sglang.runtime.layers.attention.backend import TorchAttentionBackend
    from xinf_sglang.runtime.layers.attention.triton_backend import TritonAttentionBackend
    from xinf_sglang.runtime.mem_cache.kv_pool import KVPool

    torch.manual_seed(12)
    hq, hkv, d, num_slots, layers = 4, 2, 16, 120, 2
    table, extend, decode = _backend_batches(num_slots)
    pools = [KVPool(num_slots, layers, hkv, d, torch.float32, torch.device("cpu")) for _ in range(2)]
    for layer in range(layers):  # the cached prefixes: the same random K/V in both pools
        for bufs in ("k_buffers", "v_buffers"):
            cached = torch.randn(num_slots + 1, hkv, d)
            getattr(pools[0], bufs)[layer].copy_(cached)
            getattr(pools[1], bufs)[layer].copy_(cached)
    ref = TorchAttentionBackend(pools[0], table, 0.25)
    tri = TritonAttentionBackend(pools[1], table, 0.25, num_q_heads=hq if with_heads else None, min_split_tokens=4)
    for batch in (extend, decode):
        ref.init_forward_metadata(batch)
        tri.init_forward_metadata(batch)
        cos, sin = rotary.rotary_cos_sin(_llama3_inv_freq(d), batch.positions, torch.float32)
        for layer in range(layers):
            q = torch.randn(batch.num_tokens, hq, d)
            k, v = torch.randn(batch.num_tokens, hkv, d), torch.randn(batch.num_tokens, hkv, d)
            want = ref.forward(q, k, v, cos, sin, layer, batch)
            got = tri.forward(q, k, v, cos, sin, layer, batch)
            assert rel_err(got, want) < 1e-5, (batch.mode, layer)
    for layer in range(layers):
        assert torch.equal(pools[0].k_buffers[layer], pools[1].k_buffers[layer])
        assert torch.equal(pools[0].v_buffers[layer], pools[1].v_buffers[layer])
    if not with_heads:
        with pytest.raises(ValueError, match="num_q_heads"):
            tri.init_cuda_graph_state(4, 64)
        return
    # CUDA-graph hooks: fixed buffers whose views do not move between batch sizes, split count from bs only.
    tri.init_cuda_graph_state(max_bs=4, max_context_len=48)
    tri.init_forward_metadata_capture(decode)
    captured = tri.metadata
    assert captured.mid_o.data_ptr() == tri.graph_state.mid_o_flat.data_ptr()
    q, k, v = (torch.randn(decode.num_tokens, h, d) for h in (hq, hkv, hkv))
    cos, sin = rotary.rotary_cos_sin(_llama3_inv_freq(d), decode.positions, torch.float32)
    want = ref.forward(q, k, v, cos, sin, 0, decode)
    assert rel_err(tri.forward(q, k, v, cos, sin, 0, decode), want) < 1e-5
    tri.init_forward_metadata_replay(decode)
    assert tri.metadata.num_splits == captured.num_splits
    assert tri.metadata.mid_o.data_ptr() == captured.mid_o.data_ptr()
    with pytest.raises(ValueError, match="only decode"):
        tri.init_forward_metadata_capture(extend)
