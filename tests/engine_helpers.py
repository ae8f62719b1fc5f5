"""Helpers shared by the engine tests: prompts of varied lengths and HF reference generations."""

from __future__ import annotations

import functools
import json.decoder
import json.encoder
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from xinf_sglang.runtime import Engine, EngineConfig, SamplingParams

CORPUS = Path(json.decoder.__file__).read_text() + Path(json.encoder.__file__).read_text()


def varied_prompts(model_dir: Path, count: int, min_len: int = 4, max_len: int = 120, seed: int = 0) -> list[list[int]]:
    """``count`` token-id prompts with lengths spread over [min_len, max_len], cut from a fixed corpus."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.encode(CORPUS, add_special_tokens=False)
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(count):
        length = min_len + (max_len - min_len) * i // max(1, count - 1)
        start = int(torch.randint(0, len(ids) - length, (1,), generator=gen))
        prompts.append(ids[start : start + length])
    return prompts


@functools.lru_cache(maxsize=16)
def _hf_model(model_dir: str, gguf_file: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra).to(device).eval()
    # EOS ignored, as the runtime's ignore_eos: no stopping and no EOS ban (min_new_tokens would ban it).
    model.generation_config.eos_token_id = None
    return model


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int, gguf_file: str | None = None,
              device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[int]:
    """HF ``generate``, greedy, one prompt at a time (no padding), EOS ignored; ``gguf_file``: load that GGUF
    file of ``model_dir`` with transformers' GGUF reader; ``device`` / ``dtype``: where and in what HF runs (the
    GPU tier compares with HF on the same GPU)."""
    model = _hf_model(str(model_dir), gguf_file, device, dtype)
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        # An explicit mask: HF infers one from pad_token_id otherwise, which hides every prompt token equal to it.
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
    tokens = out[0, len(prompt):].tolist()
    assert len(tokens) == max_new_tokens, "HF stopped early: EOS was not ignored"
    return tokens


def make_engine(model_dir: Path, **overrides) -> Engine:
    """A CPU float32 engine that checks its idle invariant whenever it goes idle."""
    cfg = dict(model_path=str(model_dir), device="cpu", dtype="float32", debug_invariants=True)
    cfg.update(overrides)
    return Engine(EngineConfig(**cfg))


def engine_greedy(model: Path, prompts: list[list[int]], new_tokens: int, **overrides) -> list[list[int]]:
    """sglite's greedy tokens (EOS ignored) for ``prompts`` on a fresh `make_engine`, whose idle invariant must
    hold afterwards."""
    engine = make_engine(model, **overrides)
    try:
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        assert engine.check_invariants() == []
        return [o.token_ids for o in outs]
    finally:
        engine.shutdown()
