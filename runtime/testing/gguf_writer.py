"""Write a GGUF file from a Hugging Face checkpoint folder, laid out the way llama.cpp's converter lays it out.

Used by ``sglite bench offline --baseline llamacpp`` (llama.cpp fed an F32 GGUF of the very weights sglite runs)
and by the tests (GGUF fixtures of tiny checkpoints). Tensor names are the inverse of the reader's
(`gguf_names.gguf_tensor_name`); ``llama`` Q/K rows are permuted like ``convert_hf_to_gguf.py``'s
``LlamaModel.permute`` (the reader's `gguf.unpermute_qk` undoes it). Mixtures of experts as the converter writes
them: Qwen2-MoE / Qwen3-MoE as ``qwen2moe`` / ``qwen3moe``, Mixtral as ``llama`` with ``expert_count``; each
layer's experts stacked into one 3-D tensor per projection (from the per-expert tensors ``save_pretrained`` writes,
``experts.E.gate_proj`` or Mixtral's ``w1`` gate / ``w3`` up / ``w2`` down, or a fused ``experts.gate_up_proj``).
DeepSeek-V2 / V3 as ``deepseek2`` (`gguf_writer_deepseek`: latent-attention keys, ``kv_b_proj`` split into
``attn_k_b`` / ``attn_v_b``); layers past ``num_hidden_layers`` (V3's multi-token prediction) are left out, as the
converter does.
llama.cpp decides top-k renormalisation per architecture and runs no dense layer between sparse ones; a checkpoint
that differs is written all the same, with a warning (sglite reads such files; llama.cpp computes another model). The tokenizer goes in as a ``gpt2`` (byte-level BPE) vocabulary with
token types, merges, BOS/EOS ids, whether BOS is prepended, and the chat template; the pre-tokenizer is named
``default`` (llama.cpp then splits text like GPT-2: benchmarks feed token ids, so nothing depends on it).

2-D and 3-D weights are stored as ``qtype`` (any type ``gguf.quants`` can quantize: F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1); norms, biases and routers (``ffn_gate_inp``, which llama.cpp never quantizes) stay F32, and a
weight whose rows are not whole blocks of ``qtype`` falls back to F16 (the converter's ``QuantError`` fallback:
DeepSeek's ``attn_k_b`` rows are ``qk_nope_head_dim`` long). `cached_gguf` keeps one written file per folder, type and
writer version in ``$SGLITE_CACHE/gguf`` (default ``~/.cache/sglite/gguf``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..model_loader.checkpoint import SafetensorsCheckpoint
from ..model_loader.gguf_header import ARCHITECTURES, MOE_ARCHITECTURES, SIGMOID_ARCHITECTURES
from ..model_loader.gguf_names import gguf_tensor_name
from .gguf_writer_deepseek import deepseek_tensors, warn_deepseek_differs, write_deepseek_hparams

logger = logging.getLogger(__name__)

WRITER_VERSION = 1  # bump when the written layout changes: cached files are rewritten
GGUF_ARCH = {hf: gguf for table in (ARCHITECTURES, MOE_ARCHITECTURES, SIGMOID_ARCHITECTURES)
             for gguf, hf in table.items()}
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_UNUSED = 1, 3, 5
_LLAMA_CPP_NORM_TOPK = {"qwen2moe": False, "qwen3moe": True}  # build_moe_ffn's norm_w in src/models/<arch>.cpp
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_FUSED_GATE_UP = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.gate_up_proj(?:\.weight)?$")
_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

Encoder = Callable[[str, np.ndarray, str], tuple[np.ndarray, Any]]
"""``encode(gguf_name, float32 value, qtype) -> (array, raw_dtype or None)``: how one tensor is stored."""


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (rows ``[h, 2, d/2]`` -> ``[h, d/2, 2]``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


gguf_name = gguf_tensor_name
"""The GGUF name of an HF tensor (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``)."""


def quantize_tensor(name: str, value: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """The default `Encoder`: ``value`` as F32, or quantized to ``qtype`` by ``gguf.quants`` (F16 when its rows are
    not whole blocks of ``qtype``, as ``convert_hf_to_gguf.py`` falls back)."""
    import gguf
    from gguf import quants

    if qtype == "F32":
        return value, None
    kind = gguf.GGMLQuantizationType[qtype]
    try:
        return quants.quantize(value, kind), kind
    except gguf.QuantError:
        logger.debug("%s %s: rows of %d values are not whole %s blocks, stored as F16", name, value.shape,
                     value.shape[-1], qtype)
        return quants.quantize(value, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def write_gguf(hf_dir: str | Path, out_file: str | Path, qtype: str = "F32",
               encode: Encoder = quantize_tensor) -> Path:
    """``hf_dir`` as a GGUF file at ``out_file``, 2-D weights stored as ``qtype`` (through ``encode``).

    Raises:
        ValueError: the architecture is not one sglite's GGUF reader builds (`GGUF_ARCH`).
    """
    import gguf

    hf_dir, out_file = Path(hf_dir), Path(out_file)
    config = json.loads((hf_dir / "config.json").read_text())
    arch = GGUF_ARCH.get(config["architectures"][0])
    if arch is None:
        raise ValueError(f"cannot write {config['architectures'][0]} as GGUF (supported: {sorted(GGUF_ARCH)})")
    _warn_llama_cpp_differs(config, arch)
    writer = gguf.GGUFWriter(str(out_file), arch)
    _write_hparams(writer, config, qtype, arch)
    _write_tokenizer(writer, hf_dir, config["vocab_size"])
    for name, value in _gguf_tensors(hf_dir, config, arch):
        quantized = value.ndim >= 2 and not name.endswith(".ffn_gate_inp.weight")
        data, raw_dtype = encode(name, value, qtype if quantized else "F32")
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def _gguf_tensors(hf_dir: Path, config: dict, arch: str):
    """(GGUF name, float32 numpy value) of every tensor llama.cpp takes, sorted by HF name, Q/K permuted."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    wrote_output = False
    for hf, value in _hf_tensors(hf_dir, config):
        name, layer = gguf_name(hf), _LAYER.match(hf)
        if name is None or (layer is not None and int(layer.group(1)) >= config["num_hidden_layers"]):
            continue
        if arch == "deepseek2":
            yield from deepseek_tensors(name, value, config)
            continue
        if arch == "llama" and ".attn_q." in name:
            value = llama_cpp_permute(value, heads)
        elif arch == "llama" and ".attn_k." in name:
            value = llama_cpp_permute(value, kv_heads)
        elif name.endswith(".ffn_gate_inp_shexp.weight"):
            value = value.reshape(-1)  # llama.cpp's shape is {n_embd}; HF's [1, H]
        wrote_output |= name == "output.weight"  # lm_head sorts before model.embed_tokens
        if name == "token_embd.weight" and arch == "qwen2moe" and not wrote_output:
            yield "output.weight", value.copy()  # llama.cpp's qwen2moe requires an output tensor, tied or not
        yield name, value


