"""GGUF linears kept in their blocks on the CPU (layers/quantization/gguf.py, model_loader/gguf_quant.py): what
is kept, stacked layers of mixed types, real bytes in the memory plan, and greedy tokens equal to the
dequantize-at-load path (``gguf_dequantize=True``) on tiny models of every tested type and on SmolLM2's Q4_1 file."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from xinf_sglang.kernels.quant import (
    GGUF_BLOCKS,
    dequantize_gguf,
    gguf_linear_ref,
    random_gguf_blocks,
)
from xinf_sglang.runtime import SamplingParams
from xinf_sglang.runtime.errors import ConfigError
from xinf_sglang.runtime.layers import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from xinf_sglang.runtime.layers.quantization.gguf import GGUFLinearMethod
from xinf_sglang.runtime.model_loader.checkpoint import open_checkpoint
from xinf_sglang.runtime.model_loader.gguf_quant import (
    GGUFQuantization,
    kept_modules,
    mix_types,
)
from xinf_sglang.runtime.model_loader.loader import load_model
from xinf_sglang.runtime.testing import gguf_writer
from xinf_sglang.runtime.tp.distributed import TPInfo

from .engine_helpers import make_engine, varied_prompts
from .gguf_writer import _random_k_blocks, quantize_tensor
from .gguf_writer import write_gguf as write_test_gguf

ROOT = Path(__file__).resolve().parent.parent
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
NEW_TOKENS = 16
SMOLLM2_TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
                 "List three uses of copper:", "Translate to French: good morning", "The quick brown fox",
                 "Explain photosynthesis in one sentence.", "import numpy as np\n"]
"""SmolLM2's 8-prompt set (issue 33's acceptance)."""


def _generate(gguf: Path, prompts: list[list[int]], dequantize: bool, new_tokens: int = NEW_TOKENS, **overrides):
    """(greedy tokens, weights bytes of the memory plan) of an engine on ``gguf``."""
    engine = make_engine(gguf, max_total_tokens=2048, gguf_dequantize=dequantize, **overrides)
    try:
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        assert engine.check_invariants() == []
        return [o.token_ids for o in outs], engine.memory_plan.weights_bytes
    finally:
        engine.shutdown()


def _mixed_encoder(seed: int = 0):
    """Q4_K_M's mix: every 2-D weight Q4_K, except ``attn_v`` and ``ffn_down`` in Q6_K (random K blocks)."""
    import gguf

    rng = np.random.default_rng(seed)

    def encode(name: str, value, kind: str):
        if kind == "F32":
            return quantize_tensor(name, value, kind)
        kind = "Q6_K" if ("attn_v" in name or "ffn_down" in name) else "Q4_K"
        return _random_k_blocks(value.shape, kind, rng), gguf.GGMLQuantizationType[kind]

    return encode


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q4_K_M"])
def test_tiny_llama_kept_quantized_equals_dequantized(qtype: str, tmp_path_factory, tiny_model, caplog) -> None:
    """Q8_0 / Q4_0 quantized from the weights by the runtime's writer, Q4_K / Q6_K random blocks, ``Q4_K_M`` a
    mix of both K types in one layer (q/k Q4_K, v Q6_K): the same greedy tokens kept and dequantized, and the
    memory plan counts the blocks' bytes."""
    hf_dir = tiny_model("llama", **WIDE)
    out = tmp_path_factory.mktemp(f"kept-{qtype}") / f"tiny-{qtype}.gguf"
    if qtype == "Q4_K_M":
        gguf = gguf_writer.write_gguf(hf_dir, out, "Q4_K", encode=_mixed_encoder())
    else:
        gguf = write_test_gguf(hf_dir, out, qtype)
    prompts = varied_prompts(hf_dir, 4, min_len=3, max_len=40)
    with caplog.at_level(logging.INFO, logger="xinf_sglang.runtime"):
        kept, kept_bytes = _generate(gguf, prompts, dequantize=False)
    dequantized, dense_bytes = _generate(gguf, prompts, dequantize=True)
    assert kept == dequantized
    assert kept_bytes < dense_bytes
    assert "linears kept in their GGUF blocks" in caplog.text


