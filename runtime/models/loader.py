"""Build a model from a `Checkpoint` (safetensors or GGUF) or from its config alone with random weights
(``load_format="dummy"``, for benchmarks at real shapes)."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from .checkpoint import Checkpoint
from .decoder import DecoderLM

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "dummy")


def load_model(
    checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device, load_format: str = "auto", seed: int = 0,
) -> DecoderLM:
    """Return the model in eval mode on ``device`` in ``dtype``; every parameter written (no uninitialised memory)."""
    if load_format not in LOAD_FORMATS:
        raise ConfigError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    with torch.device(device):
        model = DecoderLM(checkpoint.model_config).to(dtype)
    model.inv_freq = model.inv_freq.float()  # rope frequencies stay float32 whatever the model dtype
    if load_format == "dummy":
        _init_dummy(model, seed)
    else:
        _load_weights(model, checkpoint)
    return model.eval()


def _load_weights(model: DecoderLM, checkpoint: Checkpoint) -> None:
    params = dict(model.named_parameters())
    filled: set[str] = set()
    with tqdm(total=checkpoint.num_tensors(), desc="Loading weights", unit="tensor", disable=None) as bar:
        for name, tensor in checkpoint.tensors():
            try:
                filled.update(model.load_weight(name, tensor, params))
            except KeyError:
                logger.warning("checkpoint tensor %s is not used by %s", name, model.cfg.architecture)
            bar.update(1)
    missing = sorted(model.expected_weights() - filled)
    if missing:
        shown = ", ".join(m.replace("#", " shard ") for m in missing[:8])
        raise ConfigError(
            f"checkpoint {checkpoint.path} lacks {len(missing)} tensor(s) that {model.cfg.architecture} needs: "
            f"{shown}" + (" ..." if len(missing) > 8 else "")
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
