"""The Xinference custom-LLM registration of a local checkpoint: a HF folder (read off its ``config.json``) or a
GGUF file (read off its header: architecture, context length, file type), as a ``ggufv2`` spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..runtime.model_loader.gguf_header import hf_architecture, read_metadata_value


def custom_llm_family(
    model_path: str | Path, name: str, description: str | None = None, chat_template: bool = False
) -> dict[str, Any]:
    """The JSON body of ``POST /v1/model_registrations/LLM`` (as ``{"model": json.dumps(family)}``) for
    ``model_path``: a HF checkpoint folder (``pytorch`` format) or a ``.gguf`` file (``ggufv2`` format).

    Without ``chat_template`` no template is registered, so sglite uses the checkpoint's own. With it, the
    checkpoint's own template is copied into the registration (the same text, so the same rendering), where
    clients can read it (``GET /v1/model_registrations/LLM/{name}``): ``xinf_sglang.lang.OpenAI`` renders a
    program's roles with it."""
    path = Path(model_path)
    archs, context_length, spec = _gguf_spec(path) if path.suffix == ".gguf" else _folder_spec(path)
    family: dict[str, Any] = {
        "version": 2,
        "model_name": name,
        "model_lang": ["en"],
        "model_ability": ["generate", "chat"],
        "model_family": name,
        "architectures": archs,
        "context_length": context_length,
        "model_specs": [{"model_size_in_billions": "0_001", **spec}],
    }
    if description:
        family["model_description"] = description
    if chat_template:
        template = _checkpoint_template(path)
        if template is None:
            raise ValueError(f"{path} ships no chat template to register")
        family["chat_template"] = template
    return family


def _checkpoint_template(path: Path) -> str | None:
    """The chat template a checkpoint ships: GGUF metadata, or a HF folder's chat_template.jinja /
    tokenizer_config.json."""
    if path.suffix == ".gguf":
        return read_metadata_value(path, "tokenizer.chat_template")
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    config = path / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def _folder_spec(model_dir: Path) -> tuple[list[str], int, dict[str, Any]]:
    config = json.loads((model_dir / "config.json").read_text())
    fmt, quantization = _quantized_format(config.get("quantization_config") or {})
    spec = {"model_format": fmt, "quantization": quantization, "model_uri": str(model_dir)}
    return config["architectures"], int(config.get("max_position_embeddings", 2048)), spec


def _quantized_format(quant: dict[str, Any]) -> tuple[str, str]:
    """Xinference's ``(model_format, quantization)`` for a folder's ``quantization_config``, spelled as its
    catalogue spells them (``awq`` / ``Int4``, ``gptq`` / ``Int8``, ``fp8`` / ``FP8``); an unquantized folder is
    ``pytorch`` / ``none``, anything else ``pytorch`` / its ``quant_method`` (matching then says why not)."""
    method = str(quant.get("quant_method", "")).lower()
    if method in ("awq", "gptq"):
        return method, f"Int{int(quant.get('bits', quant.get('w_bit', 4)))}"
    if method == "fp8" or (method == "compressed-tensors" and quant.get("format") == "float-quantized"):
        return "fp8", "FP8"
    return "pytorch", method or "none"


def _gguf_spec(gguf: Path) -> tuple[list[str], int, dict[str, Any]]:
    from gguf import LlamaFileType

    arch = hf_architecture(gguf)
    if arch is None:
        raise ValueError(f"{gguf}: sglite does not serve this GGUF architecture")
    gguf_arch = read_metadata_value(gguf, "general.architecture")
    context = read_metadata_value(gguf, f"{gguf_arch}.context_length") or 2048
    file_type = read_metadata_value(gguf, "general.file_type")
    quantization = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "F32"
    spec = {
        "model_format": "ggufv2",
        "quantization": quantization,
        "model_file_name_template": gguf.name,
        "model_uri": str(gguf.parent),
    }
    return [arch], int(context), spec