def test_smollm2_q4_1_kept_quantized_equals_dequantized(smollm2, caplog) -> None:
    """The real file: 210 Q4_1 linears and the Q8_0 embedding (the tied head) kept (a fifth of the memory), the
    8-prompt set's greedy tokens equal to the dequantize-at-load path's over 32 tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.hf_dir)
    prompts = [tok(t).input_ids for t in SMOLLM2_TEXTS]
    with caplog.at_level(logging.INFO, logger="xinf_sglang.runtime"):
        kept, kept_bytes = _generate(smollm2.gguf, prompts, dequantize=False, new_tokens=32)
    dequantized, dense_bytes = _generate(smollm2.gguf, prompts, dequantize=True, new_tokens=32)
    assert kept == dequantized
    assert kept_bytes < dense_bytes / 4
    assert "210 linears kept in their GGUF blocks (Q4_1 x210), and model.embed_tokens Q8_0" in caplog.text


def test_kept_modules_are_whole_stacks_of_kernel_types() -> None:
    layer = "model.layers.0"
    tensors = [(f"{layer}.self_attn.{p}_proj.weight", t, 2) for p, t in [("q", "Q4_K"), ("k", "Q4_K"), ("v", "Q6_K"),
                                                                           ("o", "Q4_K")]]
    tensors += [(f"{layer}.mlp.gate_proj.weight", "Q3_K", 2), (f"{layer}.mlp.up_proj.weight", "Q4_K", 2),
                (f"{layer}.mlp.down_proj.weight", "Q6_K", 2), ("model.embed_tokens.weight", "Q8_0", 2),
                (f"{layer}.input_layernorm.weight", "F32", 1)]
    kept = kept_modules(tensors + [("lm_head.weight", "Q2_K", 2)], mla=False)
    assert kept == {f"{layer}.self_attn.q_proj": "Q4_K", f"{layer}.self_attn.k_proj": "Q4_K",
                    f"{layer}.self_attn.v_proj": "Q6_K", f"{layer}.self_attn.o_proj": "Q4_K",
                    f"{layer}.mlp.down_proj": "Q6_K",  # gate/up: Q3_K has no kernel, so the stack stays dense
                    "model.embed_tokens": "Q8_0"}  # the LM head in Q2_K stays dense
    assert not any(".self_attn." in m for m in kept_modules(tensors, mla=True))


def test_stacked_parts_of_two_types_are_kept_apart() -> None:
    """q/k in Q4_K and v in Q6_K: one parameter per type holding its parts' rows, loaded part by part; the
    output and the dequantized weight come back in q | k | v order."""
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, hidden = 4, 2, 64, 512
    layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, False, TPInfo(),
                              GGUFLinearMethod(["Q4_K", "Q4_K", "Q6_K"]), "qkv")
    parts = {"q": ("Q4_K", heads * head_dim), "k": ("Q4_K", kv_heads * head_dim), "v": ("Q6_K", kv_heads * head_dim)}
    blocks = {p: random_gguf_blocks(rows, hidden, t, g) for p, (t, rows) in parts.items()}
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == {
        "qweight_q4_k": (384, 2, 144), "qweight_q6_k": (128, 2, 210)}
    for p, (t, _) in parts.items():
        layer.weight_loader(getattr(layer, f"qweight_{t.lower()}"), blocks[p], p)
    w = torch.cat([dequantize_gguf(blocks[p], t) for p, (t, _) in parts.items()])
    assert torch.equal(layer.quant_method.dequantize(layer), w)
    x = torch.randn(3, hidden, generator=g)
    assert torch.allclose(layer(x), x @ w.t(), rtol=1e-4, atol=1e-4 * float((x @ w.t()).abs().max()))


def test_one_type_per_layer_is_one_parameter_and_sharded_like_any_other() -> None:
    """gate/up both Q4_0: one parameter; tensor parallel: column shards cut rows, row shards whole blocks."""
    g = torch.Generator().manual_seed(1)
    gate_up = MergedColumnParallelLinear(64, [96, 96], False, TPInfo(rank=1, size=2), GGUFLinearMethod(["Q4_0"] * 2))
    assert [n for n, _ in gate_up.named_parameters()] == ["qweight_q4_0"] and gate_up.qweight_q4_0.shape == (96, 2, 18)
    full = [random_gguf_blocks(96, 64, "Q4_0", g) for _ in range(2)]
    for i, blocks in enumerate(full):
        gate_up.weight_loader(gate_up.qweight_q4_0, blocks, i)
    x = torch.randn(2, 64, generator=g)
    want = torch.cat([gguf_linear_ref(x, b[48:], "Q4_0") for b in full], dim=-1)
    assert torch.allclose(gate_up(x), want, atol=1e-4)
    down = RowParallelLinear(128, 32, False, TPInfo(rank=1, size=2), GGUFLinearMethod(["Q4_0"]))
    blocks = random_gguf_blocks(32, 128, "Q4_0", g)
    down.weight_loader(down.qweight_q4_0, blocks)
    assert torch.equal(down.qweight_q4_0, blocks[:, 2:])


def test_checkpoint_yields_blocks_only_when_asked(smollm2) -> None:
    kept = open_checkpoint(smollm2.gguf, keep_gguf_quantized=True)
    assert kept.model_config.quantization is not None and len(kept.kept) == 211  # + the Q8_0 embedding
    name, value = next((n, v) for n, v in kept.tensors() if ".self_attn.q_proj." in n)
    assert name == "model.layers.0.self_attn.q_proj.qweight_q4_1" and value.dtype == torch.uint8
    assert tuple(value.shape) == (576, 18, 20)
    dense = open_checkpoint(smollm2.gguf)
    assert dense.model_config.quantization is None and dense.kept == {}


def test_vocabulary_table_in_blocks_looks_up_and_projects() -> None:
    """A Q8_0 embedding: a lookup dequantizes the rows it reads; as the (tied) head it is the GGUF matmul."""
    from xinf_sglang.runtime.layers import VocabParallelEmbedding

    g = torch.Generator().manual_seed(2)
    table = VocabParallelEmbedding(100, 64, TPInfo(), "Q8_0")
    blocks = random_gguf_blocks(100, 64, "Q8_0", g)
    table.weight_loader(table.qweight_q8_0, blocks)
    dense = dequantize_gguf(blocks, "Q8_0")
    ids = torch.tensor([[3, 99, 0], [7, 7, 42]])
    assert torch.equal(table(ids), dense[ids])
    h = torch.randn(2, 64, generator=g)
    assert torch.allclose(table.logits(h), h @ dense.t(), atol=1e-3)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as while a bf16 model is built: lookups return the model's dtype
    try:
        bf16_table = VocabParallelEmbedding(100, 64, TPInfo(), "Q8_0")
    finally:
        torch.set_default_dtype(before)
    bf16_table.weight_loader(bf16_table.qweight_q8_0, blocks)
    assert torch.equal(bf16_table(ids), dense[ids].bfloat16())


def test_blocks_are_kept_on_cuda_in_any_dtype_and_on_the_cpu_in_float32() -> None:
    """The rule of `keeps_blocks`: the Triton kernels take every dtype, the C++ kernel float32 activations only."""
    from xinf_sglang.runtime.model_loader.gguf_quant import keeps_blocks

    has_triton = importlib.util.find_spec("triton") is not None
    assert all(keeps_blocks("cuda", d, False, 1) == has_triton for d in ("auto", "float32", "bfloat16", "float16"))
    assert keeps_blocks("cpu", "auto", False, 1) and keeps_blocks("cpu", "float32", False, 1)
    assert not any(keeps_blocks("cpu", d, False, 1) for d in ("bfloat16", "float16"))
    assert not keeps_blocks("cuda", "bfloat16", True, 1) and not keeps_blocks("cuda", "bfloat16", False, 2)


def test_q4_k_m_mix_is_llama_cpps() -> None:
    """Q4_K_M over Llama-3.1-8B's 32 layers: attn_v and ffn_down in Q6_K in the 16 layers llama.cpp gives more
    bits (its Q4_K_M files have exactly these), the rest Q4_K, the output Q6_K; tied: the embedding is the output."""
    kept = mix_types("Q4_K_M", 32, tied=False)
    six = [i for i in range(32) if kept[f"model.layers.{i}.self_attn.v_proj"] == "Q6_K"]
    assert six == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert all(kept[f"model.layers.{i}.mlp.down_proj"] == ("Q6_K" if i in six else "Q4_K") for i in range(32))
    assert {kept[f"model.layers.{i}.{p}"] for i in range(32) for p in ("self_attn.q_proj", "mlp.up_proj")} == {"Q4_K"}
    assert (kept["lm_head"], kept["model.embed_tokens"]) == ("Q6_K", "Q4_K")
    assert mix_types("Q4_K_M", 2, tied=True)["model.embed_tokens"] == "Q6_K"
    assert set(mix_types("Q8_0", 2, tied=True).values()) == {"Q8_0"}
    with pytest.raises(ConfigError, match="gguf mix 'Q3_K_M'"):
        mix_types("Q3_K_M", 2, tied=False)
    with pytest.raises(ConfigError, match="either 'kept' or 'mix'"):
        GGUFQuantization.from_dict({"quant_method": "gguf"})


def test_dummy_q4_k_m_config_builds_gguf_layers_and_generates(tmp_path) -> None:
    """configs/llama-3.1-8b-q4km.json at a tiny size (``sglite bench offline --load-format dummy``): the layers
    hold Q4_K / Q6_K blocks as the mix says, the vocabulary tables too, the memory plan counts their bytes, and
    greedy decoding runs (float32: the C++ kernel; bfloat16: the reference) to finite logits."""
    cfg = json.loads((ROOT / "configs" / "llama-3.1-8b-q4km.json").read_text())
    cfg.update(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_model(open_checkpoint(tmp_path), torch.float32, torch.device("cpu"), "dummy")
    params = dict(model.named_parameters())
    assert params["model.layers.0.self_attn.qkv_proj.qweight_q6_k"].shape == (128, 1, 210)  # v of layer 0
    assert "model.layers.4.self_attn.qkv_proj.qweight_q6_k" not in params  # layer 4 of 8: all Q4_K
    assert params["model.layers.4.mlp.down_proj.qweight_q4_k"].shape == (256, 2, 144)
    assert params["lm_head.qweight_q6_k"].shape == (512, 1, 210)
    assert float(model.model.embed_tokens(torch.tensor([1, 2])).abs().sum()) > 0  # drawn, not left empty
    stored = sum(p.numel() * p.element_size() for p in params.values())
    values = {b.bytes: b.values for b in GGUF_BLOCKS.values()}
    dense = sum(p.numel() * 4 if p.dtype != torch.uint8 else p.numel() // p.shape[-1] * values[p.shape[-1]] * 4
                for p in params.values())
    assert stored < dense / 5  # ~4.5-6.6 bits per weight against 32
    prompts = [[5, 9, 11, 3], list(range(40, 70))]
    for dtype in ("float32", "bfloat16"):
        tokens, weights = _generate(tmp_path, prompts, False, new_tokens=4, load_format="dummy", dtype=dtype,
                                   skip_tokenizer_init=True)
        assert all(len(t) == 4 and all(0 <= i < 512 for i in t) for t in tokens)
        assert weights == (stored if dtype == "float32" else stored - sum(
            p.numel() * 2 for p in params.values() if p.dtype == torch.float32))  # the memory plan counts the blocks
