"""The scheduler: continuous batching over the token pool with prefix reuse.

Each step it either admits waiting requests into a prefill (extend) batch under the token budgets
(``prefill.py``, in the order of ``policy.py``), or runs one decode step for every running request (``decode.py``).
When the pool cannot hold the next decode step it retracts the requests with the fewest decoded tokens back to the
waiting queue (their output is kept and re-prefilled later). ``kv.py`` owns the KV slots: prefixes are shared
while requests run (runtime/mem_cache/prefix_sharing.py): each prefill (chunk) enters the radix tree right after its forward
is issued, and a request reuses what an earlier request of its own prefill batch computes. ``scheduler.py``
composes the parts and runs the steps: schedule -> ``ModelRunner.launch`` -> resolve (with overlap, a
decode step is resolved after the next one is launched).

The package re-exports nothing: modules below the scheduler (sampling, the model runner) import
``scheduler.schedule_batch`` and must not pull in ``scheduler.scheduler`` through this file.
"""
