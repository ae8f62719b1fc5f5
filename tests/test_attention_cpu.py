"""The CPU attention kernel (kernels/cpu/attention.py) against its torch references, on fresh random inputs, and
the engine's choice of the CPU backend.

Inputs vary what the kernel's blocking depends on: lengths around its 64-key blocks and 16-row extend items, GQA
ratios 1..8, head dims that are not multiples of 8, scattered pool slots (a shuffled pool, a table with spare
rows), q/k/v as strided views of one fused projection, batches big enough to run on several threads.
"""

from __future__ import annotations

import math

import pytest
import torch

from xinf_sglang.kernels import NewToken, decode_attention_ref, extend_attention_ref, rotary_cos_sin
from xinf_sglang.kernels.cpu import attention as cpu_attention
from xinf_sglang.kernels.rotary import apply_rotary_ref
from .pool_helpers import random_pool, random_table

TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}
HEADS = [(4, 4, 16), (6, 2, 24), (9, 3, 64), (8, 1, 80), (16, 2, 128)]  # (Hq, Hkv, D): GQA 1, 3, 3, 8, 8


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))




def _fused_qkv(t: int, hq: int, hkv: int, d: int, dtype: torch.dtype):
    """q/k/v as strided views of one fused projection, as the model hands them over."""
    qkv = torch.randn(t, (hq + 2 * hkv) * d).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
    return q.view(t, hq, d), k.view(t, hkv, d), v.view(t, hkv, d)


def _inv_freq(d: int) -> torch.Tensor:
    return 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", HEADS)
def test_decode_matches_reference(dtype: torch.dtype, hq: int, hkv: int, d: int) -> None:
    torch.manual_seed(hq * 100 + hkv * 10 + d)
    # one key, a block exactly, a block plus one, and random lengths up to several blocks
    seq = [1, 64, 65] + torch.randint(2, 300, (int(torch.randint(1, 6, ())),)).tolist()
    num_slots = sum(seq) + int(torch.randint(0, 100, ()))
    kb, vb = random_pool(num_slots, hkv, d, dtype)
    table, rows = random_table(seq, num_slots, width=320)
    seq_lens = torch.tensor(seq)
    q = _fused_qkv(len(seq), hq, hkv, d, dtype)[0]
    sm_scale = 1.0 / math.sqrt(d)
    ref = decode_attention_ref(q, kb, vb, table, rows, seq_lens, sm_scale)
    out = cpu_attention.decode_attention_cpu(q, kb, vb, table, rows, seq_lens, sm_scale)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", HEADS)
def test_decode_new_token_matches_reference(dtype: torch.dtype, hq: int, hkv: int, d: int) -> None:
    """Rotary + store-KV + attention in one call against the three references in a row: the output, and the pool
    after it (the token's rotated K and its V at its slot, nothing else touched)."""
    torch.manual_seed(7 + hq + hkv + d)
    seq = [1, 2, 130] + torch.randint(1, 200, (int(torch.randint(1, 40, ())),)).tolist()  # bs up to 42: threads
    num_slots = sum(seq) + 7
    kb, vb = random_pool(num_slots, hkv, d, dtype)
    table, rows = random_table(seq, num_slots, width=256)
    seq_lens = torch.tensor(seq)
    loc = table[rows, seq_lens - 1].long()  # the table already maps the token's position to its slot
    q, k, v = _fused_qkv(len(seq), hq, hkv, d, dtype)
    cos, sin = rotary_cos_sin(_inv_freq(d), seq_lens - 1, dtype)
    new = NewToken(k, v, cos, sin, loc)
    kr, vr, kc, vc = kb.clone(), vb.clone(), kb.clone(), vb.clone()
    ref = decode_attention_ref(q, kr, vr, table, rows, seq_lens, 0.3, new)
    out = cpu_attention.decode_attention_cpu(q, kc, vc, table, rows, seq_lens, 0.3, new)
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.equal(vc, vr)
    touched = torch.zeros(num_slots + 1, dtype=torch.bool)
    touched[loc] = True
    assert torch.equal(kc[~touched], kb[~touched])
    assert rel_err(kc[touched], kr[touched]) < TOL[dtype]
    # the unfused contract on the pool it left: the same attention
    out2 = cpu_attention.decode_attention_cpu(apply_rotary_ref(q, k, cos, sin)[0], kc, vc, table, rows, seq_lens, 0.3)
    assert rel_err(out2, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_do_not_depend_on_the_batch(dtype: torch.dtype) -> None:
    """A big batch runs one work item per request (all its KV heads), a lone request one item per KV head: each
    row's output is bit-equal either way, and matches the reference."""
    torch.manual_seed(5)
    hq, hkv, d = 9, 3, 64
    seq = torch.randint(1, 260, (40,)).tolist()
    num_slots = sum(seq) + 11
    kb, vb = random_pool(num_slots, hkv, d, dtype)
    table, rows = random_table(seq, num_slots, width=300)
    seq_lens = torch.tensor(seq)
    q = _fused_qkv(len(seq), hq, hkv, d, dtype)[0]
    batched = cpu_attention.decode_attention_cpu(q, kb, vb, table, rows, seq_lens, 0.125)
    assert rel_err(batched, decode_attention_ref(q, kb, vb, table, rows, seq_lens, 0.125)) < TOL[dtype]
    for b in range(0, len(seq), 7):
        alone = cpu_attention.decode_attention_cpu(q[b : b + 1], kb, vb, table, rows[b : b + 1], seq_lens[b : b + 1],
                                                   0.125)
        assert torch.equal(alone[0], batched[b])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (8, 1, 80), (4, 4, 16)])
