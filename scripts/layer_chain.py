"""Decode layers of a Llama-3.1-8B-shaped model as a plain chain of kernel calls, for the GPU scripts.

Every kernel reads what the one before it wrote: norm -> qkv -> decode attention (rotary + store-KV of the new
token + attention, one launch, as the runtime runs it) -> o_proj -> norm (+ residual) -> gate_up -> SiLU -> down.
``fused=False`` runs rotary and store-KV as kernels of their own and attention over the just-stored token. ``gpu_kernel_check.py`` replays it in
a CUDA graph against the float32 references (what programmatic dependent launch must keep ordered);
``gpu_tune.py`` times it with different linear launch settings.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

HIDDEN, INTERMEDIATE, HQ, HKV, HEAD_DIM = 4096, 14336, 32, 8, 128


def llama3_inv_freq(head_dim: int, theta: float = 500000.0) -> torch.Tensor:
    """Llama-3.1's scaled rope frequencies (factor 8, low/high freq factors 1/4, original context 8192)."""
    factor, low, high, old_len = 8.0, 1.0, 4.0, 8192
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


@dataclass
class LayerChain:
    """Weights, KV pools and decode metadata of ``layers`` decode layers at batch ``bs`` with ``ctx`` positions
    (the last one is the new token, stored by the chain itself)."""

    pkg: object  # xinf_sglang.kernels
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
    def build(cls, pkg, bs: int, ctx: int, layers: int, dtype: torch.dtype, device: torch.device) -> LayerChain:
        dec = importlib.import_module(f"{pkg.__name__}.decode_attention")

        def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, device=device) * scale).to(dtype)

        ws = [
            dict(
                ln1=1 + randn(HIDDEN, scale=0.1), qkv=randn((HQ + 2 * HKV) * HEAD_DIM, HIDDEN, scale=HIDDEN**-0.5),
                o=randn(HIDDEN, HQ * HEAD_DIM, scale=(HQ * HEAD_DIM) ** -0.5), ln2=1 + randn(HIDDEN, scale=0.1),
                gu=randn(2 * INTERMEDIATE, HIDDEN, scale=HIDDEN**-0.5),
                down=randn(HIDDEN, INTERMEDIATE, scale=INTERMEDIATE**-0.5),
            )
            for _ in range(layers)
        ]
        slots = bs * ctx
        pools = [(randn(slots + 1, HKV, HEAD_DIM), randn(slots + 1, HKV, HEAD_DIM)) for _ in range(layers)]
        # Scattered slots (slot 0 is the dummy), request rows in a shuffled table with spare rows.
        table = torch.zeros(bs + 3, ctx, dtype=torch.int32, device=device)
        rows = torch.randperm(bs + 3, device=device)[:bs]
        table[rows] = (torch.randperm(slots, device=device) + 1).to(torch.int32).view(bs, ctx)
        seq_lens = torch.full((bs,), ctx, device=device)
        cos, sin = pkg.rotary_cos_sin(llama3_inv_freq(HEAD_DIM).to(device), seq_lens - 1, dtype)
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = dec.decode_num_splits(bs, HKV, num_sms)
        mid_o, mid_lse = dec.decode_intermediate_buffers(bs, HQ, splits, HEAD_DIM, device)
        bufs = dict(num_splits=splits, mid_o=mid_o, mid_lse=mid_lse,
                    split_counters=dec.decode_split_counters(bs, HKV, device))
        return cls(pkg, ws, pools, table, rows, table[rows, ctx - 1].long(), seq_lens, cos, sin, bufs)

    def run(self, h: torch.Tensor, *, ref: bool = False, linear: Callable | None = None,
            pools: list[tuple[torch.Tensor, torch.Tensor]] | None = None, skip: frozenset[str] = frozenset(),
            attention_kwargs: dict | None = None, fused: bool = True) -> torch.Tensor:
        """``h [bs, HIDDEN]`` through the layers; returns ``h + residual`` after the last one. ``ref``: the torch
        references in float32 (pass float32 ``pools`` copies); ``linear`` replaces the dispatching linear;
        ``fused=False``: rotary and store-KV as separate kernels before attention.

        For timing only: ``skip`` leaves steps out ("norm", "attention", "silu", and with ``fused=False`` "rotary"
        and "store"; the data still flows, e.g. without "silu" down reads the gate half), to see what a step costs
        inside the chain; ``attention_kwargs`` are extra arguments of the decode-attention launcher."""
        k = self.pkg
        dec = importlib.import_module(f"{k.__name__}.decode_attention")
        f = (lambda t: t.float()) if ref else (lambda t: t)
        norm = k.rms_norm_ref if ref else k.rms_norm
        linear = linear or (k.linear_ref if ref else k.linear)
        rotary = k.apply_rotary_ref if ref else k.apply_rotary
        store = k.store_kv_ref if ref else k.store_kv
        silu = k.silu_and_mul_ref if ref else k.silu_and_mul
        bs, scale = h.shape[0], HEAD_DIM**-0.5
        residual = None
        for w, (kb, vb) in zip(self.ws, pools or self.pools):
            if "norm" in skip:
                x, residual = h, h
            elif residual is None:
                residual, (x, _) = h, norm(h, f(w["ln1"]), self.eps)
            else:
                x, residual = norm(h, f(w["ln1"]), self.eps, residual)
            q, kk, v = linear(x, f(w["qkv"])).split([HQ * HEAD_DIM, HKV * HEAD_DIM, HKV * HEAD_DIM], -1)
            q, kk, v = q.reshape(bs, HQ, HEAD_DIM), kk.reshape(bs, HKV, HEAD_DIM), v.reshape(bs, HKV, HEAD_DIM)
            new_token = None
            if fused:
                new_token = dec.NewToken(kk, v, f(self.cos), f(self.sin), self.loc)
            else:
                if "rotary" not in skip:
                    q, kk = rotary(q, kk, f(self.cos), f(self.sin))
                if "store" not in skip:
                    store(kb, vb, self.loc, kk, v)
            args = (q, kb, vb, self.table, self.rows, self.seq_lens, scale)
            if "attention" in skip:
                o = q
            elif ref:
                o = dec.decode_attention_ref(*args, new_token)
            else:
                kwargs = self.decode_buffers | (attention_kwargs or {})
                o = dec.decode_attention_triton(*args, new_token=new_token, **kwargs)
            h = linear(o.reshape(bs, HQ * HEAD_DIM), f(w["o"]))
            if "norm" in skip:
                x = h
            else:
                x, residual = norm(h, f(w["ln2"]), self.eps, residual)
            gu = linear(x, f(w["gu"]))
            h = linear(gu[:, :INTERMEDIATE] if "silu" in skip else silu(gu), f(w["down"]))
        return h + residual

    def weight_bytes(self) -> int:
        return sum(w[n].numel() * w[n].element_size() for w in self.ws for n in ("qkv", "o", "gu", "down"))
