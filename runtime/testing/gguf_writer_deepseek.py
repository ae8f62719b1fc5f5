"""The DeepSeek part of the test GGUF writer: llama.cpp's ``deepseek2`` hyper-parameters and tensor layout, as
``convert_hf_to_gguf.py``'s ``DeepseekV2Model`` writes them today (what sglite's reader maps back is described in
`model_loader.gguf_deepseek`).

Hyper-parameters: ``head_count_kv`` 1 and ``key_length`` / ``value_length`` of the latent cache (kv_lora + rope,
kv_lora), the per-head widths as ``key_length_mla`` / ``value_length_mla``, ``q_lora_rank`` when set,
``kv_lora_rank``, ``rope.dimension_count`` = ``qk_rope_head_dim``, ``leading_dense_block_count``, the expert keys
(count, used, shared count, width, groups when ``n_group`` is set, ``expert_weights_scale``, ``expert_weights_norm``
only when true), ``expert_gating_func`` (sigmoid for ``DeepseekV3ForCausalLM``, whose transformers 5 config no longer
says ``scoring_func``; else the config's ``scoring_func``, default softmax) and YaRN (type, factor, original context,
beta fast / slow, ``yarn_log_multiplier = 0.1 * mscale_all_dim``). Tensors: ``kv_b_proj`` split per head into
``attn_k_b`` (transposed) and ``attn_v_b``; the correction bias as ``exp_probs_b.bias``. Checkpoints that llama.cpp
cannot represent are written all the same, with a warning (`warn_deepseek_differs`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..model_loader.gguf_deepseek import V3_ARCHITECTURE, YARN_LOG_MULTIPLIER_SCALE, split_kv_b

logger = logging.getLogger(__name__)

LLAMA_CPP_LITE_LAYERS = (26, 27)
"""llama.cpp's deepseek2 takes a model without q LoRA (a plain ``attn_q``) only at these layer counts (``is_lite`` in
``src/llama-model.cpp``: DeepSeek-V2-Lite's 27, GigaChat3's 26); at others it requires ``attention.q_lora_rank``."""


def deepseek_tensors(name: str, value: np.ndarray, config: dict) -> Iterator[tuple[str, np.ndarray]]:
    """The GGUF tensor(s) of one tensor already under its GGUF name: ``attn_kv_b`` as ``attn_k_b`` + ``attn_v_b``."""
    if not name.endswith(".attn_kv_b.weight"):
        yield name, value
        return
    k_b, v_b = split_kv_b(value, config["num_attention_heads"], config["qk_nope_head_dim"])
    yield name.replace(".attn_kv_b.", ".attn_k_b."), k_b
    yield name.replace(".attn_kv_b.", ".attn_v_b."), v_b


def write_deepseek_hparams(writer: Any, config: dict) -> None:
    """The attention, expert and rope keys of a DeepSeek config (the common ones are the caller's)."""
    kv_lora, rope = config["kv_lora_rank"], config["qk_rope_head_dim"]
    writer.add_head_count_kv(1)
    if config.get("q_lora_rank"):
        writer.add_q_lora_rank(config["q_lora_rank"])
    writer.add_kv_lora_rank(kv_lora)
    writer.add_key_length(kv_lora + rope)
    writer.add_value_length(kv_lora)
    writer.add_key_length_mla(config["qk_nope_head_dim"] + rope)
    writer.add_value_length_mla(config["v_head_dim"])
    writer.add_rope_dimension_count(rope)
    writer.add_leading_dense_block_count(config.get("first_k_dense_replace") or 0)
    _write_experts(writer, config)
    _write_yarn(writer, config)


def _write_experts(writer: Any, config: dict) -> None:
    import gguf

    writer.add_expert_count(config["n_routed_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_expert_shared_count(config.get("n_shared_experts") or 0)
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("n_group") is not None:
        writer.add_expert_group_count(config["n_group"])
    if config.get("topk_group") is not None:
        writer.add_expert_group_used_count(config["topk_group"])
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if _sigmoid(config)
                                  else gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_expert_weights_scale(float(config.get("routed_scaling_factor") or 1.0))
    if config.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)


def _sigmoid(config: dict) -> bool:
    return config["architectures"][0] == V3_ARCHITECTURE or config.get("scoring_func") == "sigmoid"


def _yarn(config: dict) -> dict:
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    return rope if rope.get("rope_type", rope.get("type")) == "yarn" and rope.get("factor") else {}


def _write_yarn(writer: Any, config: dict) -> None:
    import gguf

    yarn = _yarn(config)
    if not yarn:
        return
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(yarn["factor"]))
    writer.add_rope_scaling_orig_ctx_len(int(yarn["original_max_position_embeddings"]))
    if yarn.get("beta_fast") is not None:
        writer.add_rope_scaling_yarn_beta_fast(float(yarn["beta_fast"]))
    if yarn.get("beta_slow") is not None:
        writer.add_rope_scaling_yarn_beta_slow(float(yarn["beta_slow"]))
    if yarn.get("mscale_all_dim") is not None:
        writer.add_rope_scaling_yarn_log_mul(YARN_LOG_MULTIPLIER_SCALE * float(yarn["mscale_all_dim"]))


def warn_deepseek_differs(config: dict) -> None:
    """Say when llama.cpp's deepseek2 computes another model than ``config`` from the written file, or refuses it."""
    name, yarn = config["architectures"][0], _yarn(config)
    if yarn and abs(_hf_attention_factor(yarn) - 1.0) > 1e-6:
        logger.warning("%s has YaRN mscale=%s, mscale_all_dim=%s: HF scales cos/sin by %.4f where llama.cpp's "
                       "deepseek2 leaves them unscaled (the two agree when mscale == mscale_all_dim), so the GGUF "
                       "model's rope differs", name, yarn.get("mscale"), yarn.get("mscale_all_dim"),
                       _hf_attention_factor(yarn))
    if not _sigmoid(config) and (config.get("n_group") or 1) > 1:
        logger.warning("%s routes by groups (group_limited_greedy); llama.cpp ranks groups by their two best "
                       "scores where HF DeepSeek-V2 takes the best one", name)
    if not config.get("q_lora_rank") and config["num_hidden_layers"] not in LLAMA_CPP_LITE_LAYERS:
        logger.warning("%s has no q LoRA; llama.cpp's deepseek2 reads that only at V2-Lite's layer counts %s and "
                       "refuses this file (sglite reads it)", name, LLAMA_CPP_LITE_LAYERS)


def _hf_attention_factor(yarn: dict) -> float:
    """transformers' YaRN cos/sin scale (``_compute_yarn_parameters``)."""
    if yarn.get("attention_factor") is not None:
        return float(yarn["attention_factor"])
    factor, mscale, all_dim = float(yarn["factor"]), yarn.get("mscale"), yarn.get("mscale_all_dim")
    if mscale and all_dim:
        return _get_mscale(factor, float(mscale)) / _get_mscale(factor, float(all_dim))
    return _get_mscale(factor)


def _get_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
