"""The Xinference custom-LLM registration of a local checkpoint: a HF folder (read off its ``config.json``) or a
GGUF file (read off its header: architecture, context length, file type), as a ``ggufv2`` spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .runtime.models.gguf_header import hf_architecture, read_metadata_value


def custom_llm_family(model_path: str | Path, name: str, description: str | None = None) -> dict[str, Any]:
    """The JSON body of ``POST /v1/model_registrations/LLM`` (as ``{"model": json.dumps(family)}``) for
    ``model_path``: a HF checkpoint folder (``pytorch`` format) or a ``.gguf`` file (``ggufv2`` format). No chat
    template is set, so sglite uses the checkpoint's own."""
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
    return family


def _folder_spec(model_dir: Path) -> tuple[list[str], int, dict[str, Any]]:
    config = json.loads((model_dir / "config.json").read_text())
    spec = {"model_format": "pytorch", "quantization": "none", "model_uri": str(model_dir)}
    return config["architectures"], int(config.get("max_position_embeddings", 2048)), spec


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
