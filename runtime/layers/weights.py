"""What the layers share for weights: uninitialised parameters and the checked copy of a checkpoint tensor's
slice into a parameter (the body of every layer's ``weight_loader``)."""

from __future__ import annotations

import torch
from torch import nn

ShardId = int | str | None
"""Which part of a fused parameter a checkpoint tensor fills: ``"q"``/``"k"``/``"v"`` of a QKV projection, the
index of a merged projection (gate 0, up 1), None for a parameter filled by one tensor."""


def empty_parameter(*shape: int) -> nn.Parameter:
    """An uninitialised, frozen parameter: the loader (or the dummy initialiser) writes every one, and skipping
    ``nn.Linear``'s random init saves minutes on 8B models."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def load_slice(dst: torch.Tensor, loaded: torch.Tensor, dim: int, start: int, full: int) -> None:
    """Copy ``loaded.narrow(dim, start, dst.shape[dim])`` into ``dst``.

    ``loaded`` is a whole checkpoint tensor: ``full`` long along ``dim`` and shaped like ``dst`` elsewhere.

    Raises:
        ValueError: ``loaded`` has another shape (the message states both).
    """
    expected = list(dst.shape)
    expected[dim] = full
    if list(loaded.shape) != expected:
        raise ValueError(f"has shape {tuple(loaded.shape)}, the model expects {tuple(expected)}")
    dst.copy_(loaded.narrow(dim, start, dst.shape[dim]))


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
    """The loader of a replicated parameter (norms): the whole tensor, shape checked."""
    load_slice(param.data, loaded, 0, 0, param.shape[0])
