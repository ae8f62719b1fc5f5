"""The GGUF Triton kernels (kernels/quant/gguf_triton.py) on the GPU at Llama-3.1-8B's shapes, and GGUF models kept
in their blocks on CUDA against the dequantize-at-load path.

Kernels: random blocks (``random_gguf_blocks``) of Q8_0 / Q4_K / Q6_K at K = 4096 for N = 4096 (o_proj), 6144
(qkv), 14336 (half of gate_up) and M = 1, 3 (the GEMV), 8 (the 16-row tl.dot tile, split K), 64 and 512 (the GEMM),
in bf16 with the launch configs ``get_quant_config`` picks; every kept type at one shape in bf16 and fp16;
down_proj's K = 14336; CUDA-graph replay of the decode calls; the embedding's row decoder on a 128256-row table.
The ground truth is float32 (the weights dequantized by ``dequantize_gguf``, times x in float32, TF32 off): the
kernel multiplies exactly those weights (rounded to x's dtype for ``tl.dot``, kept in float32 by the GEMV), so only
that rounding, the summation order and the output rounding differ: ``TOL`` (1e-2).

Engine: tiny Llama GGUFs (Q8_0, Q4_K, Q6_K and Q4_K_M's mix of both K types in one layer) on cuda: in float32 the
greedy tokens of the kept blocks equal those of ``gguf_dequantize=True``, and the memory plan counts the blocks'
bytes; in bfloat16 the kept run decodes through CUDA graphs (no identity is expected there: the two paths round
differently)."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from ..pool_helpers import TOL, rel_err
from . import randn, require_gpus

require_gpus()
pytestmark = pytest.mark.cuda

from xinf_sglang.runtime import SamplingParams
from xinf_sglang.runtime.testing import gguf_writer

from ..engine_helpers import make_engine, varied_prompts
from ..gguf_writer import write_gguf as write_test_gguf
from ..test_gguf_quantized import WIDE, _generate, _mixed_encoder

Q = importlib.import_module("xinf_sglang.kernels.quant")
CUDA = torch.device("cuda")
K = 4096


def blocks(n: int, k: int, qtype: str, seed: int) -> torch.Tensor:
    """Random blocks on the GPU, scale fields ~1/sqrt(K) of the codes' range (outputs of order one)."""
    return Q.random_gguf_blocks(n, k, qtype, torch.Generator(device=CUDA).manual_seed(seed), scale=0.02 * k**-0.5)


def float32_truth(x: torch.Tensor, w: torch.Tensor, qtype: str, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.float() @ Q.dequantize_gguf(w, qtype).t()
    return y if bias is None else y + bias.float()


@pytest.mark.parametrize("m", [1, 3, 8, 64, 512])
@pytest.mark.parametrize("n", [4096, 6144, 14336])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_gguf_matches_float32_in_bf16(qtype: str, n: int, m: int) -> None:
    w = blocks(n, K, qtype, n + m)
    x, bias = randn(m, K, dtype=torch.bfloat16), randn(n, dtype=torch.bfloat16)
    out = Q.gguf_linear(x, w, qtype, bias)  # dispatches to Triton for CUDA tensors
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert rel_err(out, float32_truth(x, w, qtype, bias)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("m", [1, 8, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", list(Q.GGUF_BLOCKS))
def test_every_kept_type(qtype: str, dtype: torch.dtype, m: int) -> None:
    w = blocks(4096, K, qtype, m)
    x = randn(m, K, dtype=dtype)
    out = Q.gguf_linear(x, w, qtype)
    assert out.dtype == dtype and rel_err(out, float32_truth(x, w, qtype, None)) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 512])
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_down_proj_k_14336(qtype: str, m: int) -> None:
    w = blocks(4096, 14336, qtype, m)
    x = randn(m, 14336, dtype=torch.bfloat16)
    assert rel_err(Q.gguf_linear(x, w, qtype), float32_truth(x, w, qtype, None)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("m", [1, 3, 8])
def test_gguf_cuda_graph_replay_matches_eager(m: int) -> None:
    """The split-K GEMV / tile and its reduce (workspace allocated in the capture) replay on new inputs."""
    w = blocks(6144, K, "Q4_K", m)
    x = randn(m, K, dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        Q.gguf_linear(x, w, "Q4_K")  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = Q.gguf_linear(x, w, "Q4_K")
    x.copy_(randn(m, K, dtype=torch.bfloat16))
    graph.replay()
    assert torch.equal(out, Q.gguf_linear(x, w, "Q4_K"))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0"])
def test_embedding_rows_on_the_gpu(qtype: str) -> None:
    """Llama-3.1-8B's 128256 x 4096 table: looked-up rows decoded to bf16 as the reference does."""
    w = blocks(128256, K, qtype, 3)
    ids = torch.randint(0, 128256, (4, 33), device=CUDA)
    out = Q.gguf_rows(w, ids, qtype, torch.bfloat16)
    assert out.shape == (4, 33, K) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, Q.gguf_rows_ref(w, ids, qtype, torch.bfloat16))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K", "Q4_K_M"])
def test_tiny_gguf_kept_on_cuda_equals_dequantized(qtype: str, tmp_path_factory, tiny_model, caplog) -> None:
    hf_dir = tiny_model("llama", **WIDE)
    gguf = _tiny_gguf(hf_dir, qtype, tmp_path_factory)
    prompts = varied_prompts(hf_dir, 4, min_len=3, max_len=40)
    with caplog.at_level(logging.INFO, logger="xinf_sglang.runtime"):
        kept, kept_bytes = _generate(gguf, prompts, False, device="cuda", dtype="float32")
    assert "linears kept in their GGUF blocks" in caplog.text  # runtime/engine/startup.py keeps them on CUDA
    dequantized, dense_bytes = _generate(gguf, prompts, True, device="cuda", dtype="float32")
    assert kept == dequantized
    assert kept_bytes < dense_bytes / 2


def test_tiny_q4_k_m_kept_in_bf16_decodes_through_graphs(tmp_path_factory, tiny_model) -> None:
    from . import uses_graphs

    hf_dir = tiny_model("llama", **WIDE)
    gguf = _tiny_gguf(hf_dir, "Q4_K_M", tmp_path_factory)
    prompts = varied_prompts(hf_dir, 4, min_len=3, max_len=40)
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    with make_engine(gguf, device="cuda", dtype="bfloat16", max_total_tokens=2048) as engine:
        assert uses_graphs(engine)
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        assert all(len(o.token_ids) == 8 for o in outs) and engine.check_invariants() == []
        kept_bytes = engine.memory_plan.weights_bytes
    _, dense_bytes = _generate(gguf, prompts, True, device="cuda", dtype="bfloat16")
    assert kept_bytes < dense_bytes / 2


def _tiny_gguf(hf_dir, qtype: str, tmp_path_factory):
    """The tiny model as a GGUF of ``qtype`` (Q8_0 quantized from its weights, K types random blocks), or
    ``Q4_K_M``: q/k/o/gate/up Q4_K with v and down Q6_K."""
    out = tmp_path_factory.mktemp(f"cuda-{qtype}") / f"tiny-{qtype}.gguf"
    if qtype == "Q4_K_M":
        return gguf_writer.write_gguf(hf_dir, out, "Q4_K", encode=_mixed_encoder())
    return write_test_gguf(hf_dir, out, qtype)
