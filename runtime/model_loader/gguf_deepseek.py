"""DeepSeek GGUF files (llama.cpp's ``deepseek2``): the HF config keys and the MLA up-projection's layouts.

llama.cpp writes DeepSeek-V2, V2-Lite, V2.5, V3, R1, V3.1 and Moonlight under one architecture name, ``deepseek2``.
Facts of its ``convert_hf_to_gguf.py`` (``DeepseekV2Model`` and ``TextModel.set_gguf_parameters``), of
``src/llama-model.cpp`` (hyper-parameters) and ``src/models/deepseek2.cpp`` (the graph):

- **Which model.** ``deepseek2.expert_gating_func`` 2 (sigmoid: V3, R1, Moonlight, whose routers add the correction
  bias ``exp_probs_b``) is ``DeepseekV3ForCausalLM``; 1 (softmax) or no key (the V2 / V2.5 files written before the
  key existed, which llama.cpp routes with softmax) is ``DeepseekV2ForCausalLM``. A correction bias in a softmax file
  is refused: llama.cpp would add it to softmax scores, which no HF DeepSeek does.
- **Attention.** ``attention.q_lora_rank`` (absent: V2-Lite's plain ``attn_q``), ``attention.kv_lora_rank``,
  ``rope.dimension_count`` (``qk_rope_head_dim``). Since llama.cpp's MLA rewrite (spring 2025) the per-head widths
  are ``attention.key_length_mla`` (nope + rope) and ``attention.value_length_mla`` (``v_head_dim``), while
  ``key_length`` / ``value_length`` / ``head_count_kv`` describe the latent cache as one KV head (kv_lora + rope,
  kv_lora, 1); older files hold the per-head widths in ``key_length`` / ``value_length``. HF's ``kv_b_proj``
  ``[H * (nope + v), kv_lora]`` is stored split per head as ``attn_k_b`` ``[H, kv_lora, nope]`` (transposed) and
  ``attn_v_b`` ``[H, v, kv_lora]`` (numpy order), or whole as ``attn_kv_b`` in older files: both load as
  ``kv_b_proj`` (`merge_kv_b`; the test writer's `split_kv_b`). Q/K rows are not permuted: llama.cpp's deepseek2
  rotates adjacent pairs, which is HF DeepSeek's interleaved rope (``rope_interleave`` true).
- **Experts.** ``expert_count`` / ``expert_used_count`` / ``expert_feed_forward_length`` (``n_routed_experts``,
  ``num_experts_per_tok``, ``moe_intermediate_size``), ``expert_shared_count`` (``n_shared_experts``: the
  ``ffn_*_shexp`` tensors are ``n_shared * moe_intermediate`` wide), ``leading_dense_block_count``
  (``first_k_dense_replace``), ``expert_weights_scale`` (``routed_scaling_factor``; llama.cpp skips the scaling when
  absent), ``expert_weights_norm`` (``norm_topk_prob``, false when absent), ``expert_group_count`` /
  ``expert_group_used_count`` (``n_group`` / ``topk_group``, written by converters since late 2025; absent: one
  group). ``topk_method``: V3 ``noaux_tc``; V2 ``group_limited_greedy`` with several groups, else ``greedy``
  (llama.cpp ranks V2's groups by their two best scores, as V3 does, where HF V2 takes the best one: sglite follows HF).
- **YaRN.** ``rope.scaling.type`` yarn, ``.factor``, ``.original_context_length``, ``.yarn_beta_fast`` /
  ``.yarn_beta_slow`` when written, and ``.yarn_log_multiplier`` = ``0.1 * mscale_all_dim`` (the converter multiplies,
  llama.cpp divides by 0.1 at load). llama.cpp's graph leaves cos/sin unscaled and multiplies the softmax scale by
  ``(0.1 * mscale_all_dim * ln(factor) + 1) ** 2``: HF's DeepSeek rope when ``mscale == mscale_all_dim``, as in every
  released config. The config says exactly that: ``attention_factor`` 1, ``mscale = mscale_all_dim``.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError
from .gguf_header import SIGMOID_ARCHITECTURES


class GGUFMetadata(Protocol):
    """What this module reads of `gguf.GGUFMetadata` (not imported: gguf.py imports this module)."""

    hf_architecture: str

    def get(self, key: str, default: Any = None) -> Any: ...

    def require(self, key: str) -> Any: ...

ARCH = "deepseek2"
V3_ARCHITECTURE = SIGMOID_ARCHITECTURES[ARCH]
YARN_LOG_MULTIPLIER_SCALE = 0.1  # convert_hf_to_gguf.py writes 0.1 * mscale_all_dim
_CORRECTION_BIAS = re.compile(r"blk\.\d+\.exp_probs_b\.bias$")


def merge_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """HF's ``kv_b_proj`` ``[H * (nope + v), kv_lora]`` from llama.cpp's ``attn_k_b`` ``[H, kv_lora, nope]`` and
    ``attn_v_b`` ``[H, v, kv_lora]``."""
    heads, kv_lora, _ = k_b.shape
    if v_b.shape[0] != heads or v_b.shape[2] != kv_lora:
        raise ConfigError(f"GGUF attn_k_b {list(k_b.shape)} and attn_v_b {list(v_b.shape)} do not fit together")
    return np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, kv_lora)


def split_kv_b(kv_b: np.ndarray, heads: int, nope: int) -> tuple[np.ndarray, np.ndarray]:
    """``(attn_k_b, attn_v_b)`` of HF's ``kv_b_proj``, as ``convert_hf_to_gguf.py`` splits it (the inverse of
    `merge_kv_b`)."""
    per_head = kv_b.reshape(heads, -1, kv_b.shape[-1])
    return np.ascontiguousarray(per_head[:, :nope].transpose(0, 2, 1)), np.ascontiguousarray(per_head[:, nope:])


def deepseek_config(metadata: GGUFMetadata, names: set[str]) -> dict[str, Any]:
    """The HF ``DeepseekV2Config`` / ``DeepseekV3Config`` keys of a ``deepseek2`` file (what `read_mla` and
    `read_moe` take), over the generic ones of `gguf.config_dict`.

    Raises:
        ConfigError: a required key is missing, or a softmax-routed file has a correction bias.
    """
    key = lambda name: f"{ARCH}.{name}"  # noqa: E731
    v3 = metadata.hf_architecture == V3_ARCHITECTURE
    if not v3 and any(_CORRECTION_BIAS.match(n) for n in names):
        raise ConfigError("this deepseek2 GGUF routes with softmax (expert_gating_func absent or 1) but has a router "
                          "correction bias (exp_probs_b), which no DeepSeek model combines; sglite reads V2 "
                          "(softmax, no bias) and V3 (sigmoid with the bias)")
    rope = int(metadata.require(key("rope.dimension_count")))
    qk_head = int(metadata.get(key("attention.key_length_mla")) or metadata.require(key("attention.key_length")))
    q_lora = metadata.get(key("attention.q_lora_rank"))
    return {
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "q_lora_rank": int(q_lora) if q_lora else None,
        "kv_lora_rank": int(metadata.require(key("attention.kv_lora_rank"))),
        "qk_nope_head_dim": qk_head - rope,
        "qk_rope_head_dim": rope,
        "v_head_dim": int(metadata.get(key("attention.value_length_mla"))
                          or metadata.require(key("attention.value_length"))),
        "head_dim": rope,  # what HF's DeepSeek configs set (the rotated part of a head)
        "num_key_value_heads": int(metadata.require(key("attention.head_count"))),  # head_count_kv is 1: the cache
        "rope_interleave": True,
        **_experts(metadata, v3),
    }


def _experts(metadata: GGUFMetadata, v3: bool) -> dict[str, Any]:
    key = lambda name: f"{ARCH}.{name}"  # noqa: E731
    groups = int(metadata.get(key("expert_group_count")) or 1)
    return {
        "n_routed_experts": int(metadata.require(key("expert_count"))),
        "num_experts_per_tok": int(metadata.require(key("expert_used_count"))),
        "n_shared_experts": int(metadata.get(key("expert_shared_count")) or 0),
        "moe_intermediate_size": int(metadata.require(key("expert_feed_forward_length"))),
        "first_k_dense_replace": int(metadata.get(key("leading_dense_block_count")) or 0),
        "moe_layer_freq": 1,
        "routed_scaling_factor": float(metadata.get(key("expert_weights_scale")) or 1.0),
        "norm_topk_prob": bool(metadata.get(key("expert_weights_norm")) or False),
        "scoring_func": "sigmoid" if v3 else "softmax",
        "topk_method": "noaux_tc" if v3 else "group_limited_greedy" if groups > 1 else "greedy",
        "n_group": groups,
        "topk_group": int(metadata.get(key("expert_group_used_count")) or groups),
    }


def deepseek_rope(metadata: GGUFMetadata, theta: float) -> dict[str, Any]:
    """HF ``rope_parameters`` of a ``deepseek2`` file: default, or YaRN as llama.cpp's deepseek2 graph computes it.

    Raises:
        ConfigError: another rope scaling, or a YaRN attention factor (which llama.cpp's deepseek2 would apply to
            cos/sin and to the softmax scale alike, unlike HF).
    """
    key = lambda name: f"{ARCH}.rope.scaling.{name}"  # noqa: E731
    scaling = metadata.get(key("type"))
    if scaling in (None, "none"):
        return {"rope_theta": theta, "rope_type": "default"}
    if scaling != "yarn":
        raise ConfigError(f"deepseek2 GGUF rope scaling {scaling!r} is not supported; sglite reads none and yarn")
    if float(metadata.get(key("yarn_attn_factor")) or 1.0) != 1.0:
        raise ConfigError("deepseek2 GGUF with rope.scaling.yarn_attn_factor is not supported (no DeepSeek config "
                          "sets an attention factor)")
    mscale_all_dim = float(metadata.get(key("yarn_log_multiplier")) or 0.0) / YARN_LOG_MULTIPLIER_SCALE
    params = {
        "rope_theta": theta,
        "rope_type": "yarn",
        "factor": float(metadata.require(key("factor"))),
        "original_max_position_embeddings": int(metadata.require(key("original_context_length"))),
        "attention_factor": 1.0,  # cos/sin unscaled: llama.cpp cancels ggml's YaRN magnitude scaling
        "mscale": mscale_all_dim,
        "mscale_all_dim": mscale_all_dim,
    }
    for name, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if metadata.get(key(name)) is not None:
            params[hf] = float(metadata.get(key(name)))
    return params
