"""The fused CPU RMSNorm and SiLU-and-mul (kernels/cpu/elementwise.py) against their torch references on fresh
random inputs: decode rows (one thread), prefill-sized calls (rows split over torch's threads), strided views;
float32 rows, and bfloat16 / float16 rows at the references' rounding points."""

from __future__ import annotations

import pytest
import torch
from xinf_sglang.kernels import rms_norm_ref, silu_and_mul_ref
from xinf_sglang.kernels.cpu import elementwise as cpu_elementwise


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # float32 results; only the order of the sum of squares / exp's last bit differ from the reference
    torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("rows", [1, 3, 16, 700])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(rows: int, with_residual: bool) -> None:
    g = torch.Generator().manual_seed(rows * 2 + with_residual)
    n = 576
    x = torch.randn(rows, n, generator=g) * 3
    w = torch.randn(n, generator=g)
    res = torch.randn(rows, n, generator=g) if with_residual else None
    x_before = x.clone()
    out, new_res = cpu_elementwise.rms_norm_cpu(x, w, 1e-5, res)
    ref, ref_res = rms_norm_ref(x, w, 1e-5, res)
    _close(out, ref)
    assert torch.equal(x, x_before)  # inputs untouched
    if with_residual:
        assert torch.equal(new_res, ref_res)  # one float32 add: exact
    else:
        assert new_res is None


def test_rms_norm_3d_and_strided_rows() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 5, 2 * 96, generator=g)[..., :96]  # row stride 192, unit last stride
    w = torch.randn(96, generator=g)
    res = torch.randn(4, 5, 96, generator=g)
    out, new_res = cpu_elementwise.rms_norm_cpu(x, w, 1e-6, res)
    ref, ref_res = rms_norm_ref(x, w, 1e-6, res)
    assert out.shape == new_res.shape == (4, 5, 96)
    _close(out, ref)
    assert torch.equal(new_res, ref_res)


def test_rms_norm_rows_equals_the_checked_path_and_refuses_in_cpp() -> None:
    """The unchecked 2-D entry (RMSNorm's decode path) computes what rms_norm_cpu does, strided rows included, and
    the C++ refuses what it cannot read instead of reading out of bounds."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 2 * 64, generator=g)[:, :64]  # row stride 128
    w, res = torch.randn(64, generator=g), torch.randn(3, 64, generator=g)
    for r in (None, res):
        out, new_r = cpu_elementwise.rms_norm_rows(x, w, 1e-6, r)
        ref, ref_r = cpu_elementwise.rms_norm_cpu(x, w, 1e-6, r)
        assert torch.equal(out, ref) and (new_r is None if r is None else torch.equal(new_r, ref_r))
    bad = [(x, torch.randn(65), None), (x, w.double(), None), (x, w, torch.randn(2, 64)),
           (x, w, res.half()), (torch.randn(64, 3).t(), w[:3], None), (torch.randn(2, 3, 64), w, None)]
    for args in bad:
        with pytest.raises(RuntimeError, match="rms_norm"):
            cpu_elementwise.rms_norm_rows(args[0], args[1], 1e-6, args[2])


@pytest.mark.parametrize("rows,h", [(1, 1536), (2, 1000), (300, 1536)])
def test_silu_and_mul_matches_reference(rows: int, h: int) -> None:
    g = torch.Generator().manual_seed(rows + h)
    gate_up = torch.randn(rows, 2 * h, generator=g) * 8  # wide range: exp of large |x| is clamped, never NaN
    gate_up[0, :4] = torch.tensor([100.0, -100.0, 0.0, -1e-30])
    out = cpu_elementwise.silu_and_mul_cpu(gate_up)
    _close(out, silu_and_mul_ref(gate_up))
    assert out.shape == (rows, h)


def test_unsupported_inputs_are_refused_with_what_is_taken() -> None:
    assert not cpu_elementwise.supports_rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.randn(8), None)
    assert not cpu_elementwise.supports_rms_norm(torch.randn(2, 8), torch.randn(9), None)
    assert not cpu_elementwise.supports_rms_norm(torch.randn(8, 2).t(), torch.randn(8), None)  # last stride 2
    bf = torch.randn(2, 8).bfloat16()
    assert not cpu_elementwise.supports_rms_norm(bf, torch.randn(8), None)  # float32 weight: the ref promotes
    assert not cpu_elementwise.supports_rms_norm(bf, torch.randn(8).bfloat16(), bf.half())  # mixed residual
    assert cpu_elementwise.supports_rms_norm(bf, torch.randn(8).bfloat16(), bf)
    assert not cpu_elementwise.supports_silu_and_mul(torch.randn(2, 7))
    assert cpu_elementwise.supports_silu_and_mul(torch.randn(2, 8).half())
    with pytest.raises(ValueError, match="float32/bfloat16/float16 CPU x"):
        cpu_elementwise.rms_norm_cpu(bf, torch.randn(8), 1e-6)
    with pytest.raises(ValueError, match="gate_up"):
        cpu_elementwise.silu_and_mul_cpu(torch.randn(2, 7))


# bfloat16 / float16 rows. The kernels round where the references do (HF's order): the residual sum, the normalised
# value before the weight multiply, that product; SiLU before the multiply by up, that product. Sums, products and
# casts are then bit-exact (one float32 op on exact inputs, one round-to-nearest-even); what may differ is a value
# computed in float32 from a reduction or exp: the float32 sum of squares (another order than torch's) and exp (a
# polynomial, not Sleef) move the float32 value by a few float32 ulps, so its rounding to the dtype can land on the
# neighbour when it sits next to a rounding boundary: at most 1 ulp of the dtype at that point, rare (bfloat16
# ~2^-14, float16 ~2^-11 per element), and everything after it exact. The checks below allow exactly that and
# count how often it happens.
HALF = [torch.bfloat16, torch.float16]


def _neighbours(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` and its two neighbours in its (16-bit) dtype: +-1 in the sign-magnitude bit pattern."""
    bits = t.view(torch.int16).to(torch.int32)
    return [t] + [(bits + d).clamp(-32768, 32767).to(torch.int16).view(t.dtype) for d in (-1, 1)]


