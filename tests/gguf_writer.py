"""GGUF fixtures of tiny HF checkpoints: `xinf_sglang.runtime.testing.gguf_writer` plus the K quants.

``gguf.quants`` cannot quantize the K quants (Q2_K ... Q6_K); for those the writer gets random blocks with small
scales (what is tested there is that the reader dequantizes, maps and un-permutes them exactly as transformers
does). Every other type is quantized from the real weights by the runtime's writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xinf_sglang.runtime.testing import gguf_writer
from xinf_sglang.runtime.testing.gguf_writer import gguf_name, llama_cpp_permute, quantize_tensor

__all__ = ["gguf_name", "llama_cpp_permute", "write_gguf"]

# byte offsets of the float16 scale fields inside one 256-value block (ggml-common.h)
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def write_gguf(hf_dir: Path, out: Path, qtype: str = "F32", seed: int = 0) -> Path:
    """``hf_dir`` as a GGUF file at ``out`` with 2-D weights stored as ``qtype`` (K quants: random blocks)."""
    rng = np.random.default_rng(seed)

    def encode(name: str, value: np.ndarray, kind: str):
        if kind in K_SCALE_OFFSETS:
            import gguf

            return _random_k_blocks(value.shape, kind, rng), gguf.GGMLQuantizationType[kind]
        return quantize_tensor(name, value, kind)

    return gguf_writer.write_gguf(hf_dir, out, qtype, encode=encode)


def _random_k_blocks(shape: tuple[int, ...], qtype: str, rng: np.random.Generator) -> np.ndarray:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    *rows, cols = shape  # 2-D weights, or 3-D stacked experts
    if cols % block:
        raise ValueError(f"{qtype} needs rows of a multiple of {block} values; got {cols}")
    blocks = rng.integers(0, 256, size=(*rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    for offset in K_SCALE_OFFSETS[qtype]:
        blocks[..., offset:offset + 2] = scale
    return blocks.reshape(*rows, -1)