def _hf_tensors(hf_dir: Path, config: dict):
    """(HF name, float32 numpy value) of the checkpoint sorted by name, each layer's experts stacked as
    ``...experts.{gate,up,down}_proj`` (``[E, I, H]`` / ``[E, H, I]``): per-expert tensors (Mixtral's ``w1`` / ``w3``
    / ``w2`` are gate / up / down) once all of a projection's are read, a fused ``experts.gate_up_proj`` split in
    halves (gate first, as transformers fuses them and llama.cpp's converter splits them)."""
    n_experts = int(config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts") or 0)
    pending: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for hf, tensor in sorted(SafetensorsCheckpoint(hf_dir).tensors(), key=lambda item: item[0]):
        value = tensor.float().numpy()
        expert, fused = _EXPERT.match(hf), _FUSED_GATE_UP.match(hf)
        if expert is not None:
            layer, index, proj = expert.groups()
            proj = _MIXTRAL_EXPERT.get(proj, proj)
            group = pending.setdefault((layer, proj), {})
            group[int(index)] = value
            if len(group) == n_experts:
                del pending[(layer, proj)]
                yield f"model.layers.{layer}.mlp.experts.{proj}", np.stack([group[e] for e in range(n_experts)])
        elif fused is not None:
            half = value.shape[1] // 2
            yield f"model.layers.{fused.group(1)}.mlp.experts.gate_proj", value[:, :half]
            yield f"model.layers.{fused.group(1)}.mlp.experts.up_proj", value[:, half:]
        else:
            yield hf, value
    if pending:
        raise ValueError(f"{hf_dir}: layer/projection {sorted(pending)} lacks some of its {n_experts} experts")


def _warn_llama_cpp_differs(config: dict, arch: str) -> None:
    """Say when llama.cpp would compute another model than ``config`` from the file (sglite and transformers read
    the file as llama.cpp does, so they agree with each other, not with the HF checkpoint)."""
    name = config["architectures"][0]
    if arch in _LLAMA_CPP_NORM_TOPK and bool(config.get("norm_topk_prob")) != _LLAMA_CPP_NORM_TOPK[arch]:
        logger.warning("%s has norm_topk_prob=%s but llama.cpp's %s always uses %s: the GGUF model routes "
                       "differently", name, config.get("norm_topk_prob"), arch, _LLAMA_CPP_NORM_TOPK[arch])
    if arch in _LLAMA_CPP_NORM_TOPK and (config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) > 1):
        logger.warning("%s has dense layers between sparse ones, which llama.cpp's %s cannot run (sglite can)",
                       name, arch)
    if arch == "deepseek2":
        warn_deepseek_differs(config)


