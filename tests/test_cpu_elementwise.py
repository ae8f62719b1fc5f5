"""The fused CPU RMSNorm and SiLU-and-mul (kernels/cpu/elementwise.py) against their torch references on fresh
random inputs: decode rows (one thread), prefill-sized calls (rows split over torch's threads), strided views."""

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
    assert not cpu_elementwise.supports_silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="float32 CPU x"):
        cpu_elementwise.rms_norm_cpu(torch.randn(2, 8).bfloat16(), torch.randn(8), 1e-6)
    with pytest.raises(ValueError, match="gate_up"):
        cpu_elementwise.silu_and_mul_cpu(torch.randn(2, 7))
