"""The mixture-of-experts facts of a checkpoint's ``config.json`` (`MoEConfig`), read per architecture.

HF names the same facts differently per family: Qwen2-MoE and Qwen3-MoE say ``num_experts`` and
``moe_intermediate_size`` and choose their sparse layers with ``decoder_sparse_step`` / ``mlp_only_layers``
(dense MLPs of ``intermediate_size`` elsewhere); Mixtral says ``num_local_experts``, its experts are
``intermediate_size`` wide, every layer is sparse and the top-2 weights are always renormalised. DeepSeek says
``n_routed_experts``, keeps its first ``first_k_dense_replace`` layers dense, adds ``n_shared_experts`` ungated
shared experts, and routes by groups: V2 softmax scores with ``greedy`` / ``group_limited_greedy`` top-k, V3 sigmoid
scores plus a learned correction bias (``noaux_tc``), both times ``routed_scaling_factor``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from ..errors import ConfigError


@dataclass(frozen=True)
class MoEConfig:
    """Experts of the sparse layers of one model (dense layers use the model's ``intermediate_size``)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one routed expert
    norm_topk_prob: bool  # renormalise the top-k softmax weights to sum to 1
    shared_expert_intermediate_size: int = 0  # the shared expert(s) every token runs; 0: none
    shared_expert_gated: bool = True  # Qwen2-MoE scales it by sigmoid(shared_expert_gate(h)); DeepSeek does not
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    topk_method: Literal["greedy", "group_limited_greedy", "noaux_tc"] = "greedy"
    n_group: int = 1  # expert groups (grouped top-k picks the best topk_group groups first)
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # multiplies the routing weights (after renormalising)
    router_float32: bool = False  # the router GEMM in float32 (DeepSeek) instead of the model dtype

    def is_sparse(self, layer_id: int) -> bool:
        """Whether layer ``layer_id`` routes to experts (HF's rule) or runs a dense MLP."""
        return layer_id not in self.mlp_only_layers and (layer_id + 1) % self.decoder_sparse_step == 0

    def active_fraction(self) -> float:
        """Share of a sparse layer's routed-expert weights one token reads (``top_k / num_experts``)."""
        return self.top_k / self.num_experts


def _qwen_moe(cfg: dict[str, Any]) -> MoEConfig:
    # The Hub's Qwen configs say num_experts; transformers 5.x writes Qwen3-MoE's as num_local_experts.
    experts = cfg.get("num_experts") or cfg["num_local_experts"]
    return MoEConfig(
        num_experts=int(experts),
        top_k=int(cfg["num_experts_per_tok"]),
        intermediate_size=int(cfg["moe_intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(int(i) for i in cfg.get("mlp_only_layers") or ()),
    )


def _qwen3_moe(cfg: dict[str, Any]) -> MoEConfig:
    if cfg.get("shared_expert_intermediate_size"):
        raise ConfigError("Qwen3-MoE has no shared expert, but the config sets shared_expert_intermediate_size")
    return _qwen_moe(cfg)


def _mixtral(cfg: dict[str, Any]) -> MoEConfig:
    return MoEConfig(
        num_experts=int(cfg["num_local_experts"]),
        top_k=int(cfg.get("num_experts_per_tok", 2)),
        intermediate_size=int(cfg["intermediate_size"]),
        norm_topk_prob=True,
    )


def _deepseek(cfg: dict[str, Any], v3: bool) -> MoEConfig:
    if (cfg.get("moe_layer_freq") or 1) != 1:
        raise ConfigError(f"moe_layer_freq={cfg['moe_layer_freq']} is not supported (sglite, like HF, takes every "
                          "layer from first_k_dense_replace on as sparse)")
    width = int(cfg["moe_intermediate_size"])
    groups = int(cfg.get("n_group") or 1)
    return MoEConfig(
        num_experts=int(cfg["n_routed_experts"]),
        top_k=int(cfg["num_experts_per_tok"]),
        intermediate_size=width,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=width * int(cfg.get("n_shared_experts") or 0),
        shared_expert_gated=False,
        mlp_only_layers=tuple(range(int(cfg.get("first_k_dense_replace") or 0))),
        # HF's V3 always scores with sigmoid + correction bias; V2 with softmax and its topk_method.
        scoring="sigmoid" if v3 else "softmax",
        topk_method="noaux_tc" if v3 else cfg.get("topk_method") or "greedy",
        n_group=groups,
        topk_group=int(cfg.get("topk_group") or groups),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
        router_float32=True,
    )


MOE_READERS: Mapping[str, Callable[[dict[str, Any]], MoEConfig]] = MappingProxyType({
    "Qwen2MoeForCausalLM": _qwen_moe,
    "Qwen3MoeForCausalLM": _qwen3_moe,
    "MixtralForCausalLM": _mixtral,
    "DeepseekV2ForCausalLM": lambda cfg: _deepseek(cfg, v3=False),
    "DeepseekV3ForCausalLM": lambda cfg: _deepseek(cfg, v3=True),
})
"""HF architecture -> reader of its experts; architectures not listed are dense."""


def read_moe(architecture: str, cfg: dict[str, Any]) -> MoEConfig | None:
    """The experts of ``architecture``'s config dict; None for a dense architecture.

    Raises:
        ConfigError: a key is missing or a value is out of range (the message names it).
    """
    reader = MOE_READERS.get(architecture)
    if reader is None:
        return None
    try:
        moe = reader(cfg)
    except KeyError as exc:
        raise ConfigError(f"{architecture} config lacks {exc.args[0]!r}") from None
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ConfigError(f"num_experts_per_tok={moe.top_k} must be in [1, num_experts={moe.num_experts}]")
    if moe.intermediate_size <= 0 or moe.decoder_sparse_step <= 0:
        raise ConfigError(f"{architecture}: expert intermediate size and decoder_sparse_step must be positive")
    if moe.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ConfigError(f"topk_method {moe.topk_method!r} is not supported; sglite supports greedy, "
                          "group_limited_greedy and noaux_tc")
    if moe.num_experts % moe.n_group or not 1 <= moe.topk_group <= moe.n_group:
        raise ConfigError(f"n_group={moe.n_group} must divide the {moe.num_experts} experts and topk_group="
                          f"{moe.topk_group} lie in [1, n_group]")
    return moe
