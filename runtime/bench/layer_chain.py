"""Decode layers of a model's shape as a plain chain of kernel calls, with random weights: what the kernel
benchmarks time (``sglite bench kernels chain``) and what the GPU tests replay in a CUDA graph against the float32
references (tests/cuda: the order programmatic dependent launch must keep).

Every kernel reads what the one before it wrote: norm -> qkv -> decode attention (rotary + store-KV of the new
token + attention, one launch, as the runtime runs it) -> o_proj -> norm (+ residual) -> gate_up -> SiLU -> down.
``fused=False`` runs rotary and store-KV as kernels of their own and attention over the just-stored token.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from xinf_sglang import kernels

from ..layers.rope import rope_inv_freq
from ..model_loader.model_config import ModelConfig, RopeConfig

# By module name: the package re-exports a function of the same name.
dec = importlib.import_module("xinf_sglang.kernels.attention.decode_attention")


@dataclass(frozen=True)
class KernelShape:
    """The sizes the decode kernels see for one model: hidden, MLP, heads, head dim, vocabulary, rotary."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope: RopeConfig

    @classmethod
    def from_config(cls, path: str | Path) -> KernelShape:
        """The shape of a Hugging Face ``config.json`` (a file, or a folder holding one)."""
        path = Path(path)
        cfg = ModelConfig.from_dict(json.loads((path / "config.json" if path.is_dir() else path).read_text()))
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.vocab_size, cfg.rope)

    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """The model's rotary inverse frequencies (Llama 3.1's scaling included), as the runtime computes them."""
        return rope_inv_freq(self.rope, self.head_dim).to(device)

    def weights(self) -> dict[str, tuple[int, int]]:
        """``N x K`` of each linear layer of a decode step, by name."""
        return {"qkv": (self.qkv_width, self.hidden), "o_proj": (self.hidden, self.heads * self.head_dim),
                "gate_up": (2 * self.intermediate, self.hidden), "down": (self.hidden, self.intermediate),
                "lm_head": (self.vocab, self.hidden)}


