"""Attention over the token-granular KV pool, for CUDA (Triton) with a torch reference each: decode ("flash
decoding": split-KV partial results merged by log-sum-exp, ``decode_split.py`` picks the split count), extend
(cached prefix read through the slot table + causal attention over the new tokens), writing new K/V into the
pool (``store_kv.py``), the pool's memory layout (``pool_layout.py``), and multi-head latent attention (DeepSeek's MLA:
``mla.py``, its kernels in ``mla_kernels.py``, its split policy in ``mla_split.py``).

Re-exports nothing: ``kernels/__init__.py`` exports the public functions."""
