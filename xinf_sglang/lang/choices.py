"""How ``select`` picks one of its choices from the log probabilities of each whole choice.

A backend scores every choice as a continuation of the program's text and returns, per choice, the log
probability of each of its tokens (``TokenScore``; only tokens that were scored: none is ``None``). A method turns
those into a decision and the meta info ``get_meta_info(name)`` returns. The three methods of SGLang:

- ``token_length_normalized`` (default): the highest mean token logprob.
- ``greedy_token_selection``: compare the choices token by token, keeping those with the best logprob at each
  position; a shorter choice is padded with its own mean logprob.
- ``unconditional_likelihood_normalized``: the highest mean logprob minus the choice's mean logprob without the
  program's text (scored after a neutral context: the opening of the current role, see ``executor.py``), which
  corrects for choices that are likely whatever was asked.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class TokenScore(NamedTuple):
    """One scored token: as SGLang's ``(logprob, token_id, text)`` triples (``token_id`` is None over HTTP)."""

    logprob: float
    token_id: int | None
    text: str | None


@dataclass(frozen=True)
class ChoicesDecision:
    """The chosen string and what it was chosen from (``get_meta_info``)."""

    decision: str
    meta_info: dict[str, Any] = field(default_factory=dict)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of equal maxima


class ChoicesMethod(ABC):
    """A way to pick a choice from per-token scores."""

    needs_unconditional: bool = False
    """Whether the backend must also score each choice without the program's text."""

    def __call__(
        self, choices: list[str], scores: list[list[TokenScore]], unconditional: list[list[TokenScore]] | None = None
    ) -> ChoicesDecision:
        """The decision over ``choices`` (``scores[i]``: the scored tokens of choice i, at least one each)."""
        normalized = [_mean([t.logprob for t in s]) for s in scores]
        meta = {"normalized_prompt_logprobs": normalized, "input_token_logprobs": scores}
        best, extra = self.pick(normalized, scores, unconditional)
        return ChoicesDecision(choices[best], {**meta, **extra})

    @abstractmethod
    def pick(
        self, normalized: list[float], scores: list[list[TokenScore]], unconditional: list[list[TokenScore]] | None
    ) -> tuple[int, dict[str, Any]]:
        """(index of the choice, the method's own meta info)."""

    def __repr__(self) -> str:
        return type(self).__name__


class TokenLengthNormalized(ChoicesMethod):
    """The choice with the highest mean token logprob."""

    def pick(self, normalized, scores, unconditional):
        return _argmax(normalized), {}


class GreedyTokenSelection(ChoicesMethod):
    """Token by token: keep the choices with the best logprob at each position until one is left."""

    def pick(self, normalized, scores, unconditional):
        width = max(len(s) for s in scores)
        matrix = [[t.logprob for t in s] + [mean] * (width - len(s)) for s, mean in zip(scores, normalized)]
        remaining = list(range(len(scores)))
        for j in range(width):
            best = max(matrix[i][j] for i in remaining)
            remaining = [i for i in remaining if matrix[i][j] == best]
            if len(remaining) == 1:
                break
        return remaining[0], {"greedy_logprob_matrix": matrix}


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    """The choice with the highest mean logprob minus its mean logprob after a neutral context."""

    needs_unconditional = True

    def pick(self, normalized, scores, unconditional):
        if unconditional is None or len(unconditional) != len(scores):
            raise ValueError("unconditional_likelihood_normalized needs the unconditional scores of every choice")
        base = [_mean([t.logprob for t in u]) for u in unconditional]
        relative = [n - b for n, b in zip(normalized, base)]
        return _argmax(relative), {
            "unconditional_token_logprobs": unconditional,
            "normalized_unconditional_prompt_logprobs": relative,
        }


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
