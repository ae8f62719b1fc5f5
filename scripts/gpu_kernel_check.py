"""Check every Triton kernel of kernels/ against its torch reference on a CUDA GPU, at real model shapes.

Usage (from the repository root, on a machine with an NVIDIA GPU, torch and triton)::

    python scripts/gpu_kernel_check.py                 # everything
    python scripts/gpu_kernel_check.py --only decode   # rows whose kernel name contains "decode"

Shapes are Llama-3.1-8B's (hidden 4096, 32 query heads, 8 KV heads, head_dim 128, intermediate 14336, vocab
128256), batches 1/8/64, histories up to 4096 tokens, extends with and without a cached prefix; dtypes float32,
float16 and bfloat16. The kernels run through their launchers (``*_triton``), the references on the same GPU inputs.

Prints one table: kernel, dtype, shape, relative error ``||out - ref|| / ||ref||``, pass/fail (float32 < 1e-5,
half precision < 1e-2; the bitmask must match exactly), the kernel's median time from ``triton.testing.do_bench``
and its throughput: achieved GB/s (bytes the kernel must move / time) for the memory-bound kernels, TFLOP/s for
extend attention. It also captures the split-KV decode in a CUDA graph and replays it with other sequence lengths,
and runs whole decode layers as a chain of kernels in a CUDA graph (what programmatic dependent launch must keep
ordered).
Exits 1 if any row fails (an exception in a row counts as a failure and is printed), 2 without a CUDA device.

Self-contained: works with the package installed (``pip install -e .``) or straight from a checkout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_chain import llama3_inv_freq  # noqa: E402


def _kernels_package():
    """``xinf_sglang.kernels``, from the installed distribution or else from this checkout."""
    try:
        return importlib.import_module("xinf_sglang.kernels")
    except ImportError:
        # Not installed: the checkout keeps the package's subpackages next to it (kernels/, runtime/), which is
        # what pyproject's package-dir maps; make xinf_sglang.<sub> resolve to <root>/<sub> the same way.
        sys.path.insert(0, str(ROOT))
        pkg = importlib.import_module("xinf_sglang")
        pkg.__path__.append(str(ROOT))
        return importlib.import_module("xinf_sglang.kernels")


# Llama-3.1-8B
HIDDEN, INTERMEDIATE, HQ, HKV, HEAD_DIM, VOCAB = 4096, 14336, 32, 8, 128, 128256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOKENS = (1, 64, 4096)  # rows of the row-wise kernels: one decode token, a decode batch, a prefill chunk
DECODE_BATCHES = (1, 8, 64)
DECODE_MAX_LENS = (1024, 4096)  # request 0 has exactly this history, the others uniform in [max/2, max]
GRAPH_BATCH, GRAPH_WIDTH = 8, 4096
# (cached prefix, new tokens) per request
EXTEND_CASES = {
    "1 req: 4096 new": [(0, 4096)],
    "4 reqs, prefixes 0/1024/2048/3000": [(0, 512), (1024, 256), (2048, 1), (3000, 1000)],
    "8 reqs: 2048 cached + 128 new": [(2048, 128)] * 8,
}
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.int64: 0.5}  # int64: exact (err 0 or 1)
DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64"}


@dataclass
class Row:
    kernel: str
    dtype: torch.dtype
    shape: str
    err: float | None = None
    ok: bool = False
    ms: float | None = None
    throughput: str = ""
    note: str = ""


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bench(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def gbps(num_bytes: float, ms: float) -> str:
    return f"{num_bytes / ms / 1e6:8.1f} GB/s"


class Checker:
    """Runs the checks; each ``check_*`` appends rows."""

    def __init__(self, kernels_pkg, only: str | None) -> None:
        self.k = {
            name: importlib.import_module(f"{kernels_pkg.__name__}.{name}")
            for name in (
                "norm", "activation", "rotary", "store_kv", "decode_attention", "extend_attention", "token_bitmask",
                "linear", "argmax", "step_inputs",
            )
        }
        self.only = only
        self.rows: list[Row] = []
        self.dev = torch.device("cuda")

    # ------------------------------------------------------------------ plumbing

    def run(self, kernel: str, dtype: torch.dtype, shape: str, body: Callable[[Row], None]) -> None:
        if self.only and self.only not in kernel:
            return
        row = Row(kernel, dtype, shape)
        try:
            body(row)
            if row.err is not None:
                row.ok = row.ok or row.err < TOL[dtype]
        except Exception as exc:  # a crash (e.g. out of shared memory) is a failure of that row, not of the run
            row.ok = False
            row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            traceback.print_exc(file=sys.stderr)
        torch.cuda.synchronize()
        self.rows.append(row)
        print_row(row)

    def randn(self, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=self.dev, dtype=torch.float32) * scale).to(dtype)

    # ------------------------------------------------------------------ small kernels

    def check_rms_norm(self) -> None:
        norm = self.k["norm"]
        for dtype in DTYPES:
            for tokens in TOKENS:
                for residual in (False, True):

                    def body(row: Row, dtype=dtype, tokens=tokens, residual=residual) -> None:
                        x = self.randn(tokens, HIDDEN, dtype=dtype, scale=3.0)
                        w = self.randn(HIDDEN, dtype=dtype)
                        r = self.randn(tokens, HIDDEN, dtype=dtype) if residual else None
                        out, new_r = norm.rms_norm_triton(x, w, 1e-5, r)
                        ref, ref_r = norm.rms_norm_ref(x, w, 1e-5, r)
                        row.err = rel_err(out, ref)
                        if residual:
                            row.err = max(row.err, rel_err(new_r, ref_r))
                        row.ms = bench(lambda: norm.rms_norm_triton(x, w, 1e-5, r))
                        moved = nbytes(x, w, out) + (2 * nbytes(x) if residual else 0)
                        row.throughput = gbps(moved, row.ms)

                    name = "rms_norm+residual" if residual else "rms_norm"
                    self.run(name, dtype, f"T={tokens} N={HIDDEN}", body)

    def check_silu_and_mul(self) -> None:
        act = self.k["activation"]
        for dtype in DTYPES:
            for tokens in TOKENS:

                def body(row: Row, dtype=dtype, tokens=tokens) -> None:
                    gu = self.randn(tokens, 2 * INTERMEDIATE, dtype=dtype, scale=3.0)
                    out = act.silu_and_mul_triton(gu)
                    row.err = rel_err(out, act.silu_and_mul_ref(gu))
                    row.ms = bench(lambda: act.silu_and_mul_triton(gu))
                    row.throughput = gbps(nbytes(gu, out), row.ms)

                self.run("silu_and_mul", dtype, f"T={tokens} H={INTERMEDIATE}", body)

    def check_rotary(self) -> None:
        rot = self.k["rotary"]
        inv_freq = llama3_inv_freq(HEAD_DIM).to(self.dev)
        for dtype in DTYPES:
            for tokens in TOKENS[1:]:

                def body(row: Row, dtype=dtype, tokens=tokens) -> None:
                    qkv = self.randn(tokens, (HQ + 2 * HKV) * HEAD_DIM, dtype=dtype)
                    q = qkv[:, : HQ * HEAD_DIM].view(tokens, HQ, HEAD_DIM)  # strided views, as the model has them
                    k = qkv[:, HQ * HEAD_DIM : (HQ + HKV) * HEAD_DIM].view(tokens, HKV, HEAD_DIM)
                    positions = torch.randint(0, 131072, (tokens,), device=self.dev)
                    cos, sin = rot.rotary_cos_sin(inv_freq, positions, dtype)
                    qo, ko = rot.apply_rotary_triton(q, k, cos, sin)
                    qr, kr = rot.apply_rotary_ref(q, k, cos, sin)
                    row.err = max(rel_err(qo, qr), rel_err(ko, kr))
                    row.ms = bench(lambda: rot.apply_rotary_triton(q, k, cos, sin))
                    row.throughput = gbps(2 * nbytes(qo, ko) + nbytes(cos, sin), row.ms)

                self.run("rotary(llama3)", dtype, f"T={tokens} Hq={HQ} Hkv={HKV} D={HEAD_DIM}", body)

    def check_store_kv(self) -> None:
        skv = self.k["store_kv"]
        num_slots = 200_000
        for dtype in DTYPES:
            for tokens in TOKENS[1:]:

                def body(row: Row, dtype=dtype, tokens=tokens) -> None:
                    kb = torch.zeros(num_slots + 1, HKV, HEAD_DIM, device=self.dev, dtype=dtype)
                    vb = torch.zeros_like(kb)
                    kr, vr = kb.clone(), vb.clone()
                    loc = torch.randperm(num_slots, device=self.dev)[:tokens] + 1
                    kv = self.randn(tokens, 2 * HKV * HEAD_DIM, dtype=dtype)
                    k = kv[:, : HKV * HEAD_DIM].view(tokens, HKV, HEAD_DIM)
                    v = kv[:, HKV * HEAD_DIM :].view(tokens, HKV, HEAD_DIM)
                    skv.store_kv_triton(kb, vb, loc, k, v)
                    skv.store_kv_ref(kr, vr, loc, k, v)
                    row.ok = torch.equal(kb, kr) and torch.equal(vb, vr)
                    row.err = 0.0 if row.ok else max(rel_err(kb, kr), rel_err(vb, vr), 1.0)
                    row.ms = bench(lambda: skv.store_kv_triton(kb, vb, loc, k, v))
                    row.throughput = gbps(2 * nbytes(kv) + nbytes(loc), row.ms)

                self.run("store_kv", dtype, f"T={tokens} Hkv={HKV} D={HEAD_DIM}", body)

    def check_linear(self) -> None:
        lin = self.k["linear"]
        weights = {"qkv": ((HQ + 2 * HKV) * HEAD_DIM, HIDDEN), "down": (HIDDEN, INTERMEDIATE), "lm_head": (VOCAB, HIDDEN)}
        for dtype in DTYPES:
            for name, (n, k) in weights.items():
                for m in (1, 8, 16):

                    def body(row: Row, dtype=dtype, n=n, k=k, m=m, bias=name == "qkv") -> None:
                        x = self.randn(m, k, dtype=dtype)
                        w = self.randn(n, k, dtype=dtype, scale=k**-0.5)
                        b = self.randn(n, dtype=dtype) if bias else None
                        out = lin.linear_triton(x, w, b)
                        ref = lin.linear_ref(x.double(), w.double(), b.double() if bias else None)
                        row.err = rel_err(out, ref)
                        row.ms = bench(lambda: lin.linear_triton(x, w, b))
                        row.throughput = gbps(nbytes(x, w, out), row.ms)

                    self.run("linear(skinny)", dtype, f"{name}: M={m} N={n} K={k}{' +bias' if name == 'qkv' else ''}", body)

    def check_token_bitmask(self) -> None:
        bm = self.k["token_bitmask"]
        words = (VOCAB + 31) // 32
        for dtype in DTYPES:
            for bs in (1, 64):

                def body(row: Row, dtype=dtype, bs=bs) -> None:
                    logits = self.randn(bs, VOCAB, dtype=dtype)
                    mask = torch.randint(-(2**31), 2**31, (bs, words), device=self.dev, dtype=torch.int64)
                    mask = mask.to(torch.int32)
                    mask[0] = -1  # an unconstrained row
                    got = bm.apply_token_bitmask_triton(logits.clone(), mask)
                    ref = bm.apply_token_bitmask_ref(logits.clone(), mask)
                    row.ok = torch.equal(got, ref)
                    row.err = 0.0 if row.ok else 1.0
                    work = logits.clone()
                    row.ms = bench(lambda: bm.apply_token_bitmask_triton(work, mask))
                    banned = int((ref == float("-inf")).sum())
                    row.throughput = gbps(nbytes(mask) + banned * logits.element_size(), row.ms)

                self.run("token_bitmask", dtype, f"B={bs} V={VOCAB}", body)

    def check_argmax(self) -> None:
        am = self.k["argmax"]
        for dtype in DTYPES:
            for bs in (1, 8, 64):

                def body(row: Row, dtype=dtype, bs=bs) -> None:
                    logits = self.randn(bs, VOCAB, dtype=dtype).round(decimals=1)  # many exact ties
                    logits[0, [5, 70000, VOCAB - 1]] = 50.0  # a tie for the max across chunks
                    got = am.argmax_triton(logits)
                    row.ok = torch.equal(got, am.argmax_ref(logits))
                    row.err = 0.0 if row.ok else 1.0
                    row.ms = bench(lambda: am.argmax_triton(logits))
                    row.throughput = gbps(nbytes(logits), row.ms)

                self.run("argmax", dtype, f"B={bs} V={VOCAB}", body)

    def check_step_inputs(self) -> None:
        si = self.k["step_inputs"]
        for b, p in ((1, 1), (5, 8), (130, 136)):

            def body(row: Row, b=b, p=p) -> None:
                rows, ctx = 512, 4096
                req_rows = torch.randperm(rows, device=self.dev)[:b]
                positions = torch.randint(0, ctx, (b,), device=self.dev)
                host = torch.stack([positions, req_rows, positions + 1]).contiguous()
                ids = torch.randint(0, VOCAB, (b,), device=self.dev)
                slots = torch.randint(1, 10**6, (b,), device=self.dev)
                table = torch.randint(0, 10**6, (rows, ctx), device=self.dev, dtype=torch.int32)
                outs = []
                for fill in (si.fill_decode_inputs_triton, si.fill_decode_inputs_ref):
                    static, t = torch.full((5, 256), -7, dtype=torch.int64, device=self.dev), table.clone()
                    fill(static[:, :p], host, ids, slots, t)
                    outs.append((static, t))
                row.ok = all(torch.equal(x, y) for x, y in zip(*outs))
                row.err = 0.0 if row.ok else 1.0
                static = outs[0][0]
                row.ms = bench(lambda: si.fill_decode_inputs_triton(static[:, :p], host, ids, slots, table))
                row.throughput = "-"

            self.run("fill_decode_inputs", torch.int64, f"B={b} P={p}", body)

    # ------------------------------------------------------------------ attention

    def _pool(self, seq: list[int], dtype: torch.dtype, width: int):
        """K/V pool holding exactly these histories at scattered slots, the request table and its rows."""
        total = sum(seq)
        kb = self.randn(total + 1, HKV, HEAD_DIM, dtype=dtype)
        vb = self.randn(total + 1, HKV, HEAD_DIM, dtype=dtype)
        rows = len(seq) + 3
        table = torch.zeros(rows, width, dtype=torch.int32, device=self.dev)
        req_pool_indices = torch.randperm(rows, device=self.dev)[: len(seq)]
        slots = (torch.randperm(total, device=self.dev) + 1).to(torch.int32)
        used = 0
        for r, n in zip(req_pool_indices.tolist(), seq):
            table[r, :n] = slots[used : used + n]
            used += n
        return kb, vb, table, req_pool_indices

    def check_decode(self) -> None:
        """Decode attention over a pool that holds the new token, and with the new token handed over before rotary
        (``NewToken``: rotary + store-KV + attention in one launch; the pool it leaves is compared too)."""
        dec = self.k["decode_attention"]
        rot = self.k["rotary"]
        num_sms = torch.cuda.get_device_properties(self.dev).multi_processor_count
        gen = torch.Generator().manual_seed(0)
        for fused in (False, True):
            for dtype in DTYPES:
                for bs in DECODE_BATCHES:
                    for max_len in DECODE_MAX_LENS:

                        def body(row: Row, dtype=dtype, bs=bs, max_len=max_len, fused=fused) -> None:
                            seq = [max_len] + torch.randint(max_len // 2, max_len + 1, (bs - 1,), generator=gen).tolist()
                            kb, vb, table, rows = self._pool(seq, dtype, width=max_len)
                            seq_lens = torch.tensor(seq, device=self.dev)
                            q = self.randn(bs, HQ, HEAD_DIM, dtype=dtype)
                            scale = HEAD_DIM**-0.5
                            splits = dec.decode_num_splits(bs, HKV, num_sms)
                            mid_o, mid_lse = dec.decode_intermediate_buffers(bs, HQ, splits, HEAD_DIM, self.dev)
                            counters = dec.decode_split_counters(bs, HKV, self.dev)
                            new = None
                            if fused:
                                cos, sin = rot.rotary_cos_sin(llama3_inv_freq(HEAD_DIM).to(self.dev), seq_lens - 1, dtype)
                                k, v = (self.randn(bs, HKV, HEAD_DIM, dtype=dtype) for _ in range(2))
                                new = dec.NewToken(k, v, cos, sin, table[rows, seq_lens - 1].long())
                            kr, vr = kb.clone(), vb.clone()

                            def fn() -> torch.Tensor:
                                return dec.decode_attention_triton(
                                    q, kb, vb, table, rows, seq_lens, scale, new_token=new,
                                    num_splits=splits, mid_o=mid_o, mid_lse=mid_lse, split_counters=counters,
                                )

                            want = dec.decode_attention_ref(q, kr, vr, table, rows, seq_lens, scale, new)
                            row.err = max(rel_err(fn(), want), rel_err(kb, kr), rel_err(vb, vr))
                            row.ms = bench(fn)
                            moved = sum(seq) * (2 * HKV * HEAD_DIM * kb.element_size() + 4) + 2 * nbytes(q)
                            row.throughput = gbps(moved, row.ms)
                            row.note = f"splits={splits}"

                        name = "decode_attention[new token]" if fused else "decode_attention"
                        self.run(name, dtype, f"B={bs} L<={max_len} Hq={HQ} Hkv={HKV} D={HEAD_DIM}", body)

    def check_decode_cuda_graph(self) -> None:
        """Capture with fixed buffers and split count, then replay with other lengths (longer and shorter)."""
        dec = self.k["decode_attention"]
        num_sms = torch.cuda.get_device_properties(self.dev).multi_processor_count
        bs, width = GRAPH_BATCH, GRAPH_WIDTH
        for dtype in DTYPES:

            def body(row: Row, dtype=dtype) -> None:
                kb, vb, table, rows = self._pool([width] * bs, dtype, width=width)
                seq_lens = torch.full((bs,), 300, device=self.dev)
                q = self.randn(bs, HQ, HEAD_DIM, dtype=dtype)
                scale = HEAD_DIM**-0.5
                splits = dec.decode_num_splits(bs, HKV, num_sms)
                mid_o, mid_lse = dec.decode_intermediate_buffers(bs, HQ, splits, HEAD_DIM, self.dev)
                counters = dec.decode_split_counters(bs, HKV, self.dev)
                out = torch.empty_like(q)

                def fn() -> None:
                    dec.decode_attention_triton(
                        q, kb, vb, table, rows, seq_lens, scale,
                        num_splits=splits, mid_o=mid_o, mid_lse=mid_lse, split_counters=counters, out=out,
                    )

                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    fn()  # compile and warm up outside the capture
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                errs = []
                mixed = torch.randint(1, width + 1, (bs,), generator=torch.Generator().manual_seed(1))
                mixed[0], mixed[-1] = width, 1
                for lens in (mixed, torch.ones(bs, dtype=torch.int64), torch.full((bs,), width)):
                    seq_lens.copy_(lens)
                    q.copy_(self.randn(bs, HQ, HEAD_DIM, dtype=dtype))
                    graph.replay()
                    errs.append(rel_err(out, dec.decode_attention_ref(q, kb, vb, table, rows, seq_lens, scale)))
                    if counters.any():  # every replay must leave the merge tickets at zero
                        errs.append(float("inf"))
                row.err = max(errs)
                row.ms = bench(graph.replay)
                moved = bs * width * (2 * HKV * HEAD_DIM * kb.element_size() + 4) + 2 * nbytes(q)
                row.throughput = gbps(moved, row.ms)
                row.note = f"splits={splits}, 3 replays"

            self.run("decode_attention[graph]", dtype, f"B={bs} L<={width} Hq={HQ} Hkv={HKV} D={HEAD_DIM}", body)

    def check_layer_chain_graph(self) -> None:
        """Decode layers as the model runs them (scripts/layer_chain.py: every kernel reads what the one before it
        wrote, the skinny linear for these <= 8 rows), captured in a CUDA graph and replayed with fresh inputs.
        With programmatic dependent launch on, a kernel that read its input before the previous kernel had written
        it would give an O(1) error here. Compared with the float32 references, and with the same kernels run
        eagerly (must match bit for bit: the kernels are deterministic)."""
        from layer_chain import LayerChain

        pkg = _kernels_package()
        pdl = importlib.import_module(f"{pkg.__name__}.pdl")
        layers, ctx, dtype = 4, 384, torch.float16
        for bs in (1, 8):

            def body(row: Row, bs=bs) -> None:
                chain = LayerChain.build(pkg, bs, ctx, layers, dtype, self.dev)
                h_in = self.randn(bs, HIDDEN, dtype=dtype)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    chain.run(h_in)  # compile and warm up outside the capture
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = chain.run(h_in)
                errs, exact = [], True
                for _ in range(3):
                    h_in.copy_(self.randn(bs, HIDDEN, dtype=dtype))
                    graph.replay()
                    fp32_pools = [(kb.float(), vb.float()) for kb, vb in chain.pools]
                    errs.append(rel_err(out, chain.run(h_in.float(), ref=True, pools=fp32_pools)))
                    exact &= torch.equal(out, chain.run(h_in))
                    exact &= not chain.decode_buffers["split_counters"].any()
                row.err = max(errs) if exact else float("inf")
                row.ms = bench(graph.replay)
                row.throughput = gbps(chain.weight_bytes(), row.ms)
                row.note = (f"{layers} layers, 3 replays, graph == eager: {exact}, "
                            f"PDL {'on' if pdl.pdl_supported(self.dev) else 'off'}")

            self.run("decode_layers[graph]", dtype, f"B={bs} ctx={ctx} Llama-3.1-8B layer x{layers}", body)

    def check_extend(self) -> None:
        ext = self.k["extend_attention"]
        for dtype in DTYPES:
            for label, reqs in EXTEND_CASES.items():

                def body(row: Row, dtype=dtype, reqs=reqs) -> None:
                    seq = [p + n for p, n in reqs]
                    kb, vb, table, rows = self._pool(seq, dtype, width=max(seq))
                    ext_lens = torch.tensor([n for _, n in reqs], device=self.dev)
                    seq_lens = torch.tensor(seq, device=self.dev)
                    start = torch.cumsum(ext_lens, 0) - ext_lens
                    q = self.randn(int(ext_lens.sum()), HQ, HEAD_DIM, dtype=dtype)
                    args = (q, kb, vb, table, rows, seq_lens, ext_lens, start, HEAD_DIM**-0.5)
                    max_ext = max(n for _, n in reqs)
                    out = ext.extend_attention_triton(*args, max_extend_len=max_ext)
                    row.err = rel_err(out, ext.extend_attention_ref(*args))
                    row.ms = bench(lambda: ext.extend_attention_triton(*args, max_extend_len=max_ext))
                    # QK^T and PV over each new token's visible keys: 2 matmuls x 2 flops per multiply-add.
                    visible = sum(n * p + n * (n + 1) // 2 for p, n in reqs)
                    row.throughput = f"{4 * HQ * HEAD_DIM * visible / row.ms / 1e9:8.1f} TFLOP/s"

                self.run("extend_attention", dtype, label, body)


HEADER = f"{'kernel':<24} {'dtype':<5} {'shape':<40} {'rel_err':>9} {'ok':<4} {'time':>10} {'throughput':>16}  note"


def print_row(row: Row) -> None:
    err = f"{row.err:9.2e}" if row.err is not None else f"{'-':>9}"
    ms = f"{row.ms * 1000:8.1f}us" if row.ms is not None else f"{'-':>10}"
    status = "PASS" if row.ok else "FAIL"
    print(
        f"{row.kernel:<24} {DTYPE_NAME[row.dtype]:<5} {row.shape:<40} {err} {status:<4} {ms} {row.throughput:>16}  "
        f"{row.note}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only the rows whose kernel name contains this text")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernel_check: no CUDA device; this script checks the Triton kernels on a GPU", file=sys.stderr)
        return 2
    import triton

    torch.manual_seed(0)
    # The references must be exact float32: no TF32 in their matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    checker = Checker(_kernels_package(), args.only)
    props = torch.cuda.get_device_properties(0)
    pdl = importlib.import_module("xinf_sglang.kernels.pdl")
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}"
        f"; programmatic dependent launch: {'on' if pdl.pdl_supported(torch.device('cuda')) else 'off'}"
    )
    print(HEADER)
    print("-" * len(HEADER))
    for check in (
        checker.check_rms_norm,
        checker.check_silu_and_mul,
        checker.check_rotary,
        checker.check_store_kv,
        checker.check_token_bitmask,
        checker.check_argmax,
        checker.check_step_inputs,
        checker.check_linear,
        checker.check_decode,
        checker.check_decode_cuda_graph,
        checker.check_layer_chain_graph,
        checker.check_extend,
    ):
        check()
        torch.cuda.empty_cache()
    failed = [r for r in checker.rows if not r.ok]
    print("-" * len(HEADER))
    print(f"{len(checker.rows) - len(failed)}/{len(checker.rows)} passed")
    for r in failed:
        print(f"FAILED: {r.kernel} {DTYPE_NAME[r.dtype]} {r.shape} err={r.err} {r.note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
