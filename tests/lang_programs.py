"""SGLang programs shared by the frontend-language tests of both backends (``test_lang.py`` embedded,
``test_lang_xinference.py`` over HTTP): the list of issue 19 point 7, written as a user would write them."""

from __future__ import annotations

import json
import re

import xinf_sglang.lang as sgl

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
CALL = {  # the calculator tool's call: an operation on two integers
    "type": "object",
    "properties": {"a": {"type": "integer"}, "op": {"enum": ["+", "-", "*"]}, "b": {"type": "integer"}},
    "required": ["a", "op", "b"],
    "additionalProperties": False,
}
SHARED_PREFIX = "Facts about animals, one line each.\n" + "".join(f"Fact {i}: animals need water.\n" for i in range(12))
LOOKUP = {"paris": "Paris is the capital of France.", "france": "France is a country in Europe."}


@sgl.function
def few_shot(s, word):
    s += "English: cat\nFrench: chat\nEnglish: dog\nFrench: chien\nEnglish: " + word + "\nFrench:"
    s += sgl.gen("french", max_tokens=16, stop="\n")


@sgl.function
def multi_turn(s, first, second):
    s += sgl.user(first)
    s += sgl.assistant(sgl.gen("a1", max_tokens=40))
    with s.user():
        s += second
    s += sgl.assistant(sgl.gen("a2", max_tokens=40))


@sgl.function
def capital(s, method):
    s += sgl.user("Which is the capital of France: Berlin, Madrid or Paris?")
    s += sgl.assistant(sgl.select("city", ["Berlin", "Madrid", "Paris"], choices_method=method))


@sgl.function
def copy_word(s, method):
    s += "Copy the word.\nWord: ostrich\nCopy: ostrich\nWord: lantern\nCopy: lantern\nWord: pebble\nCopy:"
    s += sgl.select("copy", [" banana", " pebble", " ostrich"], choices_method=method)


@sgl.function
def constrained(s):
    s += sgl.user("John is 31 years old. Extract his name and age as JSON.")
    s += sgl.assistant(sgl.gen("person", max_tokens=48, json_schema=PERSON))
    s += sgl.user("How many legs does a spider have? Answer with a number.")
    s += sgl.assistant(sgl.gen_int("legs", max_tokens=8))
    s += sgl.user("What time is it? Answer like 10 am.")
    s += sgl.assistant(sgl.gen("time", max_tokens=8, regex=r"(1[0-2]|[1-9]) (am|pm)"))


@sgl.function
def branches(s, topics, join_mode):
    s += SHARED_PREFIX
    forks = s.fork(len(topics))
    forks += lambda i: f"A short fact about {topics[i]}:"
    forks += sgl.gen("fact", max_tokens=12, stop="\n")
    forks.join(join_mode)
    s += "\nDone."


@sgl.function
def tool_loop(s, question, max_calls=2):
    """A tool-use loop: the model writes calculator calls as JSON (schema-constrained), the program runs them."""
    s += sgl.system("You can use a calculator. Reply with a JSON call {\"a\", \"op\", \"b\"}.")
    s += sgl.user(question)
    for step in range(max_calls):
        s += sgl.assistant(sgl.gen(f"call{step}", max_tokens=40, json_schema=CALL))
        call = json.loads(s[f"call{step}"])
        result = {"+": call["a"] + call["b"], "-": call["a"] - call["b"], "*": call["a"] * call["b"]}[call["op"]]
        s += sgl.user(f"Result: {result}. Call again or answer.")
    s += sgl.assistant("The answer is " + sgl.gen_int("answer", max_tokens=8))


@sgl.function
def react(s, question, max_steps=3):
    """ReAct: Thought, then Action (a select among the tools), then the Observation the program looks up."""
    s += "Answer the question using the tools search[term] and finish[answer].\n"
    s += f"Question: {question}\n"
    for step in range(max_steps):
        s += f"Thought {step}:" + sgl.gen(f"thought{step}", max_tokens=24, stop="\n") + "\n"
        s += f"Action {step}: " + sgl.select(f"action{step}", ["search", "finish"]) + "["
        if s[f"action{step}"] == "finish":
            s += sgl.gen("answer", max_tokens=12, stop="]") + "]\n"
            return
        s += sgl.select(f"term{step}", list(LOOKUP)) + "]\n"
        s += f"Observation {step}: {LOOKUP[s[f'term{step}']]}\n"
    s += "Final answer:" + sgl.gen("answer", max_tokens=12, stop="\n")


@sgl.function
def numbered(s, index):
    s += f"Item {index}:"
    s += sgl.gen("text", max_tokens=4)


def check_constrained(state) -> None:
    """What ``constrained`` must produce on any model: a schema-valid person, an int, a regex match."""
    person = json.loads(state["person"])
    assert set(person) == {"name", "age"} and isinstance(person["age"], int), person
    assert re.fullmatch(r"[-+]?[0-9]+[ \n]*", state["legs"]), state["legs"]  # SGLang's REGEX_INT
    assert re.fullmatch(r"(1[0-2]|[1-9]) (am|pm)", state["time"]), state["time"]
