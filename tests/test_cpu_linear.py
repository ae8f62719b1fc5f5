"""The threaded CPU decode linears against ``F.linear`` on fresh random inputs: the float32 kernel (kernels/cpu/linear.py)
against float64, the bfloat16 / float16 kernel (kernels/cpu/linear16.py) against float32 on the same values."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
from torch.nn import functional as F

from xinf_sglang.kernels import linear

from xinf_sglang.kernels.cpu import linear as cpu_linear
from xinf_sglang.kernels.cpu import linear16 as cpu_linear16

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (577, 576), (3, 13), (1, 8), (4099, 72)]


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("m", [1, 2, 3, 5, cpu_linear.CPU_SKINNY_MAX_M])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_reference(m: int, n: int, k: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 100003 + n * 31 + k + with_bias)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if with_bias else None
    y = cpu_linear.linear_cpu(x, w, b)
    ref = _reference(x, w, b)
    # float32 dot products of length k: error grows like sqrt(k) * eps * |x||w|
    scale = (x.abs().double() @ w.abs().double().t()).max()
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert (y.double() - ref).abs().max() <= 4e-7 * k**0.5 * scale + 1e-6


def test_rows_do_not_depend_on_the_batch_or_thread_count() -> None:
    """Each output is one dot product in a fixed order: a row alone, in a batch, or on one thread is bit-equal."""
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(1030, 576, generator=g), torch.randn(9, 576, generator=g)
    batched = cpu_linear.linear_cpu(x, w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = cpu_linear.linear_cpu(x, w)
    finally:
        torch.set_num_threads(threads)
    for i in range(x.shape[0]):
        assert torch.equal(cpu_linear.linear_cpu(x[i : i + 1], w)[0], batched[i])
    assert torch.equal(single_thread, batched)


def test_dispatch_takes_the_kernel_only_where_it_applies() -> None:
    w = torch.randn(64, 32)
    assert cpu_linear.supports(torch.randn(16, 32), w, None)
    assert not cpu_linear.supports(torch.randn(17, 32), w, None)  # prefill-sized: MKL's sgemm
    assert not cpu_linear.supports(torch.randn(1, 32, dtype=torch.bfloat16), w.bfloat16(), None)
    assert not cpu_linear.supports(torch.randn(1, 32), w.t().contiguous().t(), None)  # column-major weight
    x3 = torch.randn(2, 3, 32)  # leading dims are flattened, as F.linear does
    assert torch.allclose(linear(x3, w), F.linear(x3, w), atol=1e-5)
    assert linear(torch.randn(40, 32), w).shape == (40, 64)
    with pytest.raises(ValueError, match="linear_cpu takes float32 CPU x"):
        cpu_linear.linear_cpu(torch.randn(17, 32), w)


def _child(conn) -> None:
    w, x = torch.ones(300, 64), torch.ones(1, 64)
    conn.send(cpu_linear.linear_cpu(x, w).sum().item())


def test_a_forked_child_gets_working_threads() -> None:
    """The parent's pool threads do not exist after fork(): the child must not wait for them forever."""
    cpu_linear.linear_cpu(torch.randn(1, 64), torch.randn(300, 64))  # the parent's pool is running
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child,))
    proc.start()
    assert parent.poll(60), "the forked child did not finish a linear within 60 s"
    assert parent.recv() == 300 * 64
    proc.join(10)
    assert proc.exitcode == 0


_STRESS = """
import random, sys, time, torch
from xinf_sglang.kernels.cpu import linear as cpu_linear
from xinf_sglang.kernels.cpu import linear16 as cpu_linear16
pool = cpu_linear.load().LinearPool(2, int(sys.argv[1]))
ws = [torch.randn(n, 64) for n in (33, 64, 100, 576, 960, 3000)]
x = torch.randn(1, 64)
refs = [torch.nn.functional.linear(x, w) for w in ws]
end, calls = time.monotonic() + 4, 0
while time.monotonic() < end:
    i = random.randrange(len(ws))
    y = pool.linear(x, ws[i], None)
    calls += 1
    if calls % 997 == 0:
        assert (y - refs[i]).abs().max() < 1e-4
        time.sleep(random.random() * 0.001)  # let the pool thread fall asleep now and then
print(calls)
"""


