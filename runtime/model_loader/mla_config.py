"""Multi-head latent attention facts of a DeepSeek ``config.json`` (`MLAConfig`).

Per token and layer the cache keeps the normalised latent (``kv_lora_rank``) and the rotary key
(``qk_rope_head_dim``), shared by all heads; queries are ``qk_nope_head_dim + qk_rope_head_dim`` wide per head and
values ``v_head_dim``. ``q_lora_rank`` null (V2-Lite) means a plain query projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

MLA_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


@dataclass(frozen=True)
class MLAConfig:
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool  # the rope dims pair up as (0, 1), (2, 3), ... (V2 always; V3 unless the config says not)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Elements one token stores per layer: the latent and the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def workspace_per_head(self) -> int:
        """Temporaries of the absorbed attention per token and head, in elements (what the memory plan reserves
        for a prefill chunk): the query, its latent part, the query row against the cache, the rotated rope parts,
        the latent output, and the output brought back to ``v_head_dim`` and made contiguous."""
        return (self.qk_head_dim + self.kv_lora_rank + self.cache_dim + 2 * self.qk_rope_head_dim
                + self.kv_lora_rank + 2 * self.v_head_dim)


def read_mla(architecture: str, cfg: dict[str, Any]) -> MLAConfig | None:
    """The MLA facts of a DeepSeek config; None for other architectures.

    Raises:
        ConfigError: a key is missing (the message names it).
    """
    if architecture not in MLA_ARCHITECTURES:
        return None
    try:
        q_lora = cfg.get("q_lora_rank")
        return MLAConfig(
            q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
            qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
            rope_interleave=architecture == "DeepseekV2ForCausalLM" or bool(cfg.get("rope_interleave", True)),
        )
    except KeyError as exc:
        raise ConfigError(f"{architecture} config lacks {exc.args[0]!r}") from None
