"""``ModelRunner``: turns a ``ScheduleBatch`` into tensors, runs the model, and launches a step.

``launch(batch)`` issues one step to the device: the forward, the ``Sampler`` on the rows that get a token, and the
copy of those tokens to the host; it returns a ``Launched`` without waiting for any of it. The scheduler resolves
the step later (``Launched.host_tokens``), and with overlap it launches the next decode step from ``tokens`` (still
on the device) before that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xinf_sglang.kernels.cpu import elementwise as cpu_elementwise, linear as cpu_linear, linear16 as cpu_linear16

from ..layers.attention.backend import AttentionBackend
from .forward_batch import ForwardBatch, ForwardMode
from ..mem_cache.kv_pool import KVPool
from ..sampling.logprobs import DeviceLogprobs, prompt_logprobs, prompt_targets
from ..models.decoder import DecoderLM
from ..engine.outputs import TokenLogprob
from ..sampling.sampler import OutputLogprobs, Sampler
from ..scheduler.schedule_batch import Req, ScheduleBatch

__all__ = ["Launched", "ModelRunner"]


@dataclass
class Launched:
    """A step whose forward and sampling were issued to the device but whose tokens were not read yet."""

    batch: ScheduleBatch
    sampled: list[Req]  # requests that get a token from this step, in the order of ``tokens``
    tokens: torch.Tensor  # int64 on the device
    host: torch.Tensor  # the same tokens, copied (asynchronously on CUDA) to the host
    copied: torch.cuda.Event | None  # set once ``host`` holds them (None: already there)
    # Only when a request of the step asked (runtime/sampling/logprobs.py); copied to the host before ``copied`` is recorded.
    output_logprobs: OutputLogprobs | None = None
    prompt_logprobs: DeviceLogprobs | None = None

    def host_tokens(self) -> list[int]:
        """The sampled tokens, in the order of ``sampled``; waits for their copy to the host."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()

    def token_logprobs(self) -> list[TokenLogprob | None]:
        """Per entry of ``sampled``, its token's logprob (None for a request that did not ask). Call after
        `host_tokens`."""
        found: list[TokenLogprob | None] = [None] * len(self.sampled)
        if self.output_logprobs is not None:
            rows, values = self.output_logprobs
            for i, entry in zip(rows, values.entries()):
                found[i] = entry
        return found

    def prompt_entries(self) -> list[tuple[Req, list[TokenLogprob]]]:
        """Per request of the batch that scored prompt tokens in this step, those entries in position order.
        Call after `host_tokens`."""
        if self.prompt_logprobs is None:
            return []
        entries, spans, out = self.prompt_logprobs.entries(), self.batch.prompt_spans or [], []
        for req, span in zip(self.batch.reqs, spans):
            out.append((req, entries[: len(span)]))
            entries = entries[len(span):]
        return out


