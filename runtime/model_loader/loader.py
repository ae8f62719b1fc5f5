"""Build a model from a `Checkpoint` (safetensors or GGUF) or from its config alone with random weights
(``load_format="dummy"``, for benchmarks at real shapes).

Loading is generic: the model maps each checkpoint name to a parameter and a shard (`DecoderLM.parameter_of`),
and the layer owning that parameter copies its slice (its ``weight_loader``; replicated layers take the whole
tensor). Every ``(parameter, shard)`` a layer declares (``shard_ids``) must be filled exactly by the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ..tp.distributed import TPInfo
from ..errors import ConfigError
from ..layers import LinearBase, ShardId, VocabParallelEmbedding, default_weight_loader
from .checkpoint import Checkpoint
from ..models.decoder import DecoderLM
from ..models.registry import model_class

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "dummy")


def load_model(
    checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device, load_format: str = "auto", seed: int = 0,
    tp: TPInfo = TPInfo(),
) -> DecoderLM:
    """Return the model (rank ``tp``'s shard) in eval mode on ``device`` in ``dtype``; every parameter written
    (no uninitialised memory)."""
    if load_format not in LOAD_FORMATS:
        raise ConfigError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    cfg = checkpoint.model_config
    with torch.device(device), _default_dtype(dtype):
        model = cast_model(model_class(cfg.architecture)(cfg, tp), dtype)
    if load_format == "dummy":
        _init_dummy(model, seed)
    else:
        with tqdm(total=checkpoint.num_tensors(), desc="Loading weights", unit="tensor", disable=None) as bar:
            filled = load_weights(model, _counted(checkpoint.tensor_slices(), bar))
        _check_complete(model, filled, str(checkpoint.path))
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.quant_method.process_weights_after_loading(module)
    return model.eval()


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Floating parameters are created in ``dtype``: built in float32 and cast after, a bf16 model needs three times
    its weights' memory at once (Qwen3-30B-A3B's 61 GB ran an H100 out of memory at construction, 2026-12-07).
    torch's default dtype is process state: restored on the way out, and models are built on one thread."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model.to(dtype)`` except for parameters that keep their stored dtype (``keeps_dtype``: quantized
    weights, their scales): ``Module.to`` would turn float8 weights into ``dtype`` too."""
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and param.is_floating_point() and not getattr(param, "keeps_dtype", False):
                param.data = param.data.to(dtype)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)
    return model


def load_weights(model: DecoderLM, tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Hand every ``(checkpoint name, full tensor)`` to the layer that owns its parameter (a `LazyTensor` is read
    only where the layer's shard lies); return what was filled
    (`load_key` of each parameter and shard). Tensors the model has no parameter for are logged and skipped.

    Raises:
        ConfigError: a tensor's shape does not fit its parameter (the message names the tensor).
    """
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for name, tensor in tensors:
        target = model.parameter_of(name)
        if target is None:
            continue
        param_name, shard_id = target
        param = params.get(param_name)
        if param is None:
            logger.warning("checkpoint tensor %s is not used by %s", name, model.cfg.architecture)
            continue
        loader = getattr(_owner(model, param_name), "weight_loader", default_weight_loader)
        try:
            shards = loader(param, tensor, shard_id)
        except ValueError as exc:
            raise ConfigError(f"checkpoint tensor {name} {exc}") from None
        # A loader returns the shards it filled when one tensor fills several (stacked experts); else None.
        filled.update(load_key(param_name, s) for s in (shards if shards is not None else (shard_id,)))
    return filled


def expected_loads(model: DecoderLM) -> set[str]:
    """The `load_key` of every parameter and shard the model's layers take from a checkpoint: a layer declares
    them per parameter (``param_shard_ids``, experts) or for all its parameters (``shard_ids``, fused linears)."""
    keys = set()
    for name, _ in model.named_parameters():
        owner, leaf = _owner(model, name), name.rpartition(".")[2]
        per_param = getattr(owner, "param_shard_ids", {})
        keys.update(load_key(name, s) for s in per_param.get(leaf, getattr(owner, "shard_ids", (None,))))
    return keys


def load_key(param_name: str, shard_id: ShardId) -> str:
    """``param`` for a whole parameter, ``param#shard`` for one shard of a fused one."""
    return param_name if shard_id is None else f"{param_name}#{shard_id}"


def _owner(model: DecoderLM, param_name: str) -> torch.nn.Module:
    return model.get_submodule(param_name.rpartition(".")[0])


def _counted(tensors: Iterable[tuple[str, torch.Tensor]], bar: tqdm) -> Iterable[tuple[str, torch.Tensor]]:
    for item in tensors:
        yield item
        bar.update(1)


def _check_complete(model: DecoderLM, filled: set[str], source: str) -> None:
    missing = sorted(expected_loads(model) - filled)
    if missing:
        shown = ", ".join(m.replace("#", " shard ") for m in missing[:8])
        raise ConfigError(
            f"checkpoint {source} lacks {len(missing)} tensor(s) that {model.cfg.architecture} needs: "
            f"{shown}" + (" ..." if len(missing) > 8 else "")
        )


def _init_dummy(model: DecoderLM, seed: int) -> None:
    """Random weights with a scale that keeps activations finite through many layers."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in tqdm(list(model.named_parameters()), desc="Initialising dummy weights", disable=None):
        if getattr(param, "keeps_dtype", False):
            continue  # quantized: its method draws it below
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith(".bias"):
            param.data.zero_()
        else:
            param.data.uniform_(-0.02, 0.02, generator=gen)
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.quant_method.init_dummy(module, gen)
        elif isinstance(module, VocabParallelEmbedding):
            module.init_dummy(gen)  # a GGUF table in blocks
