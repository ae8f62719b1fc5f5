"""Decode-attention split granularity vs batch-1 decode speed, at a short and a long context (Llama-3.1-8B shape).

    python scripts/gpu_split_sweep.py

For each minimum split size (each twice, interleaved), builds a dummy-weight engine (CUDA graphs on) and reports
the wall time per decode step after a 128-token and after a 6000-token prompt. A tuning experiment, not a test: it prints one table.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from pathlib import Path

import torch

from xinf_sglang.runtime import Engine, EngineConfig, SamplingParams
from xinf_sglang.runtime.layers.attention import triton_backend as attention_triton

CONFIG = Path(__file__).parent.parent / "configs" / "llama-3.1-8b.json"


def decode_ms(engine: Engine, prompt_len: int, steps: int = 128) -> float:
    """Wall time per decode step, from the engine's own step accounting (prefill steps excluded)."""
    prompt = [[1000 + i % 50000 for i in range(prompt_len)]]
    params = SamplingParams(temperature=0.0, max_new_tokens=steps, ignore_eos=True)
    engine.generate(input_ids=prompt, sampling_params=params)  # warm-up
    before = engine.metrics()
    engine.generate(input_ids=prompt, sampling_params=params)
    after = engine.metrics()
    seconds = after["decode_seconds_total"] - before["decode_seconds_total"]
    return seconds / (after["decode_steps"] - before["decode_steps"]) * 1e3


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    shutil.copy(CONFIG, tmp / "config.json")
    original = attention_triton.TritonAttentionBackend.__init__
    print(f"{'min split tokens':>17}{'ms/token @128':>15}{'ms/token @6000':>16}")
    for min_split in (64, 128, 256, 64, 128, 256):  # twice each, interleaved: clock drift shows as a difference
        def patched(self, *a, _m=min_split, **kw):
            kw["min_split_tokens"] = _m
            original(self, *a, **kw)
        attention_triton.TritonAttentionBackend.__init__ = patched
        engine = Engine(EngineConfig(model_path=str(tmp), load_format="dummy", skip_tokenizer_init=True,
                                     context_length=8192, max_running_requests=16, cuda_graph_max_bs=16))
        print(f"{min_split:>17}{decode_ms(engine, 128):>15.3f}{decode_ms(engine, 6000):>16.3f}", flush=True)
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    attention_triton.TritonAttentionBackend.__init__ = original


if __name__ == "__main__":
    main()
