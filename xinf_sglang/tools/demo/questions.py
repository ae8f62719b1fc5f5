"""What ``sglite demo`` asks the served model, how it checks the answers, and how a user sends the same requests.

Two requests through Xinference's OpenAI-compatible API, both at temperature 0 so a real model's answers are
reproducible: a streamed chat question with a known answer, and a JSON-schema-constrained extraction of facts
stated in a sentence. SmolLM2-135M-Instruct answers both correctly (the prompt wording matters for a 135M model:
"Anna is 42 ..." comes back as age 22; this one does not). A random-weight model (``--tiny``) is checked for the
format only: the stream arrives and the JSON matches the schema, which the grammar guarantees whatever the weights.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .console import Checks, DemoError, say
from .model import DemoModel

QUESTION = "What is the capital of France?"
QUESTION_ANSWER = "Paris"  # must appear in the answer
EXTRACTION_PROMPT = "Maria is 25 years old and lives in Madrid. Extract her name, age and city as JSON."
EXTRACTION_ANSWER = {"name": "Maria", "age": 25, "city": "Madrid"}
# Every field bounded (string lengths, an integer range, no extra keys): the grammar then ends the answer within a
# few dozen tokens even on the random-weight model.
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "minLength": 1, "maxLength": 20},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}


def ask_question(client: Any, model_uid: str, model: DemoModel, checks: Checks) -> None:
    """Stream the chat answer to ``QUESTION`` to the terminal, then check it."""
    say(f"streaming a chat answer (POST /v1/chat/completions, stream=true, temperature 0) to: {QUESTION!r}")
    print("  assistant> ", end="", flush=True)
    parts: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=model_uid, messages=[{"role": "user", "content": QUESTION}], max_tokens=64, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            print(parts[-1], end="", flush=True)
        usage = chunk.usage or usage
    print(flush=True)
    tokens = usage.completion_tokens if usage is not None else 0
    checks.record("chat stream", usage is not None and tokens > 0,
                  f"{len(parts)} chunks, {tokens} completion tokens, usage reported: {usage is not None}")
    if model.random_weights:
        say("  (random weights: the words are noise, not checked)")
    else:
        answer = "".join(parts)
        checks.record("chat answer", QUESTION_ANSWER in answer, f"{QUESTION_ANSWER!r} in the answer")


def extract_person(client: Any, model_uid: str, model: DemoModel, checks: Checks) -> None:
    """Ask for ``EXTRACTION_PROMPT``'s facts as JSON matching ``PERSON_SCHEMA``; check the format and the values."""
    from openai import APIError

    say(f"structured output: {EXTRACTION_PROMPT!r} with response_format json_schema (temperature 0) ...")
    try:
        r = client.chat.completions.create(
            model=model_uid, messages=[{"role": "user", "content": EXTRACTION_PROMPT}],
            response_format=RESPONSE_FORMAT, max_tokens=64, temperature=0,
        )
    except APIError as e:
        raise DemoError(f"the JSON-schema request failed: {e} {getattr(e, 'body', '')}") from None
    text = r.choices[0].message.content or ""
    say(f"  answer ({r.choices[0].finish_reason}, {r.usage.completion_tokens} tokens): {text}")
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    problems = ["not JSON"] if value is None else schema_problems(value, PERSON_SCHEMA)
    checks.record("JSON schema", not problems, "; ".join(problems) or "the answer parses and matches the schema")
    if model.random_weights:
        say("  (random weights: the values are noise, not checked)")
    else:
        checks.record("extracted values", value == EXTRACTION_ANSWER,
                      f"expected {json.dumps(EXTRACTION_ANSWER)}, got {text}")


def schema_problems(value: Any, schema: dict[str, Any]) -> list[str]:
    """What in ``value`` breaks ``schema``, for the keywords ``PERSON_SCHEMA`` uses (an object of bounded strings
    and integers, required keys, no others): the demo's own check, with no jsonschema dependency."""
    if not isinstance(value, dict):
        return [f"not an object: {value!r}"]
    properties = schema["properties"]
    problems = [f"missing {k!r}" for k in schema.get("required", []) if k not in value]
    if schema.get("additionalProperties") is False:
        problems += [f"unexpected {k!r}" for k in value if k not in properties]
    for key, rule in properties.items():
        if key not in value:
            continue
        v = value[key]
        if rule["type"] == "string":
            ok = isinstance(v, str) and rule.get("minLength", 0) <= len(v) <= rule.get("maxLength", len(v))
        else:  # integer; bool is an int subclass but not a JSON integer
            ok = type(v) is int and rule.get("minimum", v) <= v <= rule.get("maximum", v)
        if not ok:
            problems.append(f"{key}={v!r} breaks {rule}")
    return problems


def print_howto(endpoint: str, model_uid: str, model_name: str) -> None:
    """The web UI address and the exact commands that send the demo's requests (curl and the OpenAI client)."""
    chat = {"model": model_uid, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64}
    extraction = {"model": model_uid, "messages": [{"role": "user", "content": EXTRACTION_PROMPT}],
                  "max_tokens": 64, "temperature": 0, "response_format": RESPONSE_FORMAT}
    client = f"from openai import OpenAI; c = OpenAI(base_url='{endpoint}/v1', api_key='x')"
    print(
        f"""
Web UI:        {endpoint}/   (Launch Model -> LLM -> {model_name} -> engine sglite)
OpenAI API:    {endpoint}/v1   (model: {model_uid})

Chat with curl:
  curl {endpoint}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{json.dumps(chat)}'

Structured output (JSON schema) with curl:
  curl {endpoint}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{json.dumps(extraction)}'
Also: extra_body={{"regex": ...}} / {{"choice": [...]}} / {{"ebnf": ...}} (or guided_regex / guided_choice /
      guided_grammar).

Or with the OpenAI client:
  {sys.executable} -c "{client}; \\
print(c.chat.completions.create(model='{model_uid}', messages=[{{'role': 'user', 'content': 'Hello!'}}], \\
max_tokens=32).choices[0].message.content)"

Runtime metrics (KV pool, batch, cache hits):
  {sys.executable} -c "from xinf_sglang.serving.metrics import get_runtime_metrics; \\
print(get_runtime_metrics('{endpoint}', '{model_uid}'))"
""",
        flush=True,
    )
