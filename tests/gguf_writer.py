"""Write a GGUF file from a tiny HF checkpoint, the way llama.cpp's converter lays it out (test fixture).

Tensor names and the Q/K row permutation of the ``llama`` architecture follow ``convert_hf_to_gguf.py``; the
tokenizer goes in as a ``gpt2`` (byte-level BPE) vocabulary with its merges, EOS id and chat template. Types
``gguf.quants`` can quantize (F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) are quantized from the real weights; the K
quants, which it cannot quantize, get random blocks with small scales (what is tested there is that the reader
dequantizes, maps and un-permutes them exactly as transformers does).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
# byte offsets of the float16 scale fields inside one 256-value block (ggml-common.h)
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (rows ``[h, 2, d/2]`` -> ``[h, d/2, 2]``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf_name: str) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")  # model.layers.N.<module...>.<weight|bias>
    module = HF_TO_GGUF.get(".".join(parts[3:-1]))
    return None if module is None else f"blk.{parts[2]}.{module}.{parts[-1]}"


def write_gguf(hf_dir: Path, out: Path, qtype: str = "F32", seed: int = 0) -> Path:
    """``hf_dir`` as a GGUF file at ``out`` with 2-D weights stored as ``qtype`` (norms and biases stay F32)."""
    import gguf

    config = json.loads((hf_dir / "config.json").read_text())
    arch = ARCH[config["architectures"][0]]
    writer = gguf.GGUFWriter(str(out), arch)
    _write_hparams(writer, config)
    _write_tokenizer(writer, hf_dir)
    rng = np.random.default_rng(seed)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    for hf, value in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        name = gguf_name(hf)
        if name is None:
            continue
        value = value.astype(np.float32)
        if arch == "llama" and ".attn_q." in name:
            value = llama_cpp_permute(value, heads)
        elif arch == "llama" and ".attn_k." in name:
            value = llama_cpp_permute(value, kv_heads)
        _add_tensor(writer, name, value, qtype if value.ndim == 2 else "F32", rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _write_hparams(writer, config: dict) -> None:
    heads = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_key_length(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(0)


def _write_tokenizer(writer, hf_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    size = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    special = {t["id"] for t in spec["added_tokens"]}
    types = [3 if i in special else (5 if i not in by_id else 1) for i in range(size)]  # control / unused / normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_bos_token_id(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _add_tensor(writer, name: str, value: np.ndarray, qtype: str, rng: np.random.Generator) -> None:
    import gguf
    from gguf import quants

    kind = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        writer.add_tensor(name, value)
    elif qtype in K_SCALE_OFFSETS:
        writer.add_tensor(name, _random_k_blocks(value.shape, qtype, rng), raw_dtype=kind)
    else:
        writer.add_tensor(name, quants.quantize(value, kind), raw_dtype=kind)


def _random_k_blocks(shape: tuple[int, ...], qtype: str, rng: np.random.Generator) -> np.ndarray:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    rows, cols = shape
    if cols % block:
        raise ValueError(f"{qtype} needs rows of a multiple of {block} values; got {cols}")
    blocks = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    for offset in K_SCALE_OFFSETS[qtype]:
        blocks[:, :, offset:offset + 2] = scale
    return blocks.reshape(rows, -1)
