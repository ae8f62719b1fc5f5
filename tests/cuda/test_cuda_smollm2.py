"""The real SmolLM2-135M-Instruct (the ``smollm2`` fixture) on the GPU against HF transformers on the same GPU:

- float32: greedy tokens identical to HF ``generate`` for every prompt (chat-templated questions and plain text
  cuts of 8 to ~300 tokens, submitted together);
- bfloat16: no identity is expected, so both sides are measured against HF float32 by their agreeing prefixes:
  HF bfloat16's own agreement is the yardstick, sglite's must reach ``BF16_SHARE`` of it;
- the ``.gguf`` file loaded directly, float32, its Q4_1 linears and Q8_0 embedding kept in their blocks (the Triton
  GGUF kernels) and dequantized at load (``gguf_dequantize``): both identical to HF float32 (the HF folder was
  converted from the same file, so the weights are the same numbers);
- a chat extraction constrained to a JSON schema parses and satisfies it.

On a machine without network access the fixture's GGUF comes from scripts/prepare_offline_wheels.py --smollm2.
The CPU tier: tests/test_real_model.py."""

from __future__ import annotations

import json

import pytest
import torch

from . import require_gpus

require_gpus()
pytestmark = pytest.mark.cuda

from xinf_sglang.runtime import SamplingParams  # noqa: E402

from ..engine_helpers import CORPUS, hf_greedy, make_engine  # noqa: E402
from ..grammar_cases import PERSON  # noqa: E402

NEW_TOKENS = 64
DEVICE = "cuda"
BF16_SHARE = 0.9
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain what a prime number is.",
    "List three colours.", "Translate 'good morning' into Spanish.", "How many legs does a spider have?",
    "Give me a recipe for pancakes.", "Why is the sky blue?", "Name two planets.", "What is 12 times 7?",
    "Describe a cat in one sentence.", "Who wrote Romeo and Juliet?", "What is photosynthesis?",
    "Suggest a name for a dog.", "What day comes after Monday?", "Explain gravity to a child.",
]


@pytest.fixture(scope="module")
def case(smollm2):
    """(HF folder, tokenizer, 32 prompts: chat questions and corpus cuts of 8-~300 tokens, HF float32 greedy
    references on the GPU)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.hf_dir)
    chats = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    ids = tok.encode(CORPUS, add_special_tokens=False)
    span = len(ids) - 300  # every cut starts early enough to hold its ~300 tokens
    plain = [ids[(i * 997) % span :][: 8 + 292 * i // (len(chats) - 1)] for i in range(len(chats))]
    prompts = [p for pair in zip(chats, plain) for p in pair]
    return smollm2.hf_dir, tok, prompts, [hf_greedy(smollm2.hf_dir, p, NEW_TOKENS, device=DEVICE) for p in prompts]


def sglite_greedy(model_path, prompts: list[list[int]], dtype: str, **overrides) -> list[list[int]]:
    with make_engine(model_path, device=DEVICE, dtype=dtype, max_total_tokens=65536, **overrides) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        assert engine.check_invariants() == []
    return [o.token_ids for o in outs]


def agreeing_tokens(outs: list[list[int]], refs: list[list[int]]) -> int:
    """Tokens in the prefixes where ``outs`` equal ``refs``, summed over the prompts."""
    return sum(next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r)) for o, r in zip(outs, refs))


def test_float32_equals_hf(case) -> None:
    model_dir, _, prompts, refs = case
    assert sglite_greedy(model_dir, prompts, "float32") == refs


@pytest.mark.parametrize("dequantize", [False, True], ids=["kept", "dequantized"])
def test_gguf_file_float32_equals_hf(case, smollm2, dequantize: bool) -> None:
    _, _, prompts, refs = case
    assert sglite_greedy(smollm2.gguf, prompts, "float32", gguf_dequantize=dequantize) == refs


def test_bfloat16_agrees_with_hf_float32_as_hf_bfloat16_does(case) -> None:
    model_dir, _, prompts, refs = case
    hf16 = agreeing_tokens([hf_greedy(model_dir, p, NEW_TOKENS, device=DEVICE, dtype=torch.bfloat16)
                            for p in prompts], refs)
    sg16 = agreeing_tokens(sglite_greedy(model_dir, prompts, "bfloat16"), refs)
    assert sg16 >= BF16_SHARE * hf16, f"sglite bf16 {sg16} vs HF bf16 {hf16} of {NEW_TOKENS * len(prompts)} tokens"


def test_json_schema_extraction(case) -> None:
    model_dir, tok, _, _ = case
    messages = [{"role": "user", "content": "Extract the person as JSON: Alice Smith is 31 years old."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with make_engine(model_dir, device=DEVICE, max_total_tokens=65536) as engine:
        [out] = engine.generate(prompt=[prompt], sampling_params=SamplingParams(
            temperature=0.0, max_new_tokens=96, json_schema=PERSON))
    value = json.loads(out.text)
    assert set(value) == {"name", "age"}, out.text
    assert isinstance(value["name"], str) and len(value["name"]) <= 20, out.text
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool), out.text
