"""The row-wise Triton kernels and the skinny linear against their torch references on the GPU, at Llama-3.1-8B's
shapes (rows of one decode token, a decode batch and a prefill chunk) in float32, float16 and bfloat16: RMSNorm
(+ residual), SiLU-and-mul, rotary (Llama 3.1 scaling), store-KV, the grammar bitmask, argmax, the decode step
inputs, and the skinny linear for the qkv / down / LM-head weights. The CPU tier (tests/test_kernels.py) checks
the same kernels at tiny shapes under the interpreter, without bf16; both compare with tests/pool_helpers.py."""

from __future__ import annotations

import importlib

import pytest
import torch

from ..pool_helpers import TOL, rel_err
from . import randn, require_gpus

require_gpus()
pytestmark = pytest.mark.cuda

# By module name: the package re-exports functions named like some of its modules.
norm, activation, rotary, store_kv, token_bitmask, linear, argmax, step_inputs = (
    importlib.import_module(f"xinf_sglang.kernels.{name}")
    for name in ("norm", "activation", "rotary", "attention.store_kv", "token_bitmask", "linear", "argmax",
                 "step_inputs")
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = torch.device("cuda")
TOKENS = [1, 64, 4096]  # one decode token, a decode batch, a prefill chunk


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(shape, dtype: torch.dtype, tokens: int, residual: bool) -> None:
    torch.manual_seed(tokens)
    x = randn(tokens, shape.hidden, dtype=dtype, scale=3.0)
    w = randn(shape.hidden, dtype=dtype)
    r = randn(tokens, shape.hidden, dtype=dtype) if residual else None
    out, new_r = norm.rms_norm_triton(x, w, 1e-5, r)
    ref, ref_r = norm.rms_norm_ref(x, w, 1e-5, r)
    assert rel_err(out, ref) < TOL[dtype]
    if residual:
        assert rel_err(new_r, ref_r) < TOL[dtype]


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_rms_norm(dtype: torch.dtype, tokens: int) -> None:
    """Qwen3-30B-A3B's q/k head norms (32 q and 4 kv heads of 128) from the views of one qkv output."""
    torch.manual_seed(tokens)
    qkv = randn(tokens, 40 * 128, dtype=dtype, scale=3.0)
    q, k, _ = qkv.split([32 * 128, 4 * 128, 4 * 128], dim=-1)
    q, k = q.reshape(tokens, 32, 128), k.reshape(tokens, 4, 128)
    wq, wk = randn(128, dtype=dtype), randn(128, dtype=dtype)
    got_q, got_k = norm.qk_rms_norm(q, k, wq, wk, 1e-6)
    assert rel_err(got_q, norm.rms_norm_ref(q, wq, 1e-6)[0]) < TOL[dtype]
    assert rel_err(got_k, norm.rms_norm_ref(k, wk, 1e-6)[0]) < TOL[dtype]


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(shape, dtype: torch.dtype, tokens: int) -> None:
    torch.manual_seed(tokens)
    gu = randn(tokens, 2 * shape.intermediate, dtype=dtype, scale=3.0)
    assert rel_err(activation.silu_and_mul_triton(gu), activation.silu_and_mul_ref(gu)) < TOL[dtype]


@pytest.mark.parametrize("tokens", TOKENS[1:])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_llama3(shape, dtype: torch.dtype, tokens: int) -> None:
    """q and k as strided views of one qkv projection, as the model has them; positions up to 128K."""
    torch.manual_seed(tokens)
    hq, hkv, d = shape.heads, shape.kv_heads, shape.head_dim
    qkv = randn(tokens, shape.qkv_width, dtype=dtype)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    positions = torch.randint(0, 131072, (tokens,), device=CUDA)
    cos, sin = rotary.rotary_cos_sin(shape.inv_freq(CUDA), positions, dtype)
    qo, ko = rotary.apply_rotary_triton(q, k, cos, sin)
    qr, kr = rotary.apply_rotary_ref(q, k, cos, sin)
    assert max(rel_err(qo, qr), rel_err(ko, kr)) < TOL[dtype]


@pytest.mark.parametrize("tokens", TOKENS[1:])
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv(shape, dtype: torch.dtype, tokens: int) -> None:
    """Scattered slots of a 200K-slot pool, K and V as views of one projection: stored exactly."""
    torch.manual_seed(tokens)
    hkv, d, num_slots = shape.kv_heads, shape.head_dim, 200_000
    kb = torch.zeros(num_slots + 1, hkv, d, device=CUDA, dtype=dtype)
    vb = torch.zeros_like(kb)
    kr, vr = kb.clone(), vb.clone()
    loc = torch.randperm(num_slots, device=CUDA)[:tokens] + 1
    kv = randn(tokens, 2 * hkv * d, dtype=dtype)
    k, v = kv[:, : hkv * d].view(tokens, hkv, d), kv[:, hkv * d :].view(tokens, hkv, d)
    store_kv.store_kv_triton(kb, vb, loc, k, v)
    store_kv.store_kv_ref(kr, vr, loc, k, v)
    assert torch.equal(kb, kr) and torch.equal(vb, vr)


@pytest.mark.parametrize("bs", [1, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_bitmask(shape, dtype: torch.dtype, bs: int) -> None:
    torch.manual_seed(bs)
    words = (shape.vocab + 31) // 32
    logits = randn(bs, shape.vocab, dtype=dtype)
    mask = torch.randint(-(2**31), 2**31, (bs, words), device=CUDA, dtype=torch.int64).to(torch.int32)
    mask[0] = -1  # an unconstrained row
    got = token_bitmask.apply_token_bitmask_triton(logits.clone(), mask)
    assert torch.equal(got, token_bitmask.apply_token_bitmask_ref(logits.clone(), mask))


@pytest.mark.parametrize("bs", [1, 8, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_first_of_ties(shape, dtype: torch.dtype, bs: int) -> None:
    torch.manual_seed(bs)
    logits = randn(bs, shape.vocab, dtype=dtype).round(decimals=1)  # many exact ties
    logits[0, [5, 70000, shape.vocab - 1]] = 50.0  # a tie for the max across chunks
    assert torch.equal(argmax.argmax_triton(logits), argmax.argmax_ref(logits))


@pytest.mark.parametrize("b,p", [(1, 1), (5, 8), (130, 136)])
def test_fill_decode_inputs(shape, b: int, p: int) -> None:
    """The graph inputs of a decode step (real rows and padding) and the request->token table, as the reference."""
    torch.manual_seed(b)
    rows, ctx = 512, 4096
    req_rows = torch.randperm(rows, device=CUDA)[:b]
    positions = torch.randint(0, ctx, (b,), device=CUDA)
    host = torch.stack([positions, req_rows, positions + 1]).contiguous()
    ids = torch.randint(0, shape.vocab, (b,), device=CUDA)
    slots = torch.randint(1, 10**6, (b,), device=CUDA)
    table = torch.randint(0, 10**6, (rows, ctx), device=CUDA, dtype=torch.int32)
    outs = []
    for fill in (step_inputs.fill_decode_inputs_triton, step_inputs.fill_decode_inputs_ref):
        static, t = torch.full((5, 256), -7, dtype=torch.int64, device=CUDA), table.clone()
        fill(static[:, :p], host, ids, slots, t)
        outs.append((static, t))
    assert all(torch.equal(x, y) for x, y in zip(*outs))


@pytest.mark.parametrize("m", [1, 8, 16])
@pytest.mark.parametrize("weight", ["qkv", "down", "lm_head"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_skinny_linear(shape, dtype: torch.dtype, weight: str, m: int) -> None:
    """Against a float64 reference; the qkv weight with a bias (Qwen2's)."""
    torch.manual_seed(m)
    n, k = shape.weights()[weight]
    x = randn(m, k, dtype=dtype)
    w = randn(n, k, dtype=dtype, scale=k**-0.5)
    b = randn(n, dtype=dtype) if weight == "qkv" else None
    ref = linear.linear_ref(x.double(), w.double(), b.double() if b is not None else None)
    assert rel_err(linear.linear_triton(x, w, b), ref) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_skinny_linear_silu_mul(shape, dtype: torch.dtype, m: int) -> None:
    """The gate/up weight with ``silu_mul`` (the SwiGLU in the skinny kernel's epilogue) against the float64
    product followed by SiLU-and-mul."""
    torch.manual_seed(m)
    n, k = shape.weights()["gate_up"]
    x = randn(m, k, dtype=dtype)
    w = randn(n, k, dtype=dtype, scale=k**-0.5)
    full = linear.linear_ref(x.double(), w.double())
    want = torch.nn.functional.silu(full[:, : n // 2]) * full[:, n // 2:]
    got = linear.linear_triton(x, w, silu_mul=True)
    assert got.shape == (m, n // 2) and rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 8])
def test_skinny_linear_float32_router(m: int) -> None:
    """DeepSeek-V2-Lite's router (64 x 2048, stored float32) on bf16 x: float32 out, IEEE float32 products."""
    torch.manual_seed(m)
    x = randn(m, 2048, dtype=torch.bfloat16)
    w = randn(64, 2048, dtype=torch.float32, scale=2048**-0.5)
    got = linear.linear(x, w)
    assert got.dtype == torch.float32 and rel_err(got, linear.linear_ref(x.float(), w)) < TOL[torch.float32]
