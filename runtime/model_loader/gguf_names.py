"""GGUF tensor names <-> Hugging Face checkpoint names, both directions (the reader's `hf_tensor_name`, the test
writer's `gguf_tensor_name`), from llama.cpp's ``gguf.constants.TENSOR_NAMES`` / ``convert_hf_to_gguf.py``.

Dense blocks: ``blk.N.{attn_q,attn_k,attn_v,attn_output,attn_norm,attn_q_norm,attn_k_norm,ffn_gate,ffn_up,ffn_down,
ffn_norm}``. Mixture-of-experts blocks (``qwen2moe``, ``qwen3moe``, and ``llama`` with experts, i.e. Mixtral):

- ``ffn_gate_inp`` is the router, ``[E, H]`` -> ``{moe}.gate.weight``;
- ``ffn_{gate,up,down}_exps`` hold every expert stacked into one 3-D tensor (``[E, I, H]`` for gate and up,
  ``[E, H, I]`` for down in numpy order) -> ``{moe}.experts.{gate,up,down}_proj`` (a parameter, no ``.weight``);
- Qwen2-MoE's shared expert ``ffn_{gate,up,down}_shexp`` -> ``mlp.shared_expert.{gate,up,down}_proj.weight`` and
  its sigmoid gate ``ffn_gate_inp_shexp`` -> ``mlp.shared_expert_gate.weight``.

DeepSeek (``deepseek2``) adds the multi-head latent attention parts ``attn_q_a`` / ``attn_q_a_norm`` / ``attn_q_b``
(V2-Lite: a plain ``attn_q``), ``attn_kv_a_mqa``, ``attn_kv_a_norm`` and ``attn_kv_b`` (older files; today's split it
into ``attn_k_b`` / ``attn_v_b``, `MLA_SPLIT`, merged back by the reader), V3's router correction bias
``exp_probs_b.bias`` -> ``mlp.gate.e_score_correction_bias``, and its shared experts ``ffn_*_shexp`` ->
``mlp.shared_experts.*`` (plural: `DEEPSEEK_SHARED`).

``{moe}`` is ``mlp`` except for Mixtral, whose HF checkpoints say ``block_sparse_moe``. Dense FFN layers between
sparse ones keep the dense names. llama.cpp's first Mixtral files (before it stacked experts, spring 2024) stored
one tensor per expert, ``blk.N.ffn_gate.E.weight``: `OLD_EXPERT` recognises them so the reader can refuse by name.
"""

from __future__ import annotations

import re

GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
}
"""GGUF block part -> HF module path under ``model.layers.N`` (the tensor keeps its ``.weight`` / ``.bias``)."""

ROUTER = "ffn_gate_inp"
EXPERT_PARTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
"""Stacked experts: GGUF part -> HF parameter under ``{moe}.experts`` (3-D, named without ``.weight``)."""

MOE_PREFIX, MIXTRAL_MOE_PREFIX = "mlp", "block_sparse_moe"
SHARED_EXPERT, DEEPSEEK_SHARED = "mlp.shared_expert", "mlp.shared_experts"
"""Where the ``ffn_*_shexp`` tensors go: Qwen2-MoE's one shared expert, DeepSeek's (wider) shared experts."""
CORRECTION_BIAS = "exp_probs_b"
MLA_SPLIT = re.compile(r"blk\.(\d+)\.attn_(k|v)_b\.weight$")
"""DeepSeek's up-projection as llama.cpp writes it since its MLA rewrite: ``attn_k_b`` and ``attn_v_b``."""

_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
OLD_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
"""One expert's tensor in llama.cpp's pre-2024 Mixtral layout (``blk.3.ffn_gate.7.weight``)."""

_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_EXPERTS = re.compile(rf"model\.layers\.(\d+)\.(?:{MOE_PREFIX}|{MIXTRAL_MOE_PREFIX})\.experts\.(\w+?)(?:\.weight)?$")
_HF_CORRECTION = re.compile(r"model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias$")
_HF_PARTS = {hf: part for part, hf in BLOCK_NAMES.items()}
_HF_PARTS.update({DEEPSEEK_SHARED + hf[len(SHARED_EXPERT):]: part for part, hf in BLOCK_NAMES.items()
                  if hf.startswith(SHARED_EXPERT + ".")})
_HF_GLOBAL = {hf: stem for stem, hf in GLOBAL_NAMES.items()}


def hf_tensor_name(gguf_name: str, moe_prefix: str = MOE_PREFIX, shared: str = SHARED_EXPERT) -> str | None:
    """The HF checkpoint name of a GGUF tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``,
    ``blk.3.ffn_up_exps.weight`` -> ``model.layers.3.mlp.experts.up_proj``); None for tensors the decoder does
    not take (``rope_freqs`` is read into the config instead) and for DeepSeek's split ``attn_k_b`` / ``attn_v_b``
    (the reader merges them). ``moe_prefix``: the module holding the router and experts (`MIXTRAL_MOE_PREFIX` for
    Mixtral); ``shared``: the module of the ``ffn_*_shexp`` tensors (`DEEPSEEK_SHARED` for DeepSeek)."""
    block = _BLOCK.match(gguf_name)
    if block is not None:
        layer, part, kind = block.groups()
        if part in EXPERT_PARTS and kind == "weight":
            return f"model.layers.{layer}.{moe_prefix}.experts.{EXPERT_PARTS[part]}"
        if part == CORRECTION_BIAS:
            return f"model.layers.{layer}.{moe_prefix}.gate.e_score_correction_bias" if kind == "bias" else None
        target = f"{moe_prefix}.gate" if part == ROUTER else BLOCK_NAMES.get(part)
        if target is not None and target.startswith(SHARED_EXPERT + "."):
            target = shared + target[len(SHARED_EXPERT):]
        return None if target is None else f"model.layers.{layer}.{target}.{kind}"
    stem, _, kind = gguf_name.rpartition(".")
    target = GLOBAL_NAMES.get(stem)
    return None if target is None else f"{target}.{kind}"


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of an HF tensor, the inverse of `hf_tensor_name` for either MoE prefix
    (``model.layers.3.block_sparse_moe.gate.weight`` -> ``blk.3.ffn_gate_inp.weight``,
    ``model.layers.3.mlp.experts.down_proj`` -> ``blk.3.ffn_down_exps.weight``); None for tensors llama.cpp does
    not take (``rotary_emb.inv_freq``) and for one expert's tensor (the writer stacks those first). DeepSeek's
    ``kv_b_proj`` is named ``attn_kv_b`` (the writer splits it as llama.cpp does, `gguf_deepseek.split_kv_b`)."""
    correction = _HF_CORRECTION.match(hf_name)
    if correction is not None:
        return f"blk.{correction.group(1)}.{CORRECTION_BIAS}.bias"
    experts = _HF_EXPERTS.match(hf_name)
    if experts is not None:
        layer, param = experts.groups()
        part = next((p for p, hf in EXPERT_PARTS.items() if hf == param), None)
        return None if part is None else f"blk.{layer}.{part}.weight"
    block = _HF_BLOCK.match(hf_name)
    if block is not None:
        layer, module, kind = block.groups()
        part = ROUTER if module in (f"{MOE_PREFIX}.gate", f"{MIXTRAL_MOE_PREFIX}.gate") else _HF_PARTS.get(module)
        return None if part is None else f"blk.{layer}.{part}.{kind}"
    stem, _, kind = hf_name.rpartition(".")
    target = _HF_GLOBAL.get(stem)
    return None if target is None else f"{target}.{kind}"
