"""How many ranks a config asks for, and whether a model and a machine can run that many."""

from __future__ import annotations

import torch

from ..config import EngineConfig
from ..errors import ConfigError
from ..model_loader.model_config import ModelConfig

__all__ = ["check_tp_size", "resolve_tp_size"]


def resolve_tp_size(config: EngineConfig, device: torch.device) -> int:
    """``config.tp_size``, or by default every GPU this process sees (Xinference's ``--n-gpu`` / ``--gpu-idx`` set
    ``CUDA_VISIBLE_DEVICES`` for the model process); 1 on CPU.

    Raises:
        ConfigError: more ranks than visible GPUs.
    """
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    size = config.tp_size or max(gpus, 1)
    if device.type == "cuda" and size > gpus:
        raise ConfigError(f"tp_size={size} needs {size} GPUs but this process sees {gpus} "
                          f"(CUDA_VISIBLE_DEVICES); use tp_size <= {gpus}, or give the model more GPUs "
                          "(Xinference: --n-gpu / --gpu-idx)")
    return size


def check_tp_size(mc: ModelConfig, size: int) -> None:
    """Raise ``ConfigError`` unless every sharded dimension of ``mc`` splits over ``size`` ranks; the message
    lists the sizes that would."""
    if size == 1:
        return
    problems = _problems(mc, size)
    if problems:
        working = [n for n in range(1, min(mc.num_heads, 64) + 1) if not _problems(mc, n)]
        raise ConfigError(f"tp_size={size} does not fit {mc.architecture}: {'; '.join(problems)}. "
                          f"Sizes that work for this model: {', '.join(map(str, working))}")


def _problems(mc: ModelConfig, size: int) -> list[str]:
    dims = [
        (mc.num_heads, "num_attention_heads"),
        (mc.intermediate_size, "intermediate_size"),
        (mc.vocab_size, "vocab_size"),
    ]
    if mc.moe is not None:  # every expert is split along its intermediate dimension, the shared one too
        dims.append((mc.moe.intermediate_size, "the experts' intermediate size"))
        if mc.moe.shared_expert_intermediate_size:
            dims.append((mc.moe.shared_expert_intermediate_size, "shared_expert_intermediate_size"))
    found = [f"{what} ({n}) is not divisible by {size}" for n, what in dims if n % size]
    kv = mc.num_kv_heads
    if kv % size and size % kv:
        found.append(f"num_key_value_heads ({kv}) neither divides nor is a multiple of {size}")
    return found

