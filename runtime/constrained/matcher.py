"""Per-request grammar state: `GrammarMatcher` (the interface the scheduler uses) and its llguidance implementation.

One matcher follows one request's output token by token. Each decode step the scheduler calls `fill_bitmask`
for the request's row, samples from the masked logits, then `accept_token` with the sampled token:

- ``accept_token`` returns False when the token breaks the grammar (or is a token the runtime never lets a
  constrained request emit); the scheduler then aborts the request with `error()` as the message.
- ``is_terminated()`` after an accepted token means the grammar is complete and cannot be extended (or EOS was
  accepted): the request must stop there.

Token policy, enforced here on top of the grammar engine (`TokenPolicy`):

- special tokens (chat markers such as ``<|im_start|>``, ``<|im_end|>``, any added special token) are never
  allowed inside constrained output. llguidance allows a special token where a grammar literal spells its text
  (e.g. a JSON ``const`` of ``"<|im_start|>"``), so its mask is AND-ed with the policy's mask every step;
- EOS (the backend's EOS ids) is allowed exactly when the grammar may end (matcher accepting);
- padded vocabulary rows (logits wider than the tokenizer) are never allowed.

If the grammar can continue only with a forbidden token, the matcher records an error and its row allows only
EOS (so the sampler always sees a finite logit); the following `accept_token` returns False.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .spec import GrammarSpec

_MAX_ERROR_CHARS = 1000


class GrammarMatcher(ABC):
    """The grammar state of one request (see the module docstring for the per-step protocol).

    Not thread-safe: one request's matcher is driven by one thread at a time.
    """

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (CPU, int32, ``[B, ceil(vocab_size / 32)]``,
        contiguous). Every word of the row is overwritten; at least one token is always allowed."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by the sampled ``token_id``; False (and `error()` set, for good) when it is rejected."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """Whether the grammar is finished (complete and not extendable, or EOS accepted): stop the request."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> bool:
        """Undo the last ``num_tokens`` accepted tokens (speculative decoding); False if not possible."""

    @abstractmethod
    def error(self) -> str | None:
        """Why the matcher failed (rejected token, grammar limit hit), or None while it is healthy."""


@dataclass(frozen=True, eq=False)
class TokenPolicy:
    """Which token ids constrained output may ever contain, as packed masks and id sets (one per backend).

    ``text_mask``: every token of the tokenizer except special ones; ``eos_mask``: only the EOS ids. Both are
    read-only ``int32 [ceil(vocab_size / 32)]`` arrays in the bitmask layout.
    """

    vocab_size: int  # logits width; ids in [num_tokens, vocab_size) are padding
    num_tokens: int  # tokenizer size (added tokens included)
    eos_ids: frozenset[int]
    never_ids: frozenset[int]  # special tokens that are not EOS
    text_mask: np.ndarray
    eos_mask: np.ndarray

    @property
    def num_words(self) -> int:
        """int32 words per bitmask row."""
        return int(self.text_mask.shape[0])

    @classmethod
    def build(cls, vocab_size: int, num_tokens: int, special_ids: Iterable[int], eos_ids: Iterable[int]) -> TokenPolicy:
        """Masks for a vocabulary of ``num_tokens`` real tokens padded to ``vocab_size`` logits."""
        eos = frozenset(int(i) for i in eos_ids)
        never = frozenset(int(i) for i in special_ids) - eos
        text = np.zeros(vocab_size, dtype=bool)
        text[:num_tokens] = True
        text[list(never | eos)] = False
        eos_bits = np.zeros(vocab_size, dtype=bool)
        eos_bits[list(eos)] = True
        return cls(vocab_size, num_tokens, eos, never, _pack(text), _pack(eos_bits))


def _pack(allowed: np.ndarray) -> np.ndarray:
    """Bool per token -> packed int32 words (bit j of word w = token 32*w + j), read-only."""
    words = (allowed.shape[0] + 31) // 32
    padded = np.zeros(words * 32, dtype=bool)
    padded[: allowed.shape[0]] = allowed
    packed = np.packbits(padded, bitorder="little").view("<i4").astype(np.int32)
    packed.setflags(write=False)
    return packed


