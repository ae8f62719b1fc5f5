"""Rotary inverse frequencies for the rope variants sglite supports (default, linear, llama3, factors, yarn); YaRN's
scales of cos/sin and of the softmax are `RopeConfig` methods (torch-free)."""

from __future__ import annotations

import math

import torch

from ..model_loader.model_config import RopeConfig


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """float32 ``[head_dim // 2]`` inverse frequencies, computed exactly as HF computes them (bit-parity)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    if rope.rope_type == "yarn":
        return _yarn_scale(head_dim, rope)
    if rope.rope_type == "factors":
        factors = torch.tensor(rope.freq_factors, dtype=torch.float32)
        if factors.numel() != inv_freq.numel():
            raise ValueError(f"rope freq_factors has {factors.numel()} entries; head_dim {head_dim} needs "
                             f"{inv_freq.numel()}")
        return inv_freq / factors
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth blend in between."""
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn_scale(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """YaRN: interpolated (``/ factor``) frequencies below the ramp, extrapolated ones above it, linear between
    the dimensions that rotate ``beta_slow`` and ``beta_fast`` times over the original context (truncated)."""
    def correction_dim(rotations: float) -> float:
        old_len = rope.original_max_position_embeddings
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), head_dim - 1)
    pos_freqs = rope.theta ** (torch.arange(0, head_dim, 2).to(dtype=torch.float) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rope.factor * pos_freqs)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / ((high + 0.001 if low == high
                                                                                   else high) - low), 0, 1)
    keep = 1 - ramp  # share of the extrapolated (original) frequency
    return interpolation * (1 - keep) + extrapolation * keep
