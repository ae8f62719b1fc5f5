"""``fused_topk`` (kernels/moe/topk.py), the one-launch greedy routing, under Triton's interpreter against
``fused_topk_ref`` on fresh random logits: every scoring, with and without the correction bias, renormalised or not,
scaled, at the expert counts of Mixtral (8), Qwen2-MoE (60), Qwen3-MoE (128) and DeepSeek-V3 (256); ids equal,
weights to float32 rounding. Also the router's use of it and its refusals. TRITON_INTERPRET=1 comes from
tests/conftest.py; tests/cuda/test_cuda_moe.py runs the same comparison on a GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from xinf_sglang.kernels.moe import fused_topk_ref, fused_topk_triton  # noqa: E402


@pytest.mark.parametrize("experts,top_k", [(8, 2), (60, 4), (128, 8), (256, 8), (5, 5)])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias,renormalize,scaling", [(False, False, 1.0), (True, True, 2.5), (False, True, 1.0)])
def test_kernel_matches_reference(experts: int, top_k: int, scoring: str, bias: bool, renormalize: bool,
                                  scaling: float) -> None:
    torch.manual_seed(experts * 31 + top_k)
    logits = torch.randn(5, experts) * 3
    correction = torch.randn(experts) * 0.1 if bias else None
    args = (top_k, scoring, correction, renormalize, scaling)
    got_w, got_i = fused_topk_triton(logits, *args)
    want_w, want_i = fused_topk_ref(logits, *args)
    assert got_i.dtype == want_i.dtype == torch.int32 and got_w.dtype == torch.float32
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_w, want_w, rtol=2e-6, atol=1e-7)


def test_bfloat16_logits_and_strided_rows() -> None:
    """The router's bf16 logits are read as they are (converted in the kernel, as the reference's ``.float()``), and
    a strided view is accepted. bf16 scores can tie, and either order is right: the chosen experts' scores and the
    weights are compared."""
    torch.manual_seed(3)
    logits = (torch.randn(7, 256) * 2)[:, :128].bfloat16()
    got_w, got_i = fused_topk_triton(logits, 8, "softmax", None, True)
    want_w, want_i = fused_topk_ref(logits, 8, "softmax", None, True)
    scores = torch.softmax(logits.float(), -1)
    assert torch.equal(scores.gather(1, got_i.long()), scores.gather(1, want_i.long()))
    torch.testing.assert_close(got_w, want_w, rtol=2e-6, atol=1e-7)


def test_no_tokens_and_bad_arguments() -> None:
    w, i = fused_topk_triton(torch.randn(0, 16), 2)
    assert w.shape == i.shape == (0, 2)
    with pytest.raises(ValueError, match="top_k"):
        fused_topk_triton(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="scoring"):
        fused_topk_triton(torch.randn(3, 4), 2, "relu")
