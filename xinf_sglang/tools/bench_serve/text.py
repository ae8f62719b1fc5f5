"""Random prompt text of a given token length, drawn from a tokenizer's vocabulary.

Prompts go out as text, not token-id lists: Xinference 4.1's ``/v1/completions`` declares ``prompt: str`` and
sglite's engine takes one prompt string per request. The rule (deterministic for a seed and a tokenizer):

1. the vocabulary is every non-special id whose own decoding is printable text (no U+FFFD from a partial UTF-8
   byte, no control character): those texts re-tokenize stably;
2. ``n`` ids are drawn uniformly from it with the caller's ``random.Random``, and decoded;
3. the text is re-encoded and cut to ``n`` tokens, then decoded again (re-tokenizing may merge ids across their
   boundaries, so the round trip, not the draw, fixes the text).

The result re-encodes to at most about ``n`` tokens; what the server reports in ``usage.prompt_tokens`` (chat
templates add their own tokens) is what the benchmark counts.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    """A ``tokenizer.json`` file, or the one in folder ``path``; a clear error when there is none."""
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise SystemExit(f"--tokenizer {path}: no tokenizer.json there (give a HF model folder or the file itself)")
    return Tokenizer.from_file(str(file))


class RandomText:
    """Random text of about ``n`` tokens of one tokenizer (the module docstring states the rule)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        special = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
        self.vocab = [i for i in range(tokenizer.get_vocab_size()) if i not in special and self._printable(i)]
        if not self.vocab:
            raise SystemExit("the tokenizer has no token that decodes to printable text")

    def text(self, rng: random.Random, n: int) -> str:
        """``n`` random vocabulary ids as text, after one encode round trip cut to ``n`` tokens."""
        drawn = [rng.choice(self.vocab) for _ in range(n)]
        ids = self._tokenizer.encode(self._tokenizer.decode(drawn), add_special_tokens=False).ids[:n]
        return self._tokenizer.decode(ids)

    def count(self, text: str) -> int:
        """Tokens of ``text`` without special tokens (what a completions prompt costs, before any template)."""
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def _printable(self, token_id: int) -> bool:
        text = self._tokenizer.decode([token_id])
        return bool(text) and "\ufffd" not in text and text.isprintable()
