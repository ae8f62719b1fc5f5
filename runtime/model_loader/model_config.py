"""The model facts the runtime needs, read from a checkpoint's ``config.json``.

Both spellings of the rotary settings are read: ``rope_theta`` / ``rope_scaling`` (transformers 4.x) and
``rope_parameters`` (transformers 5.x).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..models.registry import SUPPORTED_ARCHITECTURES, supported_architecture
from .mla_config import MLAConfig, read_mla
from .moe_config import MoEConfig, read_moe
from .quant_config import QuantizationConfig, read_quantization

if TYPE_CHECKING:
    from .gguf_quant import GGUFQuantization

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "factors", "yarn")
# "factors": per-frequency divisors given explicitly (GGUF's rope_freqs tensor, how llama.cpp stores Llama 3.1)


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3
    freq_factors: tuple[float, ...] | None = None  # factors: inv_freq[i] / freq_factors[i]
    beta_fast: float = 32.0  # yarn: the ramp between extrapolated and interpolated frequencies
    beta_slow: float = 1.0  # yarn
    mscale: float = 0.0  # yarn (DeepSeek): cos/sin scaled by get_mscale(factor, mscale) / get_mscale(.., all_dim)
    mscale_all_dim: float = 0.0  # yarn (DeepSeek): also the softmax scale's mscale**2 (runtime/layers/rope.py)
    attention_factor: float | None = None  # yarn: the cos/sin scale, when the config states it

    def cos_sin_scale(self) -> float:
        """The factor YaRN multiplies cos and sin by (1 for the other rope types), as HF computes it."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _get_mscale(self.factor, self.mscale) / _get_mscale(self.factor, self.mscale_all_dim)
        return _get_mscale(self.factor)

    def softmax_mscale(self) -> float:
        """DeepSeek's extra softmax scale under a scaled rope: ``get_mscale(factor, mscale_all_dim) ** 2``."""
        if self.rope_type == "default" or not self.mscale_all_dim:
            return 1.0
        return _get_mscale(self.factor, self.mscale_all_dim) ** 2


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v/o biases (a family may add q/k/v biases of its own: Qwen2)
    qkv_bias: bool  # q/k/v biases only (Qwen2-MoE's ``qkv_bias``)
    mlp_bias: bool
    rope: RopeConfig
    torch_dtype: str | None  # the checkpoint's dtype ("bfloat16", ...), None if unstated
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    moe: MoEConfig | None = None  # the experts of a mixture-of-experts model; None: dense
    # quantization_config (or a GGUF's kept linears): how the linears are stored; None: dense
    quantization: QuantizationConfig | GGUFQuantization | None = None
    mla: MLAConfig | None = None  # multi-head latent attention (DeepSeek); None: multi-head / grouped-query

    @property
    def attention_scale(self) -> float:
        """The softmax scale: ``1/sqrt(head_dim)``, for MLA ``1/sqrt(qk_nope + qk_rope)`` times YaRN's mscale**2."""
        if self.mla is None:
            return self.head_dim**-0.5
        return self.mla.qk_head_dim**-0.5 * self.rope.softmax_mscale()

    @classmethod
    def from_dir(cls, model_path: str | Path) -> "ModelConfig":
        path = Path(model_path) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_path!s}: expected a Hugging Face checkpoint folder")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = supported_architecture(archs)
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"sglite supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        mla = read_mla(arch, cfg)
        eos = cfg.get("eos_token_id")
        sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            # MLA rotates only the rope part of each head (HF sets its head_dim so; the Hub's configs omit it)
            head_dim=mla.qk_rope_head_dim if mla else int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            qkv_bias=bool(cfg.get("qkv_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope=_read_rope(cfg),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            sliding_window=int(sliding) if sliding else None,
            eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
            moe=read_moe(arch, cfg),
            mla=mla,
            quantization=read_quantization(cfg, moe=read_moe(arch, cfg) is not None),
        )


def _read_rope(cfg: dict[str, Any]) -> RopeConfig:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"unsupported rope type {rope_type!r}; sglite supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
        freq_factors=tuple(float(f) for f in merged["freq_factors"]) if rope_type == "factors" else None,
        beta_fast=float(merged.get("beta_fast") or 32.0),
        beta_slow=float(merged.get("beta_slow") or 1.0),
        mscale=float(merged.get("mscale") or 0.0),
        mscale_all_dim=float(merged.get("mscale_all_dim") or 0.0),
        attention_factor=float(merged["attention_factor"]) if merged.get("attention_factor") is not None else None,
    )
