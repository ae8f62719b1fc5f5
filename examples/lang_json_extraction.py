"""Structured extraction with the SGLang frontend language on a model served by Xinference: each record becomes JSON
that fits a schema (the server masks logits, so the output always parses), then a ``select`` classifies it.

Serve a model first; ``sglite demo --keep-serving`` starts Xinference on 127.0.0.1:9997 with the model uid
``sglite-demo`` (the tiny random demo checkpoint: gibberish text, real serving path), or the real SmolLM2::

    sglite fetch-smollm2                  # prints its hf_dir
    sglite demo --keep-serving --model-dir ~/.cache/sglite/smollm2-135m-instruct/hf-float32

Any chat model served on sglite works (``xinference launch --model-engine sglite --model-name qwen2.5-instruct
...``): roles are rendered with the chat template of the model's Xinference registration.

Then: ``python examples/lang_json_extraction.py``. ``--embedded /path/to/checkpoint`` runs the same
program on the engine inside this process instead (no server).
"""

from __future__ import annotations

import argparse
import json

import xinf_sglang.lang as sgl

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 30},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
RECORDS = [
    "John Smith is 31 years old and lives in Paris.",
    "Maria, aged 45, moved to Madrid last year.",
    "Our new colleague Ken (27) commutes from Berlin.",
]


@sgl.function
def extract(s, record):
    s += sgl.system("You extract facts from text as JSON.")
    s += sgl.user(f"Text: {record}\nGive name, age and city as JSON.")
    s += sgl.assistant(sgl.gen("person", max_tokens=64, json_schema=PERSON))
    s += sgl.user("Is this person younger than 40? Answer yes or no.")
    s += sgl.assistant(sgl.select("young", ["yes", "no"]))


def backend(args: argparse.Namespace) -> sgl.Backend:
    if args.embedded:
        return sgl.Runtime(model_path=args.embedded, device=args.device)
    return sgl.OpenAI(args.model, base_url=args.endpoint + "/v1", api_key=args.api_key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="http://127.0.0.1:9997")
    parser.add_argument("--model", default="sglite-demo", help="the model uid on the server")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--embedded", help="a checkpoint folder: run on the embedded engine instead of a server")
    parser.add_argument("--device", default="cpu", help="with --embedded: cpu or cuda")
    args = parser.parse_args()
    sgl.set_default_backend(backend(args))
    # run_batch sends the programs concurrently: the server batches them and shares the system prompt's KV.
    states = extract.run_batch([{"record": r} for r in RECORDS], temperature=0, progress_bar=True)
    for record, state in zip(RECORDS, states):
        person = json.loads(state["person"])  # always parses: the schema constrained the decoding
        scores = state.get_meta_info("young")["normalized_prompt_logprobs"]
        print(f"{record}\n  -> {person}  young: {state['young']} (mean logprobs yes/no {scores[0]:.2f}/{scores[1]:.2f})")


if __name__ == "__main__":
    main()
