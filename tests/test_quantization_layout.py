"""The quantization seam without a model: ``quantization_config`` reading and its refusals (by name, before any
weight is read), per-layer methods (modules kept dense), and tensor-parallel shards of quantized layers cut
exactly where the dequantized weight is cut (the generic loaders read only the `ParamLayout`s)."""

from __future__ import annotations

import pytest
import torch
from xinf_sglang.kernels.quant import pack_awq, pack_gptq, quantize_fp8_block, quantize_int
from xinf_sglang.runtime.errors import ConfigError
from xinf_sglang.runtime.layers import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from xinf_sglang.runtime.layers.quantization.awq import AWQLinearMethod
from xinf_sglang.runtime.layers.quantization.base import UNQUANTIZED
from xinf_sglang.runtime.layers.quantization.fp8 import Fp8BlockLinearMethod
from xinf_sglang.runtime.layers.quantization.gptq import GPTQLinearMethod
from xinf_sglang.runtime.model_loader.model_config import ModelConfig
from xinf_sglang.runtime.model_loader.quant_config import linear_method, read_quantization
from xinf_sglang.runtime.tp.distributed import TPInfo

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
CT_INT4 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
    "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}}

REFUSED = {
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quantization 'bitsandbytes'"),
    "awq-gemv": ({**AWQ, "version": "gemv"}, "awq version 'gemv'"),
    "awq-no-zero": ({**AWQ, "zero_point": False}, "awq without zero points"),
    "gptq-3bit": ({**GPTQ, "bits": 3}, "gptq with 3 bits"),
    "gptq-v2": ({**GPTQ, "checkpoint_format": "gptq_v2"}, "checkpoint_format 'gptq_v2'"),
    "gptq-lm-head": ({**GPTQ, "lm_head": True}, "quantized lm_head"),
    "fp8-static": ({**FP8, "activation_scheme": "static"}, "activation_scheme 'static'"),
    "fp8-e5m2": ({**FP8, "fmt": "e5m2"}, "fp8 fmt 'e5m2'"),
    "ct-int4": (CT_INT4, "compressed-tensors pack-quantized (int 4-bit weights)"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unsupported_schemes_are_refused_by_name_with_what_is_served(case):
    config, named = REFUSED[case]
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**LLAMA, "quantization_config": config})
    assert named in str(err.value) and "sglite serves fp8" in str(err.value) and "awq (GEMM" in str(err.value)


def test_quantized_mixture_of_experts_is_refused_by_name():
    moe = {**LLAMA, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "quantization_config": AWQ}
    with pytest.raises(ConfigError, match=r"awq-quantized mixture-of-experts models \(Qwen3MoeForCausalLM\) are not"):
        ModelConfig.from_dict(moe)