class ModelRunner:
    """Owns the model, the KV pool, the attention backend and the sampler; stateless between steps otherwise."""

    def __init__(
        self,
        model: DecoderLM,
        kv_pool: KVPool,
        attn: AttentionBackend,
        req_to_token: torch.Tensor,
        device: torch.device,
        sampler: Sampler,
    ) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.attn = attn
        self.req_to_token = req_to_token
        self.device = device
        self.sampler = sampler
        self.vocab_size = model.cfg.vocab_size
        self._pin = device.type == "cuda"  # stage host->device index copies in page-locked memory
        # Decode graphs (`CudaGraphRunner`, or `tp.LeaderGraphs` under tensor parallelism), set by startup when used.
        self.graphs = None
        # Host memory for sampled tokens (page-locked on CUDA, so the copy is asynchronous), one row per request
        # row of the table; two buffers used in turn: with overlap, the step being resolved still reads the other.
        self._host_tokens = [_host_buffer(req_to_token.shape[0], device) for _ in range(2)]
        if device.type == "cpu":  # build the CPU kernels now, not during the first step
            cpu_linear.load()
            cpu_elementwise.load()
            if any(p.dtype in cpu_linear16.DTYPES for p in model.parameters()):  # a bfloat16 / float16 model
                cpu_linear16.load()

    def build_forward_batch(self, batch: ScheduleBatch) -> ForwardBatch:
        """Write the new slots into the request->token table and build the forward's index tensors.

        Every index goes to the device in one asynchronous copy from pinned memory: a plain ``torch.tensor(...,
        device="cuda")`` would block the host until the device finished the step before, which would undo the
        overlap of host work and device work (and so would ``repeat_interleave`` with device-side counts).
        """
        ids: list[int] = []
        positions: list[int] = []
        starts: list[int] = []
        seq_lens: list[int] = []
        rows: list[int] = []
        row_of_token: list[int] = []
        prompt_rows: list[int] = []  # flat rows whose logits score prompt tokens (after each request's last one)
        offset = 0
        for i, (req, n) in enumerate(zip(batch.reqs, batch.extend_lens)):
            if batch.prompt_spans is not None:
                prompt_rows.extend(offset + q - req.kv_len for q in batch.prompt_spans[i])
            starts.append(offset)
            offset += n
            if batch.input_ids is None:  # otherwise a chained decode: the inputs are already on the device
                if batch.mode is ForwardMode.DECODE:
                    ids.append(_last_token(req))
                else:
                    ids.extend(_token_range(req, req.kv_len, n))
            positions.extend(range(req.kv_len, req.kv_len + n))
            seq_lens.append(req.kv_len + n)
            rows.append(req.req_pool_idx)
            row_of_token.extend([req.req_pool_idx] * n)
        parts = [rows, positions, row_of_token, batch.extend_lens, starts, seq_lens, ids, prompt_rows]
        packed = torch.tensor([v for part in parts for v in part], dtype=torch.int64, pin_memory=self._pin)
        rows_t, pos, row_of_token_t, extend_lens, start_loc, seq_lens_t, ids_t, prompt_rows_t = packed.to(
            self.device, non_blocking=True
        ).split([len(part) for part in parts])
        logits_indices = start_loc + extend_lens - 1
        if prompt_rows:
            logits_indices = torch.cat([logits_indices, prompt_rows_t])
        self.req_to_token[row_of_token_t, pos] = batch.out_cache_loc.to(torch.int32)
        return ForwardBatch(
            mode=batch.mode,
            input_ids=batch.input_ids if batch.input_ids is not None else ids_t,
            positions=pos,
            out_cache_loc=batch.out_cache_loc,
            req_pool_indices=rows_t,
            seq_lens=seq_lens_t,
            extend_seq_lens=extend_lens,
            extend_start_loc=start_loc,
            logits_indices=logits_indices,
        )

    @torch.inference_mode()
    def forward(self, batch: ScheduleBatch) -> torch.Tensor:
        """float32 logits ``[B + P, vocab]``: one row per request of the batch (its last new token), then the
        ``P`` rows of ``batch.prompt_spans`` (none unless a request scores its prompt)."""
        if self.graphs is not None and batch.mode is ForwardMode.DECODE and self.graphs.fits(len(batch.reqs)):
            return self._replay_decode(batch)
        fb = self.build_forward_batch(batch)
        self.attn.init_forward_metadata(fb)
        return self.model(fb, self.attn)

    def _replay_decode(self, batch: ScheduleBatch) -> torch.Tensor:
        """A decode step as a graph replay: the host-known fields go to the device in one asynchronous copy, and
        one launch fills the graph's inputs and the request->token table (``CudaGraphRunner.replay``)."""
        reqs = batch.reqs
        fields = [r.kv_len for r in reqs] + [r.req_pool_idx for r in reqs] + [r.kv_len + 1 for r in reqs]
        if batch.input_ids is None:  # otherwise a chained decode: the inputs are already on the device
            fields += [_last_token(r) for r in reqs]
        packed = torch.tensor(fields, dtype=torch.int64, pin_memory=self._pin).to(self.device, non_blocking=True)
        n = len(reqs)
        ids = batch.input_ids if batch.input_ids is not None else packed[3 * n :]
        return self.graphs.replay(packed[: 3 * n].view(3, n), ids, batch.out_cache_loc)

    def launch(self, batch: ScheduleBatch) -> Launched:
        """Issue ``batch``'s forward, the sampling of its rows that get a token, and the copy of those tokens to
        the host; nothing here waits for the device."""
        logits = self.forward(batch)
        prompt = None
        if batch.prompt_spans is not None:
            prompt = self._prompt_logprobs(batch, logits[len(batch.reqs):])
            logits = logits[: len(batch.reqs)]
        rows = [i for i, s in enumerate(batch.samples) if s]
        sampled = [batch.reqs[i] for i in rows]
        if len(rows) != len(batch.reqs):
            logits = logits[rows]
        tokens, logprobs = self.sampler.sample(logits, sampled) if sampled else (torch.empty(0, dtype=torch.int64), None)
        if logprobs is not None:
            logprobs = (logprobs[0], logprobs[1].to_host())
        if not tokens.is_cuda:
            return Launched(batch, sampled, tokens, tokens, None, logprobs, prompt)
        self._host_tokens.reverse()
        host = self._host_tokens[0][: len(sampled)]
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return Launched(batch, sampled, tokens, host, copied, logprobs, prompt)

    def _prompt_logprobs(self, batch: ScheduleBatch, logits: torch.Tensor) -> DeviceLogprobs:
        """The prompt logprobs of ``batch``'s prompt rows (``logits`` [P, V], raw), on their way to the host."""
        spans = batch.prompt_spans or []
        targets = torch.tensor(prompt_targets(batch.reqs, spans), dtype=torch.int64, pin_memory=self._pin)
        targets = targets.to(self.device, non_blocking=True)
        return prompt_logprobs(logits, targets, batch.reqs, spans).to_host()


def _last_token(req: Req) -> int:
    """The token a decode step feeds: the last output token, or the prompt's last one before any output."""
    return req.output_ids[-1] if req.output_ids else req.input_ids[-1]


def _token_range(req: Req, start: int, n: int) -> list[int]:
    prompt_len = len(req.input_ids)
    if start + n <= prompt_len:
        return req.input_ids[start : start + n]
    return req.fill_ids[start : start + n]


def _host_buffer(n: int, device: torch.device) -> torch.Tensor:
    return torch.empty(n, dtype=torch.int64, pin_memory=device.type == "cuda")
