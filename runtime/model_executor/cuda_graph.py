"""Decode as CUDA-graph replays: one graph per captured batch size, a real batch padded up to the next size.

Captured sizes: 1, 2, 4, 8, then steps of 8 up to ``max_bs``. The graphs read their inputs from one static
``int64 [5, max_bs]`` tensor (``kernels/step_inputs.py``), refilled before each replay by a single launch that
also writes the new slots into the request->token table. Padded rows read request row 0 (harmless: their outputs
are dropped) and write their K/V to the dummy slot 0, which the allocator never hands out, so padding never
touches a real request's cache.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from xinf_sglang.kernels.step_inputs import DECODE_FIELDS, DECODE_PADDING, fill_decode_inputs

from .forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)


def capture_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs]
    sizes += list(range(16, max_bs + 1, 8))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class CudaGraphRunner:
    """Captures the model's decode forward for each size in ``capture_sizes(max_bs)`` and replays it."""

    def __init__(
        self, model, attn, max_bs: int, max_context_len: int, req_to_token: torch.Tensor, device: torch.device
    ) -> None:
        self.model = model
        self.attn = attn
        self.req_to_token = req_to_token
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.device = device
        n = self.max_bs
        # Static inputs, one row per field of DECODE_FIELDS, refilled in place before every replay (the graphs
        # read these addresses). They start as padding rows (slot 0: the dummy slot).
        self.static = torch.tensor(DECODE_PADDING, dtype=torch.int64, device=device)[:, None].repeat(1, n)
        fields = dict(zip(DECODE_FIELDS, self.static))
        self.input_ids, self.positions = fields["input_ids"], fields["positions"]
        self.req_pool_indices, self.seq_lens = fields["req_pool_indices"], fields["seq_lens"]
        self.out_cache_loc = fields["out_cache_loc"]
        self.ones = torch.ones(n, dtype=torch.int64, device=device)
        self.arange = torch.arange(n, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        attn.init_cuda_graph_state(self.max_bs, max_context_len)
        self._capture_all()

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            extend_seq_lens=self.ones[:bs],
            extend_start_loc=self.arange[:bs],
            logits_indices=self.arange[:bs],
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        start = time.perf_counter()
        # Compile the input-filling kernel now rather than at the first replay (with no real row it writes only
        # padding rows, and nothing to the request->token table).
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        fill_decode_inputs(self.static, empty.view(3, 0), empty, empty, self.req_to_token)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        # Largest first: later (smaller) graphs reuse the memory pool the largest one reserved.
        for bs in reversed(self.sizes):
            batch = self._static_batch(bs)
            self.attn.init_forward_metadata_capture(batch)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: autotuning and lazy allocations must not happen during capture
                    self.model(batch, self.attn)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[bs] = self.model(batch, self.attn)
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode CUDA graphs (batch sizes %s..%s) in %.1f s",
                    len(self.sizes), self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def fits(self, batch_size: int) -> bool:
        """Whether a decode batch of ``batch_size`` rows has a captured graph (its own size or a larger one)."""
        return batch_size <= self.max_bs

    def replay(self, host_fields: torch.Tensor, input_ids: torch.Tensor, out_cache_loc: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, vocab]`` of a real decode batch, computed by the graph of the next captured size.

        ``host_fields`` is ``int64 [3, B]`` on the device: each row's position, request row and length; ``input_ids``
        and ``out_cache_loc`` are ``int64 [B]``. The request->token table gets the new slots in the same launch
        that fills the static inputs."""
        padded = self.prepare(host_fields, input_ids, out_cache_loc)
        return self.launch(padded, input_ids.shape[0])

    def prepare(self, host_fields: torch.Tensor, input_ids: torch.Tensor, out_cache_loc: torch.Tensor) -> int:
        """The first half of `replay`: fill ``static[:, :padded]`` and the table's new slots; returns ``padded``,
        the captured size that will run (a tensor-parallel rank 0 sends the filled inputs between the halves)."""
        padded = self.sizes[bisect.bisect_left(self.sizes, input_ids.shape[0])]
        fill_decode_inputs(self.static[:, :padded], host_fields, input_ids, out_cache_loc, self.req_to_token)
        return padded

    def launch(self, padded: int, batch_size: int) -> torch.Tensor:
        """The second half of `replay`: run the graph of size ``padded`` on ``static[:, :padded]`` as it is now;
        the logits of the first ``batch_size`` rows."""
        self.attn.init_forward_metadata_replay(self._static_batch(padded))
        self.graphs[padded].replay()
        return self.outputs[padded][:batch_size]
