"""Build a model from a checkpoint folder (safetensors, single file or sharded with an index) or from its
``config.json`` alone with random weights (``load_format="dummy"``, for benchmarks at real shapes)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..errors import ConfigError
from .config import ModelConfig
from .decoder import DecoderLM

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "dummy")


def load_model(
    model_path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, load_format: str = "auto",
    seed: int = 0,
) -> DecoderLM:
    """Return the model in eval mode on ``device`` in ``dtype``; every parameter written (no uninitialised memory)."""
    if load_format not in LOAD_FORMATS:
        raise ConfigError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    with torch.device(device):
        model = DecoderLM(cfg).to(dtype)
    model.inv_freq = model.inv_freq.float()  # rope frequencies stay float32 whatever the model dtype
    if load_format == "dummy":
        _init_dummy(model, seed)
    else:
        _load_safetensors(model, Path(model_path))
    return model.eval()


def _checkpoint_files(model_path: Path) -> list[Path]:
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_path / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        others = [p.name for p in model_path.glob("*.bin")] + [p.name for p in model_path.glob("*.gguf")]
        hint = f" (found {', '.join(others[:3])}: only safetensors is supported)" if others else ""
        raise ConfigError(f"no *.safetensors weights in {model_path}{hint}")
    return files


def _load_safetensors(model: DecoderLM, model_path: Path) -> None:
    params = dict(model.named_parameters())
    expected = model.expected_weights()
    filled: set[str] = set()
    files = _checkpoint_files(model_path)
    names_per_file = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names_per_file.append(list(f.keys()))
    total = sum(len(n) for n in names_per_file)
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=None) as bar:
        for path, names in zip(files, names_per_file):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    try:
                        filled.update(model.load_weight(name, f.get_tensor(name), params))
                    except KeyError:
                        logger.warning("checkpoint tensor %s is not used by %s", name, model.cfg.architecture)
                    bar.update(1)
    missing = sorted(expected - filled)
    if missing:
        shown = ", ".join(m.replace("#", " shard ") for m in missing[:8])
        raise ConfigError(
            f"checkpoint {model_path} lacks {len(missing)} tensor(s) that {model.cfg.architecture} needs: {shown}"
            + (" ..." if len(missing) > 8 else "")
        )


def _init_dummy(model: DecoderLM, seed: int) -> None:
    """Random weights with a scale that keeps activations finite through many layers."""
    gen = torch.Generator(device=model.inv_freq.device).manual_seed(seed)
    for name, param in tqdm(list(model.named_parameters()), desc="Initialising dummy weights", disable=None):
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith(".bias"):
            param.data.zero_()
        else:
            param.data.uniform_(-0.02, 0.02, generator=gen)