def check_bitmask(bitmask: torch.Tensor, num_words: int) -> None:
    """Raise ValueError unless ``bitmask`` is a contiguous CPU int32 ``[B, num_words]`` tensor (the grammar
    engine writes rows through raw pointers, so a wrong layout must never reach it)."""
    if (
        bitmask.dtype != torch.int32
        or bitmask.dim() != 2
        or bitmask.shape[1] != num_words
        or bitmask.device.type != "cpu"
        or not bitmask.is_contiguous()
    ):
        raise ValueError(
            f"bitmask must be a contiguous CPU int32 tensor [batch, {num_words}]; got {tuple(bitmask.shape)} "
            f"{bitmask.dtype} on {bitmask.device}{'' if bitmask.is_contiguous() else ' (not contiguous)'}"
        )


class LLGuidanceMatcher(GrammarMatcher):
    """`GrammarMatcher` over an ``llguidance.LLMatcher`` (a private copy of a compiled grammar's template)."""

    def __init__(self, ll_matcher: Any, policy: TokenPolicy, spec: GrammarSpec) -> None:
        """``ll_matcher``: a fresh ``llguidance.LLMatcher`` owned by this object; ``policy``: the backend's."""
        self._m = ll_matcher
        self._policy = policy
        self.spec = spec
        self._error: str | None = None

    # ------------------------------------------------------------------------------------------- mask filling

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        check_bitmask(bitmask, self._policy.num_words)
        if not 0 <= row < bitmask.shape[0]:
            raise IndexError(f"row {row} out of range for a bitmask of {bitmask.shape[0]} rows")
        words = bitmask.numpy()[row]
        if self._failed():
            words[:] = self._policy.eos_mask
            return
        self._m.unsafe_compute_mask_ptr(bitmask.data_ptr() + row * words.nbytes, words.nbytes)
        self.sanitize_row(words)

    def sanitize_row(self, words: np.ndarray) -> None:
        """Apply the token policy to a row llguidance just filled (in place; see the module docstring).

        Public for the backend's batched fill, which computes many rows in one llguidance call.
        """
        policy = self._policy
        if self._m.is_error():
            self._error = self._error or clean_error(self._m.get_error()) or "grammar engine error"
            words[:] = policy.eos_mask
            return
        np.bitwise_and(words, policy.text_mask, out=words)
        if self._m.is_accepting():
            np.bitwise_or(words, policy.eos_mask, out=words)
        elif not words.any():
            self._error = (
                "the grammar can only continue with a special token (e.g. a chat marker such as <|im_end|>), "
                "which constrained output never contains; spell such text differently in the grammar"
            )
            words[:] = policy.eos_mask

    # ------------------------------------------------------------------------------------------- state

    def accept_token(self, token_id: int) -> bool:
        if self._failed():
            return False
        token_id = int(token_id)  # numpy / torch scalars from the sampler
        policy = self._policy
        if not 0 <= token_id < policy.num_tokens:
            self._error = f"token {token_id} is outside the tokenizer's vocabulary [0, {policy.num_tokens})"
            return False
        if token_id in policy.eos_ids:
            if not self._m.is_accepting():
                self._error = f"EOS (token {token_id}) sampled before the grammar is complete"
                return False
        elif token_id in policy.never_ids:
            self._error = f"special token {token_id} is never allowed in constrained output"
            return False
        if not self._m.consume_token(token_id):
            self._error = clean_error(self._m.get_error()) or f"token {token_id} is not allowed by the grammar here"
            return False
        return True

    def is_terminated(self) -> bool:
        return self._error is None and not self._m.is_error() and self._m.is_stopped()

    def rollback(self, num_tokens: int) -> bool:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if self._failed():
            return False  # errors are sticky: the request is being aborted
        return num_tokens == 0 or bool(self._m.rollback(num_tokens))

    def error(self) -> str | None:
        if self._error is None and self._m.is_error():
            self._error = clean_error(self._m.get_error()) or "grammar engine error"
        return self._error

    def is_accepting(self) -> bool:
        """Whether the output so far is a complete sentence of the grammar (EOS would be accepted now)."""
        return not self._failed() and bool(self._m.is_accepting())

    @property
    def ll_matcher(self) -> Any:
        """The underlying ``llguidance.LLMatcher`` (for the backend's batched fill)."""
        return self._m

    def _failed(self) -> bool:
        return self._error is not None or self._m.is_error()


def clean_error(message: str) -> str:
    """llguidance's error message, trimmed for a request error: marker dropped, length bounded."""
    message = message.replace("<non-verbose/>", "").strip()
    return message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 3] + "..."


__all__ = ["GrammarMatcher", "LLGuidanceMatcher", "TokenPolicy", "check_bitmask", "clean_error"]
