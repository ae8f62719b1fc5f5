"""``RequestBuilder``: the scheduler side's ``Req`` for an add-request message.

The message (``messages.NewRequest``) holds plain values only; what cannot cross a process boundary is made
here, on the side that uses it: the incremental detokenizer and the stop-string matcher (the output processor
runs them after sampling), the seeded generator and the logit bias tensors (on the model's device) and the grammar
matcher (from the compiled grammar the message carries: the scheduler thread never compiles).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..constrained import GrammarBackend
from .detokenizer import IncrementalDetokenizer, StopStringMatcher
from ..engine.messages import NewRequest
from .schedule_batch import Req
from ..sampling.sampler import make_generator
from ..sampling.sampling_batch import RequestBias

__all__ = ["RequestBuilder"]


class RequestBuilder:
    """Builds ``Req``s on the scheduler side.

    ``tokenizer`` is None when the engine runs with ``skip_tokenizer_init`` (then the engine has refused stop
    strings and grammars). ``grammar_backend`` is called the first time a constrained request arrives.
    """

    def __init__(self, tokenizer: Any, device: torch.device, grammar_backend: Callable[[], GrammarBackend]) -> None:
        self.tokenizer = tokenizer
        self.device = device
        self.grammar_backend = grammar_backend

    def build(self, msg: NewRequest) -> Req:
        """The request of ``msg``, ready to queue.

        Raises:
            InvalidRequestError: its grammar does not compile here. The engine attached the compiled grammar, so
                in the engine's process this cannot happen; a message from another process arrives without it
                (it does not pickle) and the scheduler's own backend compiles it once (the same grammar, the same
                result).
        """
        ids = list(msg.input_ids)
        req = Req(
            rid=msg.rid,
            input_ids=ids,
            params=msg.params,
            stop_token_ids=msg.stop_token_ids,
            max_new_tokens=msg.max_new_tokens,
            arrival=msg.arrival,
            priority=msg.priority,
        )
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer, msg.params.skip_special_tokens, prompt_ids=ids)
        req.stop_matcher = StopStringMatcher(msg.params.stop or [])
        req.generator = make_generator(msg.params.seed, self.device)
        req.logit_bias = RequestBias.of(msg.params.logit_bias, self.device)  # once, not at every step
        if msg.params.wants_prompt_logprobs:
            req.prompt_logprobs = []
        if msg.params.structured is not None:
            backend = self.grammar_backend()
            compiled = msg.grammar if msg.grammar is not None else backend.compile(msg.params.structured)
            req.grammar = backend.new_matcher(compiled)
        return req
