"""`LeaderModel`: rank 0's model in a tensor-parallel engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..attention import AttentionBackend
from ..forward_batch import ForwardBatch
from ..models.decoder import DecoderLM
from .batch import TableMirror, send_batch

if TYPE_CHECKING:
    from .launcher import TPLauncher


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
        if self.launcher.failure is not None:
            raise self.launcher.failure
        try:
            send_batch(self.launcher.group, batch, self.mirror)
            return self.model(batch, attn)
        except Exception as e:
            raise self.launcher.fail(e) from e