@dataclass
class LayerChain:
    """Weights, KV pools and decode metadata of ``layers`` decode layers at batch ``bs`` with ``ctx`` positions
    (the last one is the new token, stored by the chain itself)."""

    shape: KernelShape
    ws: list[dict[str, torch.Tensor]]
    pools: list[tuple[torch.Tensor, torch.Tensor]]
    table: torch.Tensor
    rows: torch.Tensor
    loc: torch.Tensor
    seq_lens: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    decode_buffers: dict[str, object]
    eps: float = 1e-5

    @classmethod
    def build(cls, shape: KernelShape, bs: int, ctx: int, layers: int, dtype: torch.dtype,
              device: torch.device) -> LayerChain:
        def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*size, device=device) * scale).to(dtype)

        s = shape
        ws = [
            dict(ln1=1 + randn(s.hidden, scale=0.1), qkv=randn(s.qkv_width, s.hidden, scale=s.hidden**-0.5),
                 o=randn(s.hidden, s.heads * s.head_dim, scale=(s.heads * s.head_dim) ** -0.5),
                 ln2=1 + randn(s.hidden, scale=0.1), gu=randn(2 * s.intermediate, s.hidden, scale=s.hidden**-0.5),
                 down=randn(s.hidden, s.intermediate, scale=s.intermediate**-0.5))
            for _ in range(layers)
        ]
        slots = bs * ctx
        pools = [(randn(slots + 1, s.kv_heads, s.head_dim), randn(slots + 1, s.kv_heads, s.head_dim))
                 for _ in range(layers)]
        # Scattered slots (slot 0 is the dummy), request rows in a shuffled table with spare rows.
        table = torch.zeros(bs + 3, ctx, dtype=torch.int32, device=device)
        rows = torch.randperm(bs + 3, device=device)[:bs]
        table[rows] = (torch.randperm(slots, device=device) + 1).to(torch.int32).view(bs, ctx)
        seq_lens = torch.full((bs,), ctx, device=device)
        cos, sin = kernels.rotary_cos_sin(shape.inv_freq(device), seq_lens - 1, dtype)
        splits = dec.decode_num_splits(bs, s.kv_heads, dec.num_sms_of(device))
        mid_o, mid_lse = dec.decode_intermediate_buffers(bs, s.heads, splits, s.head_dim, device)
        bufs = dict(num_splits=splits, mid_o=mid_o, mid_lse=mid_lse,
                    split_counters=dec.decode_split_counters(bs, s.kv_heads, device))
        return cls(shape, ws, pools, table, rows, table[rows, ctx - 1].long(), seq_lens, cos, sin, bufs)

    def run(self, h: torch.Tensor, *, ref: bool = False, linear: Callable | None = None,
            pools: list[tuple[torch.Tensor, torch.Tensor]] | None = None, skip: frozenset[str] = frozenset(),
            attention_kwargs: dict | None = None, fused: bool = True) -> torch.Tensor:
        """``h [bs, hidden]`` through the layers; returns ``h + residual`` after the last one. ``ref``: the torch
        references in float32 (pass float32 ``pools`` copies); ``linear`` replaces the dispatching linear;
        ``fused=False``: rotary and store-KV as separate kernels before attention.

        For timing only: ``skip`` leaves steps out ("norm", "attention", "silu", and with ``fused=False`` "rotary"
        and "store"; the data still flows, e.g. without "silu" down reads the gate half), to see what a step costs
        inside the chain; ``attention_kwargs`` are extra arguments of the decode-attention launcher."""
        f = (lambda t: t.float()) if ref else (lambda t: t)
        norm = kernels.rms_norm_ref if ref else kernels.rms_norm
        linear = linear or (kernels.linear_ref if ref else kernels.linear)
        silu = kernels.silu_and_mul_ref if ref else kernels.silu_and_mul
        residual = None
        for w, (kb, vb) in zip(self.ws, pools or self.pools):
            if "norm" in skip:
                x, residual = h, h
            elif residual is None:
                residual, (x, _) = h, norm(h, f(w["ln1"]), self.eps)
            else:
                x, residual = norm(h, f(w["ln1"]), self.eps, residual)
            o = self._attention(linear(x, f(w["qkv"])), kb, vb, f, ref, skip, attention_kwargs or {}, fused)
            h = linear(o, f(w["o"]))
            if "norm" in skip:
                x = h
            else:
                x, residual = norm(h, f(w["ln2"]), self.eps, residual)
            gu = linear(x, f(w["gu"]))
            h = linear(gu[:, : self.shape.intermediate] if "silu" in skip else silu(gu), f(w["down"]))
        return h + residual

    def _attention(self, qkv: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, f: Callable, ref: bool,
                   skip: frozenset[str], attention_kwargs: dict, fused: bool) -> torch.Tensor:
        """One layer's attention from its qkv projection: ``[bs, heads * head_dim]``."""
        s, bs = self.shape, qkv.shape[0]
        q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1)
        q = q.reshape(bs, s.heads, s.head_dim)
        k, v = k.reshape(bs, s.kv_heads, s.head_dim), v.reshape(bs, s.kv_heads, s.head_dim)
        new_token = None
        if fused:
            new_token = dec.NewToken(k, v, f(self.cos), f(self.sin), self.loc)
        else:
            if "rotary" not in skip:
                q, k = (kernels.apply_rotary_ref if ref else kernels.apply_rotary)(q, k, f(self.cos), f(self.sin))
            if "store" not in skip:
                (kernels.store_kv_ref if ref else kernels.store_kv)(kb, vb, self.loc, k, v)
        args = (q, kb, vb, self.table, self.rows, self.seq_lens, s.head_dim**-0.5)
        if "attention" in skip:
            o = q
        elif ref:
            o = dec.decode_attention_ref(*args, new_token)
        else:
            o = dec.decode_attention_triton(*args, new_token=new_token, **(self.decode_buffers | attention_kwargs))
        return o.reshape(bs, s.heads * s.head_dim)

    def weight_bytes(self) -> int:
        return sum(w[n].numel() * w[n].element_size() for w in self.ws for n in ("qkv", "o", "gu", "down"))