@pytest.mark.parametrize("spin_us", [0, 200, 10**9])  # always sleeps, the default, never sleeps
def test_two_threads_never_hang_on_back_to_back_calls(spin_us: int) -> None:
    """Millions of calls of changing sizes on a 2-thread pool finish (before the fix of 2026-12-02 a pool thread
    still leaving one call could claim a chunk of the next one's larger count: the caller then waited forever).
    Run in a subprocess so that a hang fails the test instead of stopping the suite."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _STRESS, str(spin_us)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 1000


# The 16-bit kernel (kernels/cpu/linear16.py): every build on this machine. (isa, bf16): None is what torch reports
# (here AVX-512 with BF16: vdpbf16ps for bfloat16), then AVX-512 without BF16, AVX2, scalar.
BUILDS16 = [(None, True), ("AVX512", False), ("AVX2", False), ("DEFAULT", False)]
SHAPES16 = [(960, 576), (3072, 576), (576, 1536), (577, 575), (3, 13), (1, 8), (4099, 72), (64, 33)]


def _skip_unless_cpu_runs(isa: str | None) -> None:
    if isa == "AVX512" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX-512")


def _check16(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """``y`` is ``F.linear`` in float32 on the same 16-bit values, rounded once to the dtype: the float32 dot product's
    accumulation-order error plus half an ulp of the dtype (``finfo.eps / 2`` relative)."""
    ref = F.linear(x.float(), w.float(), None if b is None else b.float()).double()
    k = x.shape[-1]
    acc = 4e-7 * k**0.5 * (x.abs().double() @ w.abs().double().t()) + 1e-6
    half_ulp = torch.finfo(x.dtype).eps / 2 * (ref.abs() + acc)
    assert y.dtype == x.dtype and y.shape == ref.shape
    over = (y.double() - ref).abs() - (acc + half_ulp)
    assert over.max() <= 0, f"off by {over.max():.3g} beyond the bound"


@pytest.mark.parametrize("isa,bf16", BUILDS16)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", SHAPES16)
@pytest.mark.parametrize("with_bias", [False, True])
def test_16bit_kernel_matches_float32_on_the_same_values(isa: str | None, bf16: bool, dtype: torch.dtype, n: int,
                                                         k: int, with_bias: bool) -> None:
    _skip_unless_cpu_runs(isa)
    g = torch.Generator().manual_seed(n * 31 + k + with_bias)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    for m in range(1, cpu_linear16.CPU16_SKINNY_MAX_M + 1):
        x = torch.randn(m, k, generator=g).to(dtype)
        _check16(cpu_linear16.linear16_cpu(x, w, b, isa=isa, bf16=bf16), x, w, b)


def test_16bit_builds_take_the_paths_they_name() -> None:
    assert cpu_linear16.load("DEFAULT", False).isa_bfloat16 == "scalar"
    assert cpu_linear16.load("AVX2", False).isa_float16 == "avx2"
    if torch.cpu._is_avx512_bf16_supported():
        assert cpu_linear16.load().isa_bfloat16 == "avx512bf16"


@pytest.mark.parametrize("isa,bf16", BUILDS16)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_rows_do_not_depend_on_the_batch_or_thread_count(isa: str | None, bf16: bool,
                                                                dtype: torch.dtype) -> None:
    _skip_unless_cpu_runs(isa)
    g = torch.Generator().manual_seed(11)
    w = torch.randn(1030, 577, generator=g).to(dtype)
    b = torch.randn(1030, generator=g).to(dtype)
    x = torch.randn(cpu_linear16.CPU16_SKINNY_MAX_M, 577, generator=g).to(dtype)
    threads = torch.get_num_threads()
    results = {}
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            results[t] = cpu_linear16.linear16_cpu(x, w, b, isa=isa, bf16=bf16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[1], results[2])
    for i in range(x.shape[0]):
        assert torch.equal(cpu_linear16.linear16_cpu(x[i : i + 1], w, b, isa=isa, bf16=bf16)[0], results[2][i])
    assert torch.equal(cpu_linear16.linear16_cpu(x[3:10], w, b, isa=isa, bf16=bf16), results[2][3:10])


def test_16bit_dispatch_takes_the_kernel_only_where_it_applies() -> None:
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    m = cpu_linear16.CPU16_SKINNY_MAX_M
    assert cpu_linear16.supports(torch.randn(m, 32, dtype=torch.bfloat16), w, None)
    assert cpu_linear16.supports(torch.randn(1, 32, dtype=torch.float16), w.half(), w[:, 0].half().contiguous())
    assert not cpu_linear16.supports(torch.randn(m + 1, 32, dtype=torch.bfloat16), w, None)  # prefill: oneDNN
    assert not cpu_linear16.supports(torch.randn(1, 32), w, None)  # mixed dtypes
    assert not cpu_linear16.supports(torch.randn(1, 32, dtype=torch.bfloat16), w, w[:, 0].float())
    assert not cpu_linear16.supports(torch.randn(1, 32, dtype=torch.bfloat16), w.t().contiguous().t(), None)
    x3 = torch.randn(2, 3, 32, dtype=torch.bfloat16)  # leading dims are flattened, as F.linear does
    _check16(linear(x3, w).view(6, 64), x3.view(6, 32), w, None)
    assert linear(torch.randn(40, 32, dtype=torch.bfloat16), w).shape == (40, 64)
    with pytest.raises(ValueError, match="linear16_cpu takes bfloat16 or float16"):
        cpu_linear16.linear16_cpu(torch.randn(1, 32, dtype=torch.bfloat16), w.float())


# The register-blocked kernel on a packed bfloat16 weight (linear16.pack / linear_packed): AVX-512 BF16 CPUs only.
needs_pack = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="this CPU has no AVX-512 BF16")
PACKED_ROWS = [1, 2, 11, 12, 13, 16, 17, 24, 33, 41, 64, 65, 200, 385]  # tiles of 12 rows, row chunks of 192


@needs_pack
@pytest.mark.parametrize("n,k", SHAPES16 + [(49, 1), (100, 31)])  # N % 16 != 0, K odd or not a multiple of 32
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_kernel_matches_float32_on_the_same_values(n: int, k: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(n * 31 + k + with_bias)
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if with_bias else None
    packed = cpu_linear16.pack(w)
    assert packed.shape == ((n + 15) // 16, (k + 1) // 2, 16, 2)
    assert torch.equal(cpu_linear16.unpack(packed, n, k), w)
    for m in PACKED_ROWS:
        x = torch.randn(m, k, generator=g).bfloat16()
        _check16(cpu_linear16.linear_packed(x, packed, n, b), x, w, b)
    wide = torch.randn(41, 2 * k + 3, generator=g).bfloat16()  # strided rows (a slice of a wider tensor)
    _check16(cpu_linear16.linear_packed(wide[:, 3 : 3 + k], packed, n, b), wide[:, 3 : 3 + k], w, b)


@needs_pack
def test_packed_rows_do_not_depend_on_the_batch_or_thread_count() -> None:
    g = torch.Generator().manual_seed(12)
    w = torch.randn(1030, 577, generator=g).bfloat16()
    b = torch.randn(1030, generator=g).bfloat16()
    x = torch.randn(200, 577, generator=g).bfloat16()
    packed = cpu_linear16.pack(w)
    threads = torch.get_num_threads()
    try:
        results = {}
        for t in (1, 2):
            torch.set_num_threads(t)
            results[t] = cpu_linear16.linear_packed(x, packed, 1030, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[1], results[2])
    for lo, hi in ((0, 1), (7, 8), (3, 20), (5, 46), (100, 200)):
        assert torch.equal(cpu_linear16.linear_packed(x[lo:hi], packed, 1030, b), results[2][lo:hi])
    x3 = x[:12].view(3, 4, 577)  # leading dims are flattened
    assert torch.equal(cpu_linear16.linear_packed(x3, packed, 1030, b).view(12, 1030), results[2][:12])
    with pytest.raises(ValueError, match="linear_packed takes bfloat16"):
        cpu_linear16.linear_packed(x.float(), packed, 1030, b)


@needs_pack
def test_dense_bfloat16_layer_is_packed_once_at_load() -> None:
    from xinf_sglang.runtime.layers.linear import RowParallelLinear
    from xinf_sglang.runtime.layers.quantization.base import AS_STORED, PACKED_BF16
    from xinf_sglang.runtime.tp.distributed import TPInfo

    layer = RowParallelLinear(577, 100, True, TPInfo())
    g = torch.Generator().manual_seed(3)
    w = torch.randn(100, 577, generator=g).bfloat16()
    layer.weight.data = w.clone()
    layer.bias.data = torch.randn(100, generator=g).bfloat16()
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.quant_method is PACKED_BF16 and layer.weight.shape == (7, 289, 16, 2)
    assert torch.equal(layer.quant_method.dequantize(layer), w.float())
    x = torch.randn(41, 577, generator=g).bfloat16()
    _check16(layer(x), x, w, layer.bias)
    kept = RowParallelLinear(577, 100, False, TPInfo(), AS_STORED)  # a weight the model reads itself (DeepSeek)
    kept.weight.data = w.clone()
    kept.quant_method.process_weights_after_loading(kept)
    assert kept.quant_method is AS_STORED and torch.equal(kept.weight, w)
