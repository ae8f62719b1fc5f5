"""The main of tensor-parallel ranks 1..size-1: ``python -m xinf_sglang.runtime.tp.worker RANK SIZE PORT PID``,
with the engine's config as JSON on stdin.

A rank builds its shard exactly as rank 0 does (`runtime.startup.build_shard`), then follows the steps rank 0
broadcasts until it says stop. It reports an error at startup to rank 0 through the store (``error/RANK``), so
the engine fails with this rank's own message. It exits when rank 0's process is gone, so an engine killed hard
leaves no rank behind.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback

import torch

from ..config import EngineConfig
from ..engine.startup import build_shard, decode_graphs, resolve_device
from ..model_executor.cuda_graph import CudaGraphRunner
from .batch import GraphStep, receive_batch
from .group import PeerFailure, TPGroup, connect_store

PARENT_POLL_S = 0.5


def main(argv: list[str]) -> int:
    """Serve rank ``argv[0]`` of ``argv[1]`` (store on port ``argv[2]``, engine process ``argv[3]``)."""
    rank, size, port, parent = (int(a) for a in argv)
    _exit_with_parent(parent)
    config = EngineConfig(**json.loads(sys.stdin.read()))
    store = connect_store(port, size, is_master=False)
    try:
        serve(config, rank, size, store)
    except PeerFailure as e:  # the failed peer reported its own error; this rank only leaves (quietly: no cover-up)
        print(f"sglite tensor-parallel rank {rank}: {e}", file=sys.stderr)
        return 1
    except BaseException as e:
        store.set(f"error/{rank}", f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    return 0


def serve(config: EngineConfig, rank: int, size: int, store) -> None:
    """Build this rank's shard and follow rank 0's steps until it says stop."""
    device = resolve_device(config.device, rank)
    if device.type == "cpu":  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    group = TPGroup.connect(rank, size, store, device, config.tp_timeout_s)
    shard = build_shard(config, group)
    graphs = decode_graphs(config, shard)  # where rank 0 captures its own: the captures' collectives pair up
    follow(shard, group, graphs)


@torch.inference_mode()
def follow(shard, group: TPGroup, graphs: CudaGraphRunner | None) -> None:
    """Run each broadcast batch through this rank's shard (its logits slice goes to rank 0 in the LM head), or
    replay this rank's graph of the size rank 0 replays."""
    while (step := receive_batch(group)) is not None:
        _write_slots(shard.req_to_token, step.table_updates)
        if isinstance(step, GraphStep):
            if graphs is None:
                raise RuntimeError("rank 0 replays a decode graph but this rank captured none (configs differ?)")
            padded = step.inputs.shape[1]
            graphs.static[:, :padded].copy_(step.inputs)
            graphs.launch(padded, step.batch_size)
        else:
            shard.attn.init_forward_metadata(step.batch)
            shard.model(step.batch, shard.attn)


def _write_slots(req_to_token: torch.Tensor, table_updates: torch.Tensor) -> None:
    """Make this rank's request->token rows equal rank 0's where the step reads them (`batch.TableMirror`)."""
    rows, positions, slots = table_updates
    req_to_token[rows, positions] = slots.to(torch.int32)


def _exit_with_parent(parent: int) -> None:
    """Exit as soon as the engine's process is gone (even while blocked in a collective: this is a thread)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="sglite-tp-parent-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