def _within_one_rounding(out: torch.Tensor, first: torch.Tensor, then) -> float:
    """Assert that every element of ``out`` is ``then(v)`` for ``v`` = ``first`` or a dtype neighbour of it
    (elementwise) and return the fraction of elements where it is not ``then(first)``."""
    cands = [then(v) for v in _neighbours(first)]
    exact = out.view(torch.int16) == cands[0].view(torch.int16)
    ok = exact.clone()
    for c in cands[1:]:
        ok |= out.view(torch.int16) == c.view(torch.int16)
    assert bool(ok.all()), f"{int((~ok).sum())} elements beyond one rounding of the {out.dtype} value"
    return 1.0 - exact.float().mean().item()


def _normalised_ref(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm_ref``'s value before the weight: ``x * rsqrt(mean(x^2) + eps)`` in float32, cast to x's dtype."""
    h = x.to(torch.float32)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    "rows,n,strided,with_residual",
    [
        (1, 576, False, True),
        (3, 96, True, False),
        (40, 576, True, True),
        (700, 576, False, True),  # 403k elements: rows split over torch's threads
        (700, 960, True, False),
    ],
)
def test_rms_norm_half_rows_round_like_the_reference(
    dtype: torch.dtype, rows: int, n: int, strided: bool, with_residual: bool
) -> None:
    g = torch.Generator().manual_seed(rows * 31 + n + strided * 7 + with_residual)
    x = (torch.randn(rows, 2 * n if strided else n, generator=g) * 3).to(dtype)
    x = x[:, :n] if strided else x  # row stride 2n, unit last stride
    w = (torch.randn(n, generator=g) * 2).to(dtype)
    res = torch.randn(rows, n, generator=g).to(dtype) if with_residual else None
    x_before = x.clone()
    out, new_res = cpu_elementwise.rms_norm_cpu(x, w, 1e-5, res)
    ref, ref_res = rms_norm_ref(x, w, 1e-5, res)
    assert out.dtype == dtype
    assert torch.equal(x, x_before)
    if with_residual:
        assert torch.equal(new_res, ref_res)  # one float32 add of two exact values, one rounding: bit-exact
    else:
        assert new_res is None
    summed = ref_res if with_residual else x
    flipped = _within_one_rounding(out, _normalised_ref(summed, 1e-5), lambda h: w * h)
    assert flipped < 0.01  # rounding-boundary cases only
    assert torch.equal(w * _normalised_ref(summed, 1e-5), ref)  # the decomposition is the reference itself


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rows,h,strided", [(1, 1536, False), (2, 1000, True), (40, 1536, False), (300, 1536, True)])
def test_silu_and_mul_half_rows_round_like_the_reference(dtype: torch.dtype, rows: int, h: int, strided: bool) -> None:
    g = torch.Generator().manual_seed(rows + h + strided)
    gate_up = (torch.randn(rows, 4 * h if strided else 2 * h, generator=g) * 4).to(dtype)
    gate_up = gate_up[:, : 2 * h] if strided else gate_up
    gate_up[0, :4] = torch.tensor([60.0, -60.0, 0.0, -1e-3]).to(dtype)
    out = cpu_elementwise.silu_and_mul_cpu(gate_up)
    assert out.shape == (rows, h) and out.dtype == dtype
    gate, up = gate_up.chunk(2, dim=-1)
    silu = torch.nn.functional.silu(gate)  # silu_and_mul_ref's rounding point
    flipped = _within_one_rounding(out, silu, lambda s: s * up)
    assert flipped < 0.01
    assert torch.equal(silu * up, silu_and_mul_ref(gate_up))  # the decomposition is the reference itself


def test_half_rows_through_the_dispatchers() -> None:
    """``rms_norm`` / ``silu_and_mul`` (kernels/) send bfloat16 CPU rows to the C++ kernels."""
    from xinf_sglang.kernels import rms_norm, silu_and_mul

    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 64, generator=g).bfloat16()
    w = torch.randn(64, generator=g).bfloat16()
    out, res = rms_norm(x, w, 1e-6, x)
    assert torch.equal(res, x + x)
    _within_one_rounding(out, _normalised_ref(x + x, 1e-6), lambda h: w * h)
    gu = torch.randn(4, 128, generator=g).bfloat16()
    _within_one_rounding(silu_and_mul(gu), torch.nn.functional.silu(gu[:, :64]), lambda s: s * gu[:, 64:])
