"""Write quantized checkpoints from a Hugging Face float checkpoint, in each format's exact Hub layout, and the
float checkpoint of the same weights dequantized by the reference (what HF transformers runs as ground truth).

Formats (`FORMATS`; the tensor layouts are defined in ``kernels/quant/reference.py``):

- ``fp8_block``: transformers / DeepSeek / Qwen3-FP8 ``quant_method: fp8`` with ``weight_block_size``
  (``weight`` float8_e4m3fn + ``weight_scale_inv`` float32 per block);
- ``fp8_tensor``: ``quant_method: fp8`` without a block size (one float32 ``weight_scale`` per projection);
- ``fp8_channel``: llm-compressor's ``compressed-tensors`` FP8-dynamic (``weight_scale [out, 1]`` bfloat16);
- ``awq``: AutoAWQ's GEMM version (``qweight`` / ``qzeros`` int32 in AWQ's interleaved order, float16 ``scales``);
- ``gptq``: AutoGPTQ's v1 format, 4 or 8 bits, ``sym`` either way, ``desc_act`` with a shuffled ``g_idx``.

Only the decoder layers' attention and MLP projections are quantized (as the real exports do); ``skip`` names
modules to leave dense (and lists them in the config's ``modules_to_not_convert`` / ``ignore``). Used by the tests.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from xinf_sglang.kernels.quant import (
    act_order_g_idx,
    dequantize_awq,
    dequantize_fp8_block,
    dequantize_fp8_channel,
    dequantize_gptq,
    pack_awq,
    pack_gptq,
    quantize_fp8_block,
    quantize_fp8_channel,
    quantize_int,
)

Format = Literal["fp8_block", "fp8_tensor", "fp8_channel", "awq", "gptq"]
FORMATS: tuple[str, ...] = ("fp8_block", "fp8_tensor", "fp8_channel", "awq", "gptq")
PROJECTION = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")


@dataclass(frozen=True)
class QuantSpec:
    """What to write: the format and its settings (those a format does not use are ignored)."""

    fmt: Format
    group_size: int = 128  # awq / gptq
    bits: int = 4  # gptq
    sym: bool = True  # gptq (awq: zero points drawn asymmetric unless sym)
    desc_act: bool = False  # gptq
    block: tuple[int, int] = (128, 128)  # fp8_block
    skip: tuple[str, ...] = ()  # checkpoint module names left dense


def write_quantized(src: str | Path, dst: str | Path, spec: QuantSpec, seed: int = 0) -> Path:
    """Quantize checkpoint folder ``src`` into ``dst`` (tokenizer and generation config copied)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model"):
            shutil.copy(f, dst / f.name)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    orders: dict[str, torch.Tensor] = {}  # activation order per input: q/k/v (gate/up) share their input's
    for name, value in load_file(src / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if PROJECTION.match(name) and module not in spec.skip:
            key = re.sub(r"\.(q|k|v)_proj$", ".qkv", re.sub(r"\.(gate|up)_proj$", ".gate_up", module))
            if spec.desc_act and key not in orders:
                orders[key] = act_order_g_idx(value.shape[1], spec.group_size, gen)
            tensors = _quantize(value, spec, orders.get(key))
            out.update({f"{module}.{k}": v.contiguous() for k, v in tensors.items()})
        else:
            out[name] = value
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(spec)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def _quantize(w: torch.Tensor, spec: QuantSpec, g_idx: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors (suffixes after the module name) of one ``[out, in]`` weight; ``g_idx``: GPTQ's
    activation order (``desc_act``)."""
    if spec.fmt == "fp8_block":
        q, scale = quantize_fp8_block(w, spec.block)
        return {"weight": q, "weight_scale_inv": scale}
    if spec.fmt == "fp8_tensor":
        q, scale = quantize_fp8_channel(w)  # one scale for the whole tensor: the largest channel's
        top = scale.max()
        return {"weight": (w.float() / top).clamp(-448, 448).to(q.dtype), "weight_scale": top.reshape(())}
    if spec.fmt == "fp8_channel":
        q, scale = quantize_fp8_channel(w)
        return {"weight": q, "weight_scale": scale.to(torch.bfloat16)[:, None]}
    bits = 4 if spec.fmt == "awq" else spec.bits
    q, zeros, scales = quantize_int(w, bits, spec.group_size, spec.sym, g_idx)
    if spec.fmt == "awq":
        qweight, qzeros = pack_awq(q, zeros)
        return {"qweight": qweight, "qzeros": qzeros, "scales": scales.half()}
    qweight, qzeros = pack_gptq(q, zeros, bits)
    group = spec.group_size if spec.group_size > 0 else w.shape[1]
    if g_idx is None:
        g_idx = (torch.arange(w.shape[1]) // group).to(torch.int32)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.half(), "g_idx": g_idx.clone()}


def quantization_config(spec: QuantSpec) -> dict[str, Any]:
    """The ``quantization_config`` the exporting tool writes for ``spec``."""
    skip = list(spec.skip) or None
    if spec.fmt == "fp8_block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(spec.block), "modules_to_not_convert": skip}
    if spec.fmt == "fp8_tensor":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": skip}
    if spec.fmt == "fp8_channel":
        scheme = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "channel"}
        activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme,
                                              "input_activations": activations}},
                "ignore": ["lm_head", *spec.skip], "kv_cache_scheme": None}
    if spec.fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": spec.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": skip}
    return {"quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size, "desc_act": spec.desc_act,
            "sym": spec.sym, "checkpoint_format": "gptq", "damp_percent": 0.01, "static_groups": False,
            "true_sequential": True, "modules_to_not_convert": skip}


def write_dequantized(quantized: str | Path, dst: str | Path) -> Path:
    """The float32 checkpoint of ``quantized``'s weights dequantized by the references (no quantization config):
    the model HF transformers runs as the ground truth."""
    quantized, dst = Path(quantized), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in quantized.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.startswith("model"):
            shutil.copy(f, dst / f.name)
    config = json.loads((quantized / "config.json").read_text())
    q = config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(quantized / "model.safetensors")
    modules = {n.rpartition(".")[0] for n in tensors if n.endswith((".qweight", ".weight_scale", ".weight_scale_inv"))}
    stored = ("weight", "weight_scale", "weight_scale_inv", "qweight", "qzeros", "scales", "g_idx")
    out = {n: t for n, t in tensors.items() if n.rpartition(".")[0] not in modules or not n.endswith(stored)}
    for m in sorted(modules):
        out[f"{m}.weight"] = _dequantize({k.rpartition(".")[2]: t for k, t in tensors.items()
                                          if k.rpartition(".")[0] == m}, q)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _dequantize(t: dict[str, torch.Tensor], q: dict[str, Any]) -> torch.Tensor:
    method = q["quant_method"]
    if "weight_scale_inv" in t:
        return dequantize_fp8_block(t["weight"], t["weight_scale_inv"], tuple(q["weight_block_size"]))
    if method in ("fp8", "compressed-tensors"):
        return dequantize_fp8_channel(t["weight"], t["weight_scale"])
    if method == "awq":
        return dequantize_awq(t["qweight"], t["scales"], t["qzeros"], q["group_size"])
    g_idx = t["g_idx"] if q["desc_act"] else None
    return dequantize_gptq(t["qweight"], t["scales"], t["qzeros"], g_idx, q["group_size"], q["bits"])
