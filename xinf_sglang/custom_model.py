"""The Xinference custom-LLM registration of a local checkpoint folder, read off its ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def custom_llm_family(model_dir: str | Path, name: str, description: str | None = None) -> dict[str, Any]:
    """The JSON body of ``POST /v1/model_registrations/LLM`` (as ``{"model": json.dumps(family)}``) for
    ``model_dir``: its architectures and context length come from its ``config.json``; no chat template is set,
    so sglite uses the checkpoint's own."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    family: dict[str, Any] = {
        "version": 2,
        "model_name": name,
        "model_lang": ["en"],
        "model_ability": ["generate", "chat"],
        "model_family": name,
        "architectures": config["architectures"],
        "context_length": int(config.get("max_position_embeddings", 2048)),
        "model_specs": [
            {
                "model_format": "pytorch",
                "model_size_in_billions": "0_001",
                "quantization": "none",
                "model_uri": str(model_dir),
            }
        ],
    }
    if description:
        family["model_description"] = description
    return family