def test_fp8_deepseek_v3_is_refused_saying_what_to_use_instead():
    """DeepSeek-V3 / R1 ship FP8 (128 x 128 blocks) only: issue 31 point 6's refusal, until FP8 experts land."""
    import json
    from pathlib import Path

    v3 = json.loads((Path(__file__).parent.parent / "configs" / "deepseek-v2-lite.json").read_text())
    v3 |= {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "topk_method": "noaux_tc",
           "scoring_func": "sigmoid", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
           "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    with pytest.raises(ConfigError, match=r"fp8-quantized mixture-of-experts models \(DeepseekV3ForCausalLM\).*BF16"):
        ModelConfig.from_dict(v3)


def test_configs_read_as_the_exporters_write_them():
    assert ModelConfig.from_dict(LLAMA).quantization is None
    awq = read_quantization({"quantization_config": {"quant_method": "awq", "w_bit": 4, "q_group_size": 64,
                                                     "zero_point": True, "version": "GEMM"}}, moe=False)
    assert awq.method().describe() == "awq 4-bit, group 64, zero points"
    gptq = read_quantization({"quantization_config": {**GPTQ, "bits": 8, "group_size": -1, "desc_act": True}}, False)
    assert gptq.method().describe() == "gptq 8-bit, per-channel, symmetric, activation order"
    fp8 = read_quantization({"quantization_config": FP8}, moe=False)
    assert fp8.method().describe().startswith("fp8 e4m3, 128x128 block scales")
    ct = read_quantization({"quantization_config": {**CT_INT4, "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}},
        "ignore": ["lm_head", "re:.*mlp.down_proj$"]}}, moe=False)
    assert ct.is_skipped("model.layers.3.mlp.down_proj") and not ct.is_skipped("model.layers.3.mlp.gate_proj")


def test_modules_kept_dense_and_stacks_that_disagree():
    quant = read_quantization({"quantization_config": {**AWQ, "modules_to_not_convert": ["layers.0.self_attn",
                                                                                         "layers.1.mlp.up_proj"]}},
                              moe=False)
    assert linear_method(quant, "model.layers.0.self_attn", ("q_proj", "k_proj", "v_proj")) is UNQUANTIZED
    assert isinstance(linear_method(quant, "model.layers.1.self_attn.o_proj"), AWQLinearMethod)
    with pytest.raises(ConfigError, match="up_proj are kept dense .* with model.layers.1.mlp.gate_proj"):
        linear_method(quant, "model.layers.1.mlp", ("gate_proj", "up_proj"))


def _awq_tensors(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    q, zeros, scales = quantize_int(w, 4, group, sym=False)
    qweight, qzeros = pack_awq(q, zeros)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.half()}


def _gptq_tensors(w: torch.Tensor, group: int, bits: int) -> dict[str, torch.Tensor]:
    q, zeros, scales = quantize_int(w, bits, group, sym=False)
    qweight, qzeros = pack_gptq(q, zeros, bits)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.half(),
            "g_idx": (torch.arange(w.shape[1]) // group).to(torch.int32)}


def _load(layer, tensors: dict[str, torch.Tensor], shard_id=None) -> None:
    params = dict(layer.named_parameters())
    for name, t in tensors.items():
        layer.weight_loader(params[name], t, shard_id)


@pytest.mark.parametrize("method", [AWQLinearMethod(32), GPTQLinearMethod(4, 32, False, False),
                                    GPTQLinearMethod(8, -1, False, True)], ids=["awq", "gptq4", "gptq8"])
def test_tensor_parallel_shards_cut_the_dequantized_weight(method):
    torch.manual_seed(0)
    gate, up, down = torch.randn(64, 128), torch.randn(64, 128), torch.randn(128, 64)
    pack = (lambda w: _awq_tensors(w, 32)) if isinstance(method, AWQLinearMethod) else (
        lambda w: _gptq_tensors(w, method.group_size if method.group_size > 0 else w.shape[1], method.bits))
    full = {0: pack(gate), 1: pack(up), "down": pack(down)}
    ref = {k: method.dequantize(_Stored(t)) for k, t in full.items()}
    for rank in range(2):
        tp = TPInfo(rank, 2)
        column = MergedColumnParallelLinear(128, [64, 64], False, tp, method)
        _load(column, full[0], 0)
        _load(column, full[1], 1)
        rows = slice(32 * rank, 32 * rank + 32)
        torch.testing.assert_close(method.dequantize(column), torch.cat([ref[0][rows], ref[1][rows]]))
        row = RowParallelLinear(64, 128, False, tp, method)
        _load(row, full["down"])
        torch.testing.assert_close(method.dequantize(row), ref["down"][:, rows])


class _Stored:
    """Checkpoint tensors read as a layer's attributes (for ``method.dequantize``)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.__dict__.update(tensors)


def test_fp8_block_shards_and_their_refusals():
    w = torch.randn(256, 256)
    q, scale = quantize_fp8_block(w, (128, 128))
    method = Fp8BlockLinearMethod((128, 128))
    row = RowParallelLinear(256, 256, False, TPInfo(1, 2), method)
    _load(row, {"weight": q, "weight_scale_inv": scale})
    torch.testing.assert_close(method.dequantize(row), method.dequantize(_Stored(
        {"weight": q, "weight_scale_inv": scale}))[:, 128:])
    with pytest.raises(ConfigError, match=r"qkv.*weight_scale_inv stores 128 output features per element, but a "
                                          r"shard takes output features \[128, 192\) of 256 \(part 'k'\)"):
        QKVParallelLinear(256, 32, 4, 2, False, TPInfo(), method, "qkv")
    with pytest.raises(ConfigError, match=r"input features \[64, 128\) of 128.*try another tp_size"):
        RowParallelLinear(128, 256, False, TPInfo(1, 2), method)


def test_gptq_activation_order_refuses_an_input_split_and_stacks_one_g_idx():
    method = GPTQLinearMethod(4, 32, desc_act=True, sym=True)
    with pytest.raises(ConfigError, match="desc_act .* cannot be split over input features"):
        RowParallelLinear(128, 64, False, TPInfo(0, 2), method)
    layer = MergedColumnParallelLinear(128, [64, 64], False, TPInfo(), method)
    g_idx = dict(layer.named_parameters())["g_idx"]
    layer.weight_loader(g_idx, torch.arange(128, dtype=torch.int32) % 4, 0)
    with pytest.raises(ValueError, match="differs from the g_idx of part 0"):
        layer.weight_loader(g_idx, torch.arange(128, dtype=torch.int32) // 32, 1)
