"""The SGLang frontend language on sglite: ``import xinf_sglang.lang as sgl``.

An SGLang program runs by changing its import line::

    import xinf_sglang.lang as sgl

    @sgl.function
    def qa(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=64))

    sgl.set_default_backend(sgl.OpenAI("my-model", base_url="http://127.0.0.1:9997/v1"))  # served by Xinference
    # or: sgl.set_default_backend(sgl.Runtime(model_path="/path/to/checkpoint"))           # embedded engine
    print(qa.run(question="What is the capital of France?", temperature=0)["answer"])

Importing this package loads neither torch nor Xinference: ``Runtime`` imports the engine when it is built,
``OpenAI`` needs only the ``openai`` client.
"""

from .api import (
    assistant, assistant_begin, assistant_end, gen, gen_int, gen_string, select, system, system_begin, system_end,
    user, user_begin, user_end,
)
from .backends import Backend, OpenAI, Runtime
from .choices import (
    ChoicesDecision, ChoicesMethod, TokenScore, greedy_token_selection, token_length_normalized,
    unconditional_likelihood_normalized,
)
from .errors import LangError, ProgramError
from .function import SglFunction, function, set_default_backend
from .state import ProgramState, ProgramStateGroup

__all__ = [
    "Backend", "ChoicesDecision", "ChoicesMethod", "LangError", "OpenAI", "ProgramError", "ProgramState",
    "ProgramStateGroup", "Runtime", "SglFunction", "TokenScore", "assistant", "assistant_begin", "assistant_end",
    "function", "gen", "gen_int", "gen_string", "greedy_token_selection", "select", "set_default_backend", "system",
    "system_begin", "system_end", "token_length_normalized", "unconditional_likelihood_normalized", "user",
    "user_begin", "user_end",
]
