"""`LeaderModel` and `LeaderGraphs`: rank 0's model and decode graphs in a tensor-parallel engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from ..layers.attention.backend import AttentionBackend
from ..model_executor.cuda_graph import CudaGraphRunner
from ..model_executor.forward_batch import ForwardBatch
from ..models.decoder import DecoderLM
from .batch import TableMirror, send_batch, send_graph_step

if TYPE_CHECKING:
    from .launcher import TPLauncher

T = TypeVar("T")


class LeaderModel(nn.Module):
    """Rank 0's shard behind the model interface the runner calls: each forward first broadcasts the batch, so
    the other ranks run the same forward and join its collectives. The scheduler and the runner do not know
    they drive several processes.

    After any failure of a step the ranks are out of step with each other (a collective half done), so the
    group is finished: the launcher stops the other ranks and every later forward raises the same `RankFailure`
    (the launcher's ``failure``, also set when its `check` found a rank dead between steps).
    """

    def __init__(self, model: DecoderLM, launcher: TPLauncher, req_to_token: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.mirror = TableMirror(req_to_token)  # the runner's table as the other ranks have it
        self.cfg = model.cfg
        self.tp = model.tp
        self.launcher = launcher

    def forward(self, batch: ForwardBatch, attn: AttentionBackend) -> torch.Tensor:
        """The logits of ``batch`` over the whole vocabulary (gathered here from every rank's slice)."""

        def step() -> torch.Tensor:
            send_batch(self.launcher.group, batch, self.mirror)
            return self.model(batch, attn)

        return self.run_step(step)

    def run_step(self, step: Callable[[], T]) -> T:
        """Run one step of the group (``step`` broadcasts, then computes); any failure finishes the group."""
        if self.launcher.failure is not None:
            raise self.launcher.failure
        try:
            return step()
        except Exception as e:
            raise self.launcher.fail(e) from e


class LeaderGraphs:
    """Rank 0's decode graphs under tensor parallelism, with `CudaGraphRunner`'s interface (``fits``, ``replay``).

    ``graphs`` captured rank 0's shard (``LeaderModel.model``: a broadcast cannot be inside a graph), while every
    other rank captured the same sizes in the same order (`runtime.startup.decode_graphs`), so the collectives
    inside the graphs pair up. Each replay fills the static inputs, broadcasts them (with the table entries the
    followers lack) and replays; a follower replays its graph of the same size on the same inputs.
    """

    def __init__(self, graphs: CudaGraphRunner, leader: LeaderModel) -> None:
        self.graphs = graphs
        self.leader = leader

    def fits(self, batch_size: int) -> bool:
        return self.graphs.fits(batch_size)

    def replay(self, host_fields: torch.Tensor, input_ids: torch.Tensor, out_cache_loc: torch.Tensor) -> torch.Tensor:
        """`CudaGraphRunner.replay` on every rank."""
        bs = input_ids.shape[0]

        def step() -> torch.Tensor:
            padded = self.graphs.prepare(host_fields, input_ids, out_cache_loc)
            send_graph_step(self.leader.launcher.group, self.graphs.static[:, :padded], bs, self.leader.mirror)
            return self.graphs.launch(padded, bs)

        return self.leader.run_step(step)
