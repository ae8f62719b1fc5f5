"""One decoder-only transformer covering Llama, Mistral, Qwen2 and Qwen3.

They differ only in flags read from the config: q/k/v bias (Qwen2, Llama with ``attention_bias``), per-head q/k
RMSNorm (Qwen3), tied embeddings. q/k/v and gate/up projections are fused (one GEMM each); the loader splits
HF's separate tensors into the fused ones (``load_weight``). Attention goes through the backend seam, so the
same model runs on the torch reference and on the Triton kernels.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from xinf_sglang.kernels import linear, rms_norm, rotary_cos_sin, silu_and_mul

from ..attention import AttentionBackend
from ..forward_batch import ForwardBatch
from .config import ModelConfig
from .rope import rope_inv_freq


def _param(*shape: int) -> nn.Parameter:
    # Uninitialised on purpose: the loader (or the dummy initialiser) writes every parameter, and skipping
    # nn.Linear's init saves minutes on 8B models.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = _param(dim)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = _param(out_features, in_features)
        self.bias = _param(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # kernels.linear: a bandwidth-bound Triton kernel for decode-sized batches on CUDA, F.linear otherwise.
        return linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, h, cos, sin, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        n = h.shape[0]
        q, k, v = self.qkv_proj(h).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, _ = self.q_norm(q)
            k, _ = self.k_norm(k)
        o = attn.forward(q, k, v, cos, sin, self.layer_id, batch)  # rotary and store-KV happen behind the seam
        return self.o_proj(o.reshape(n, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(h)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_id)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, residual, cos, sin, batch, attn):
        # The residual add of the previous sublayer is fused into the norm: (norm(h + residual), h + residual).
        if residual is None:
            residual = h
            h, _ = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, cos, sin, batch, attn)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = _param(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# HF tensor name fragment -> (fused parameter fragment, shard index)
FUSED_SHARDS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# checkpoint tensors that carry nothing the model needs
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class DecoderLM(nn.Module):
    """The causal LM: embeddings, decoder layers, final norm, LM head (tied to the embeddings if configured)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.head_dim), persistent=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """Run the new tokens of ``batch``; return float32 logits ``[B, vocab]`` of each request's last token."""
        h = F.embedding(batch.input_ids, self.model.embed_tokens.weight)
        cos, sin = rotary_cos_sin(self.inv_freq, batch.positions, h.dtype)
        residual = None
        for layer in self.model.layers:
            h, residual = layer(h, residual, cos, sin, batch, attn)
        h, _ = self.model.norm(h, residual)
        return linear(h[batch.logits_indices], self.lm_head_weight).float()

    def load_weight(self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]) -> list[str]:
        """Copy one checkpoint tensor into its (possibly fused) parameter; return the parameter names it filled.

        Returns [] for tensors the model does not use (ignored suffixes, a tied ``lm_head.weight``).
        """
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and self.lm_head is None):
            return []
        for fragment, (fused, shard) in FUSED_SHARDS.items():
            if f".{fragment}." in name:
                target = name.replace(f".{fragment}.", f".{fused}.")
                param = params[target]
                start, size = self._shard_range(fused, shard)
                _copy_checked(name, param.data.narrow(0, start, size), tensor)
                return [f"{target}#{shard}"]
        if name not in params:
            raise KeyError(name)
        _copy_checked(name, params[name].data, tensor)
        return [name]

    def _shard_range(self, fused: str, shard: int) -> tuple[int, int]:
        cfg = self.cfg
        if fused == "gate_up_proj":
            return shard * cfg.intermediate_size, cfg.intermediate_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [(0, q), (q, kv), (q + kv, kv)][shard]

    def expected_weights(self) -> set[str]:
        """Every name ``load_weight`` must report once for the model to be complete."""
        names = set()
        for pname, _ in self.named_parameters():
            fused = next((f for f in ("qkv_proj", "gate_up_proj") if f".{f}." in pname), None)
            if fused is None:
                names.add(pname)
            else:
                names.update(f"{pname}#{s}" for s in range(3 if fused == "qkv_proj" else 2))
        return names


def _copy_checked(name: str, dst: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"tensor {name} has shape {tuple(src.shape)}, the model expects {tuple(dst.shape)}")
    dst.copy_(src)
