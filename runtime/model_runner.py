"""``ModelRunner``: turns a ``ScheduleBatch`` into tensors, runs the model, and samples the next tokens."""

from __future__ import annotations

import time

import torch

from xinf_sglang.kernels import cpu_linear
from xinf_sglang.kernels.argmax import argmax

from .attention import AttentionBackend
from .constrained import allocate_bitmask, apply_bitmask_
from .forward_batch import ForwardBatch, ForwardMode
from .kv_pool import KVPool
from .models.decoder import DecoderLM
from .request import Req
from .sampler import SamplingBatch, sample
from .schedule_batch import ScheduleBatch


class ModelRunner:
    """Owns the model, the KV pool and the attention backend; stateless between steps otherwise."""

    def __init__(
        self, model: DecoderLM, kv_pool: KVPool, attn: AttentionBackend, req_to_token: torch.Tensor, device: torch.device
    ) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.attn = attn
        self.req_to_token = req_to_token
        self.device = device
        self.vocab_size = model.cfg.vocab_size
        self._pin = device.type == "cuda"  # stage host->device index copies in page-locked memory
        self.graphs = None  # a CudaGraphRunner once enable_cuda_graphs() ran
        self._bitmask = allocate_bitmask(0, self.vocab_size)  # grown on demand, reused across steps
        self.mask_seconds = 0.0  # host time spent filling and applying grammar masks (metrics)
        self.mask_steps = 0
        if device.type == "cuda":  # compile the greedy argmax now, not during the first decode step
            argmax(torch.zeros(1, self.vocab_size, device=device))
        if device.type == "cpu":  # build the threaded decode linear kernel now, not during the first step
            cpu_linear.load()

    def enable_cuda_graphs(self, max_bs: int, max_context_len: int) -> None:
        """Capture decode graphs for batch sizes up to ``max_bs`` (CUDA + Triton backend only)."""
        from .cuda_graph import CudaGraphRunner

        self.graphs = CudaGraphRunner(self.model, self.attn, max_bs, max_context_len, self.req_to_token, self.device)

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
        offset = 0
        for req, n in zip(batch.reqs, batch.extend_lens):
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
        parts = [rows, positions, row_of_token, batch.extend_lens, starts, seq_lens, ids]
        packed = torch.tensor([v for part in parts for v in part], dtype=torch.int64, pin_memory=self._pin)
        rows_t, pos, row_of_token_t, extend_lens, start_loc, seq_lens_t, ids_t = packed.to(
            self.device, non_blocking=True
        ).split([len(part) for part in parts])
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
            logits_indices=start_loc + extend_lens - 1,
        )

    @torch.inference_mode()
    def forward(self, batch: ScheduleBatch) -> torch.Tensor:
        """float32 logits ``[B, vocab]``, one row per request of the batch (its last new token)."""
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

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, reqs: list[Req]) -> torch.Tensor:
        """Next token of each request, int64 on the device, not synchronised (grammar masks, penalties, bans and
        seeds applied per request)."""
        if any(r.grammar is not None for r in reqs):
            self._apply_grammar_masks(logits, reqs)
        sb = SamplingBatch.build(
            params=[r.params for r in reqs],
            output_ids=[r.output_ids for r in reqs],
            prompt_ids=[r.input_ids for r in reqs],
            generators=[r.generator for r in reqs],
            banned_token_ids=[_banned(r) for r in reqs],
            vocab_size=self.vocab_size,
            device=self.device,
        )
        return sample(logits, sb)


    def _apply_grammar_masks(self, logits: torch.Tensor, reqs: list[Req]) -> None:
        """Mask each constrained row to what its grammar allows next; every other row allows everything (rows are
        reset each step, so a mask never leaks into the next request that lands on that row)."""
        start = time.perf_counter()
        if self._bitmask.shape[0] < len(reqs):
            self._bitmask = allocate_bitmask(max(len(reqs), 2 * self._bitmask.shape[0]), self.vocab_size)
        bitmask = self._bitmask[: len(reqs)]
        bitmask.fill_(-1)
        for row, req in enumerate(reqs):
            if req.grammar is not None:
                req.grammar.fill_bitmask(bitmask, row)
        apply_bitmask_(logits, bitmask)
        self.mask_seconds += time.perf_counter() - start
        self.mask_steps += 1


def _last_token(req: Req) -> int:
    """The token a decode step feeds: the last output token, or the prompt's last one before any output."""
    return req.output_ids[-1] if req.output_ids else req.input_ids[-1]


def _token_range(req: Req, start: int, n: int) -> list[int]:
    prompt_len = len(req.input_ids)
    if start + n <= prompt_len:
        return req.input_ids[start : start + n]
    return req.fill_ids[start : start + n]


def _banned(req: Req) -> list[int]:
    """Stop tokens may not be sampled before ``min_new_tokens`` outputs exist."""
    if len(req.output_ids) < req.params.min_new_tokens:
        return sorted(req.stop_token_ids)
    return []
