"""Tensor parallelism: one model over ``tp_size`` processes, one rank each (NCCL on CUDA, gloo on CPU).

Rank 0 is the engine's own process: it runs the scheduler, the sampler and the grammar masks exactly as a
single-rank engine does, with its model wrapped in a `LeaderModel` that broadcasts each forward batch first (and its decode graphs in
`LeaderGraphs`, which broadcast each graph step's inputs).
Ranks 1.. are processes it spawns (`TPLauncher`, `worker.py`): each holds its shard of the weights and of the KV
heads, and follows the broadcast batches (`batch.py`), joining the all-reduces of the row-parallel layers and the
vocab-parallel embedding and sending its slice of the logits to rank 0 (`TPGroup`). Nothing here is a global: the
group is an object built at startup and passed down to the layers as their ``tp``.

- options.py: the size a config asks for (default: the GPUs this process sees) and the checks of a size.
- group.py: `TPGroup`, the process group and the collectives the layers call; `RankFailure`.
- batch.py: the per-step message (a typed header + the ForwardBatch tensors) and its broadcast.
- launcher.py: rank 0's side: spawning, startup rendezvous, failure detection, shutdown.
- leader.py: `LeaderModel`, `LeaderGraphs`.  worker.py: the main of ranks 1..size-1.
- distributed.py: `TPInfo` (which shard a process holds) and the collectives the sharded layers call.

The package re-exports nothing: the layers import ``tp.distributed`` and must not pull in the launcher.
"""