@pytest.mark.parametrize("seq", [[128], [129], [300], [511, 512], [513, 1], [1100], [64, 1030]])
def test_decode_split_kv_small_batch(dtype: torch.dtype, hq: int, hkv: int, d: int, seq: list[int]) -> None:
    """A batch of one or two requests runs one work item per (request, KV head, chunk of keys) on the threads:
    lengths at and past chunk edges, not multiples of 64, up to 8 chunks; each row as the reference and bit-equal
    to the same row computed on one thread (the chunks then run in turn)."""
    torch.manual_seed(sum(seq) + hq + d)
    num_slots = sum(seq) + 13
    kb, vb = random_pool(num_slots, hkv, d, dtype)
    table, rows = random_table(seq, num_slots, width=1200)
    seq_lens = torch.tensor(seq)
    q = _fused_qkv(len(seq), hq, hkv, d, dtype)[0]
    ref = decode_attention_ref(q, kb, vb, table, rows, seq_lens, 0.125)
    out = cpu_attention.decode_attention_cpu(q, kb, vb, table, rows, seq_lens, 0.125)
    assert rel_err(out, ref) < TOL[dtype]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = cpu_attention.decode_attention_cpu(q, kb, vb, table, rows, seq_lens, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, out)


def test_decode_empty_history_gives_zeros_and_still_stores() -> None:
    torch.manual_seed(3)
    hq, hkv, d = 4, 2, 16
    kb, vb = random_pool(20, hkv, d, torch.float32)
    table, rows = random_table([3, 5], 20, width=8)
    seq_lens = torch.tensor([0, 5])
    loc = table[rows, torch.tensor([0, 4])].long()
    q, k, v = _fused_qkv(2, hq, hkv, d, torch.float32)
    cos, sin = rotary_cos_sin(_inv_freq(d), torch.tensor([0, 4]), torch.float32)
    out = cpu_attention.decode_attention_cpu(q, kb, vb, table, rows, seq_lens, 0.25, NewToken(k, v, cos, sin, loc))
    assert torch.equal(out[0], torch.zeros(hq, d))
    assert torch.equal(vb[loc[0]], v[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", HEADS)
def test_extend_matches_reference(dtype: torch.dtype, hq: int, hkv: int, d: int) -> None:
    torch.manual_seed(11 + hq * hkv + d)
    # (prefix, new): no prefix over several 16-row items; a prefix with one new token; a long prefix and a partial
    # last item; an empty extend (a request with nothing new this step); random ones.
    reqs = [(0, 37), (int(torch.randint(1, 90, ())), 1), (150, 17), (5, 0)]
    reqs += [(int(torch.randint(0, 100, ())), int(torch.randint(1, 50, ()))) for _ in range(int(torch.randint(1, 5, ())))]
    seq = [p + n for p, n in reqs]
    ext = [n for _, n in reqs]
    num_slots = sum(seq) + 11
    kb, vb = random_pool(num_slots, hkv, d, dtype)
    table, rows = random_table(seq, num_slots, width=256)
    q = _fused_qkv(sum(ext), hq, hkv, d, dtype)[0]
    seq_lens, ext_lens = torch.tensor(seq), torch.tensor(ext)
    ext_start = torch.cumsum(ext_lens, 0) - ext_lens
    args = (q, kb, vb, table, rows, seq_lens, ext_lens, ext_start, 1.0 / math.sqrt(d))
    ref = extend_attention_ref(*args)
    out = cpu_attention.extend_attention_cpu(*args)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("d", [64, 128])
def test_bf16_pairs_never_read_past_the_visible_keys(d: int) -> None:
    """bf16 P @ V takes two keys at a time (attention_pv_source.py): with odd lengths and blocks that end inside
    a pair, slots outside every request (NaN here) and masked keys must stay out of the result, in decode and in
    extend."""
    torch.manual_seed(d)
    hq, hkv, dtype = 6, 2, torch.bfloat16
    seq = [1, 3, 63, 65, 127, 129]
    num_slots = sum(seq) + 40
    kb, vb = random_pool(num_slots, hkv, d, dtype)
    table, rows = random_table(seq, num_slots, width=160)
    unused = torch.ones(num_slots + 1, dtype=torch.bool)
    unused[table[rows].flatten().long()] = False
    kb[unused], vb[unused] = float("nan"), float("nan")
    seq_lens = torch.tensor(seq)
    q = _fused_qkv(len(seq), hq, hkv, d, dtype)[0]
    out = cpu_attention.decode_attention_cpu(q, kb, vb, table, rows, seq_lens, 0.125)
    assert rel_err(out, decode_attention_ref(q, kb, vb, table, rows, seq_lens, 0.125)) < TOL[dtype]
    ext = torch.tensor([1, 3, 33, 17, 127, 5])
    qe = _fused_qkv(int(ext.sum()), hq, hkv, d, dtype)[0]
    args = (qe, kb, vb, table, rows, seq_lens, ext, torch.cumsum(ext, 0) - ext, 0.125)
    assert rel_err(cpu_attention.extend_attention_cpu(*args), extend_attention_ref(*args)) < TOL[dtype]


def test_extend_large_batch_on_threads() -> None:
    """Enough work for the kernel to spread items over torch's threads; same result as the reference."""
    torch.manual_seed(5)
    hq, hkv, d = 9, 3, 64
    reqs = [(int(torch.randint(0, 64, ())), int(torch.randint(16, 80, ()))) for _ in range(12)]
    seq, ext = [p + n for p, n in reqs], [n for _, n in reqs]
    kb, vb = random_pool(sum(seq), hkv, d, torch.float32)
    table, rows = random_table(seq, sum(seq), width=160)
    q = torch.randn(sum(ext), hq, d)
    ext_lens = torch.tensor(ext)
    args = (q, kb, vb, table, rows, torch.tensor(seq), ext_lens, torch.cumsum(ext_lens, 0) - ext_lens, 0.125)
    assert rel_err(cpu_attention.extend_attention_cpu(*args), extend_attention_ref(*args)) < TOL[torch.float32]


def test_bad_inputs_are_refused() -> None:
    kb, vb = random_pool(8, 2, 16, torch.float32)
    table, rows = random_table([3], 8, width=4)
    q = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="dtype"):
        cpu_attention.decode_attention_cpu(q.double(), kb, vb, table, rows, torch.tensor([3]), 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_attention.decode_attention_cpu(torch.randn(1, 3, 16), kb, vb, table, rows, torch.tensor([3]), 1.0)
    with pytest.raises(ValueError, match="int32"):
        cpu_attention.decode_attention_cpu(q, kb, vb, table.long(), rows, torch.tensor([3]), 1.0)


def test_build_failure_names_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.cpp_extension as ext

    def broken(**kwargs):
        raise OSError("g++: not found")

    cpu_attention.load.cache_clear()
    monkeypatch.setattr(ext, "load_inline", broken)
    try:
        with pytest.raises(RuntimeError, match="could not be built.*g\\+\\+: not found.*attention_backend='torch'"):
            cpu_attention.load()
    finally:
        cpu_attention.load.cache_clear()  # the next caller loads the real build (from torch's cache)


def test_engine_picks_the_cpu_backend(tiny_model) -> None:
    from xinf_sglang.runtime.layers.attention.backend import TorchAttentionBackend
    from xinf_sglang.runtime.layers.attention.cpu_backend import CpuAttentionBackend
    from xinf_sglang.runtime.config import EngineConfig
    from xinf_sglang.runtime.engine.engine import Engine

    path = tiny_model()
    for choice, cls in [("auto", CpuAttentionBackend), ("cpu", CpuAttentionBackend), ("torch", TorchAttentionBackend)]:
        engine = Engine(EngineConfig(model_path=str(path), device="cpu", max_total_tokens=256, attention_backend=choice))
        try:
            assert engine.run_on_scheduler(lambda s: type(s.runner.attn)) is cls, choice
        finally:
            engine.shutdown()
