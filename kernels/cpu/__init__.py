"""The CPU backend's kernels: C++ sources compiled once per machine with ``torch.utils.cpp_extension`` (``build.py``
picks the ISA and caches the build), each next to the torch reference it must equal: attention that reads the KV
pool through the slot table (``attention.py`` + ``attention_source.py``), fused RMSNorm / SiLU-mul
(``elementwise.py``), a threaded linear (``linear.py``) and GGUF block matmuls (``gguf.py``: ``gguf_source.py``,
``gguf_kernel_source.py``); the last two share a pool of threads that stays awake between calls (``pool_source.py``).

Re-exports nothing: the runtime imports the module it needs."""