def _write_hparams(writer: Any, config: dict, qtype: str, arch: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    if arch == "deepseek2":
        write_deepseek_hparams(writer, config)
    else:
        writer.add_head_count_kv(config.get("num_key_value_heads", heads))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        _write_expert_hparams(writer, config)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_vocab_size(config["vocab_size"])
    name = "ALL_F32" if qtype == "F32" else f"MOSTLY_{qtype}"
    writer.add_file_type(gguf.LlamaFileType.__members__.get(name, gguf.LlamaFileType.GUESSED))


def _write_expert_hparams(writer: Any, config: dict) -> None:
    """Expert count, top-k and widths, as convert_hf_to_gguf.py writes them (Mixtral: count and top-k only; its
    experts are ``feed_forward_length`` wide)."""
    experts = config.get("num_experts") or config.get("num_local_experts")
    if not experts:
        return
    writer.add_expert_count(experts)
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if config.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def _write_tokenizer(writer: Any, hf_dir: Path, vocab_size: int) -> None:
    """A ``gpt2`` vocabulary of ``vocab_size`` tokens (ids the tokenizer lacks become unused ``[PADn]``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    by_id = {i: t for t, i in vocab.items()}
    special = {t["id"] for t in spec["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([_TOKEN_CONTROL if i in special else _TOKEN_NORMAL if i in by_id else _TOKEN_UNUSED
                            for i in range(vocab_size)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_bos_token_id(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
    ids = tok("a").input_ids
    writer.add_add_bos_token(tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def cached_gguf(hf_dir: str | Path, qtype: str = "F32", cache_dir: str | Path | None = None) -> Path:
    """A GGUF of ``hf_dir`` written once and kept in ``cache_dir`` (default ``$SGLITE_CACHE/gguf``), keyed by the
    folder's resolved path, the size and modification time of its files, ``qtype`` and `WRITER_VERSION`. The file
    is written under a temporary name and renamed, so a concurrent or interrupted writer never leaves half a file."""
    hf_dir = Path(hf_dir).resolve()
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    out = root / f"{hf_dir.name}-{_folder_key(hf_dir, qtype)}.{qtype.lower()}.gguf"
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, suffix=".gguf.tmp")
    os.close(fd)
    try:
        write_gguf(hf_dir, tmp, qtype)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _folder_key(hf_dir: Path, qtype: str) -> str:
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in hf_dir.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps([str(hf_dir), stats, qtype, WRITER_VERSION]).encode()).hexdigest()[:16]


def _default_cache_dir() -> Path:
    root = os.environ.get("SGLITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sglite")
    return Path(root) / "gguf"
