"""Quantized weights kept quantized (home of the quantization work): one module per method (fp8, awq, gptq, gguf),
each a weight layout (what the checkpoint tensors are and how a layer's shard of them is stored) plus a matmul
(Triton on CUDA, a C++ kernel on the CPU, a torch reference for both). A checkpoint's ``quantization_config`` (or a
GGUF tensor type) picks the method; the dense ``layers/linear.py`` layers take a method object instead of a flag.
A GGUF file's kernel types stay in their blocks (``gguf.py``; the rule: ``model_loader/gguf_quant.py``)."""
