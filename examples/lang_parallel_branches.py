"""Parallel branches with ``fork``: one document, several questions answered at once. The branches run
concurrently and share the document's KV through the server's radix cache: only the first branch pays for the
document's prefill (the printed cached-token counts show it).

Serve a model first: ``sglite demo --keep-serving`` (model uid ``sglite-demo``; ``lang_json_extraction.py`` says
how to serve the real SmolLM2 or any chat model instead).

Then::

    python examples/lang_parallel_branches.py
"""

from __future__ import annotations

import argparse

import xinf_sglang.lang as sgl

DOCUMENT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after the "
    "engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. It is 330 metres tall "
    "and was the tallest man-made structure in the world until 1930."
)
QUESTIONS = ["Who is the tower named after?", "How tall is it?", "In which city is it?", "When was it built?"]


@sgl.function
def answer_all(s, document, questions):
    s += sgl.system("Answer in one short sentence.")
    s += sgl.user("Read this text.\n" + document)
    s += sgl.assistant("I have read it.")
    forks = s.fork(len(questions))
    for branch, question in zip(forks, questions):
        branch += sgl.user(question)
        branch += sgl.assistant(sgl.gen("answer", max_tokens=32))
    forks.join()  # gathers: s["answer"] is the list of the branches' answers, in order
    s += sgl.user("Summarise the text in five words.")
    s += sgl.assistant(sgl.gen("summary", max_tokens=24))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="http://127.0.0.1:9997")
    parser.add_argument("--model", default="sglite-demo", help="the model uid on the server")
    parser.add_argument("--api-key", default="none")
    args = parser.parse_args()
    sgl.set_default_backend(sgl.OpenAI(args.model, base_url=args.endpoint + "/v1", api_key=args.api_key))
    state = answer_all.run(DOCUMENT, QUESTIONS, temperature=0)
    for question, answer in zip(QUESTIONS, state["answer"]):
        print(f"Q: {question}\nA: {answer.strip()}")
    print(f"Summary: {state['summary'].strip()}")
    meta = state.get_meta_info("summary")
    print(f"the last gen read {meta['prompt_tokens']} prompt tokens, {meta['cached_tokens']} from the prefix cache")


if __name__ == "__main__":
    main()
