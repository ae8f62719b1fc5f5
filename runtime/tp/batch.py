"""The per-step message from rank 0 to the other ranks: a typed header, then the `ForwardBatch` tensors.

Two broadcasts per step: a fixed-size header (`StepHeader`: run a forward of this shape, replay a decode graph, or
stop) and one int64 tensor holding every index tensor of the batch. A follower rebuilds the same `ForwardBatch`
from them, so the scheduler's state (which slots, which rows) never has to exist outside rank 0. A graph step
(`GraphStep`) carries rank 0's filled static graph inputs instead (``int64 [5, padded]``, `cuda_graph`): every rank
captured the same sizes in the same order at startup, so the follower replays its own graph of the same size.

A follower keeps its own request->token table. Rank 0's runner writes the new tokens' slots into its table in
every forward, but the scheduler writes rows outside any forward too: a cached prefix at admission, a peer's
in-batch prefix, and a running request's row re-pointed at the tree's slots once its prefix is cached (its own
duplicates freed and handed to others). Rather than hook each of those, rank 0 keeps a copy of the table as the
followers have it (`TableMirror`) and each step carries the entries of the batch's rows that differ from it:
whatever wrote them, a follower's rows equal rank 0's where the step reads them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from xinf_sglang.kernels.step_inputs import DECODE_FIELDS

from ..model_executor.forward_batch import ForwardBatch, ForwardMode
from .group import TPGroup

__all__ = [
    "GraphStep", "Step", "StepHeader", "StepOp", "TableMirror", "receive_batch", "send_batch", "send_graph_step",
    "send_stop",
]

TOKEN_FIELDS = ("input_ids", "positions", "out_cache_loc")  # [T] each
ROW_FIELDS = ("req_pool_indices", "seq_lens", "extend_seq_lens", "extend_start_loc")  # [B]
# logits_indices: [R], R >= B (a prefill that scores prompt tokens asks for more rows than one per request)
MODES = tuple(ForwardMode)


class StepOp(enum.IntEnum):
    FORWARD = 1
    STOP = 2
    GRAPH = 3  # replay the decode graph of size num_tokens (padded) for batch_size real rows


@dataclass(frozen=True)
class StepHeader:
    """What the next broadcast holds: ``op``, and for a forward its mode and sizes (``T`` tokens, ``B`` rows)."""

    op: StepOp
    mode: ForwardMode = ForwardMode.DECODE
    num_tokens: int = 0
    batch_size: int = 0
    table_updates: int = 0  # how many request->token entries (row, position, slot) follow the batch
    logit_rows: int = 0  # length of logits_indices

    LENGTH = 6

    def to_tensor(self, device: torch.device) -> torch.Tensor:
        values = [int(self.op), MODES.index(self.mode), self.num_tokens, self.batch_size, self.table_updates,
                  self.logit_rows]
        return torch.tensor(values, dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "StepHeader":
        op, mode, tokens, rows, prefix, logit_rows = t.tolist()
        return cls(StepOp(op), MODES[mode], tokens, rows, prefix, logit_rows)


@dataclass(frozen=True)
class Step:
    """What a follower runs: the batch, and the request->token entries to write first (``[3, D]``: rows,
    positions, slots)."""

    batch: ForwardBatch
    table_updates: torch.Tensor


@dataclass(frozen=True)
class GraphStep:
    """A decode step as a graph replay: the static inputs ``[5, padded]`` (`kernels.step_inputs.DECODE_FIELDS`) of
    which the first ``batch_size`` columns are real rows, and the request->token entries to write first."""

    inputs: torch.Tensor
    batch_size: int
    table_updates: torch.Tensor


class TableMirror:
    """Rank 0's copy of the request->token table as the followers have it (see the module docstring)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.sent = table.clone()

    def updates(self, rows: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """``[3, D]`` int64 (row, position, slot) of every entry of the request rows ``rows``, up to their longest
        sequence (``seq_lens``), that changed since it was last sent; recorded as sent."""
        width = int(seq_lens.max()) if rows.numel() else 0
        now = self.table[rows, :width]
        changed = (now != self.sent[rows, :width]).nonzero()
        self.sent[rows, :width] = now
        i, pos = changed[:, 0], changed[:, 1]
        return torch.stack([rows[i], pos, now[i, pos].to(torch.int64)])


def send_batch(group: TPGroup, fb: ForwardBatch, mirror: TableMirror) -> None:
    """Rank 0: broadcast ``fb`` and the request->token entries its rows need to the other ranks."""
    updates = mirror.updates(fb.req_pool_indices, fb.seq_lens)
    parts = [getattr(fb, name).to(torch.int64) for name in TOKEN_FIELDS + ROW_FIELDS + ("logits_indices",)]
    header = StepHeader(StepOp.FORWARD, fb.mode, fb.num_tokens, fb.batch_size, int(updates.shape[1]),
                        int(fb.logits_indices.shape[0]))
    group.broadcast(header.to_tensor(group.device))
    group.broadcast(torch.cat([*parts, updates.reshape(-1)]))


def send_graph_step(group: TPGroup, inputs: torch.Tensor, batch_size: int, mirror: TableMirror) -> None:
    """Rank 0: broadcast the filled graph inputs ``[5, padded]`` (the table already holds the new slots, so the
    entries sent include them) before replaying its own graph of that size."""
    fields = dict(zip(DECODE_FIELDS, inputs))
    rows, lens = fields["req_pool_indices"][:batch_size], fields["seq_lens"][:batch_size]
    updates = mirror.updates(rows, lens)
    header = StepHeader(StepOp.GRAPH, ForwardMode.DECODE, inputs.shape[1], batch_size, int(updates.shape[1]))
    group.broadcast(header.to_tensor(group.device))
    group.broadcast(torch.cat([inputs.reshape(-1), updates.reshape(-1)]))


def send_stop(group: TPGroup) -> None:
    """Rank 0: tell the other ranks to leave their step loop."""
    group.broadcast(StepHeader(StepOp.STOP).to_tensor(group.device))


def receive_batch(group: TPGroup) -> Step | GraphStep | None:
    """A follower: the next step, or None when rank 0 said stop. Waits as long as the engine idles."""
    header = StepHeader.from_tensor(group.broadcast(torch.empty(StepHeader.LENGTH, dtype=torch.int64,
                                                                device=group.device), idle=True))
    if header.op is StepOp.STOP:
        return None
    if header.op is StepOp.GRAPH:
        width, d = len(DECODE_FIELDS) * header.num_tokens, header.table_updates
        payload = group.broadcast(torch.empty(width + 3 * d, dtype=torch.int64, device=group.device))
        inputs, updates = payload.split([width, 3 * d])
        return GraphStep(inputs.view(len(DECODE_FIELDS), header.num_tokens), header.batch_size, updates.view(3, d))
    t, b, d, r = header.num_tokens, header.batch_size, header.table_updates, header.logit_rows
    sizes = [t] * len(TOKEN_FIELDS) + [b] * len(ROW_FIELDS) + [r, 3 * d]
    payload = group.broadcast(torch.empty(sum(sizes), dtype=torch.int64, device=group.device))
    *parts, logits_indices, updates = payload.split(sizes)
    fb = ForwardBatch(mode=header.mode, logits_indices=logits_indices, **dict(zip(TOKEN_FIELDS + ROW_FIELDS, parts)))
    return Step(fb, updates.view(3, d))
