"""A multi-step agent in plain Python with the SGLang frontend language: the model picks a tool with ``select``
(whole-choice log probabilities, not a first-token guess), writes the tool's argument as schema-constrained JSON,
the program runs the tool and appends the observation, until the model chooses ``finish``.

Serve a model first: ``sglite demo --keep-serving`` (model uid ``sglite-demo``; ``lang_json_extraction.py`` says
how to serve the real SmolLM2 or any chat model instead).

Then::

    python examples/lang_agent.py --question "What is 17 times 23, plus 5?"
"""

from __future__ import annotations

import argparse
import json

import xinf_sglang.lang as sgl

CALC = {
    "type": "object",
    "properties": {"a": {"type": "number"}, "op": {"enum": ["+", "-", "*", "/"]}, "b": {"type": "number"}},
    "required": ["a", "op", "b"],
    "additionalProperties": False,
}
FACTS = {"paris": "Paris is the capital of France.", "everest": "Mount Everest is 8849 metres high."}


def calculator(call: dict) -> str:
    a, b = call["a"], call["b"]
    ops = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b if b else "division by 0"}
    return str(ops[call["op"]]())


@sgl.function
def agent(s, question, max_steps=4):
    s += sgl.system("You solve tasks step by step with tools: calculator (JSON {a, op, b}), lookup (a topic), "
                    "finish (the final answer).")
    s += sgl.user(question)
    for step in range(max_steps):
        with s.assistant():
            s += f"Step {step}: I use the tool " + sgl.select(f"tool{step}", ["calculator", "lookup", "finish"])
        tool = s[f"tool{step}"]
        if tool == "finish":
            break
        if tool == "calculator":
            s += sgl.assistant(sgl.gen(f"arg{step}", max_tokens=48, json_schema=CALC))
            observation = calculator(json.loads(s[f"arg{step}"]))
        else:
            s += sgl.assistant(sgl.select(f"arg{step}", list(FACTS)))
            observation = FACTS[s[f"arg{step}"]]
        s += sgl.user(f"Observation: {observation.rstrip('.')}. Continue.")
    s += sgl.assistant("Final answer: " + sgl.gen("answer", max_tokens=48, stop="\n"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="http://127.0.0.1:9997")
    parser.add_argument("--model", default="sglite-demo", help="the model uid on the server")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--question", default="What is 17 times 23?")
    parser.add_argument("--stream", action="store_true", help="print the final answer as it is generated")
    args = parser.parse_args()
    sgl.set_default_backend(sgl.OpenAI(args.model, base_url=args.endpoint + "/v1", api_key=args.api_key))
    state = agent.run(args.question, temperature=0, stream=args.stream)
    if args.stream:
        for piece in state.text_iter("answer"):
            print(piece, end="", flush=True)
        print()
    for message in state.messages():
        print(f"[{message['role']}] {message['content']}")


if __name__ == "__main__":
    main()
