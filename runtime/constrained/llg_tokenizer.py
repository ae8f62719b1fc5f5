"""llguidance's tokenizer for the grammar backend: the `TokenTable` (derived and checked at startup), padded to
the logits width, with the EOS ids of the model, and the `TokenPolicy` of constrained output over it.

llguidance reads the table through a duck-typed source object (`_LLGuidanceSource`), which also tokenizes the text
a grammar forces (`TextTokenizer`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from .matcher import TokenPolicy
from .token_table import TokenTable, rust_backend, token_bytes
from .token_table_check import verify_token_bytes

__all__ = ["TextTokenizer", "llguidance_tokenizer", "lltokenizer"]

logger = logging.getLogger(__name__)


class _LLGuidanceSource:
    """The object ``llguidance.TokenizerWrapper`` reads: token bytes, special / EOS / BOS ids, a tokenize call."""

    def __init__(self, table: TokenTable, backend: Any, n_vocab: int, eos_ids: Sequence[int], bos: int | None):
        self.tokens = list(table.tokens) + [b""] * (n_vocab - len(table.tokens))  # padded rows: never allowed
        self.special_token_ids = sorted(table.special_ids)
        self.eos_token_id = int(eos_ids[0])
        self.bos_token_id = bos
        self._tokenize = TextTokenizer(table, backend)

    def __call__(self, text: str | bytes) -> list[int]:
        """Token ids whose table bytes spell ``text`` exactly (no BOS/EOS added)."""
        data = text if isinstance(text, bytes) else text.encode()
        return list(self._tokenize(data))


class TextTokenizer:
    """Tokenizes text a grammar forces (e.g. a JSON key) into tokens whose table bytes spell it exactly.

    llguidance allows the tokens it gets here, so they must add exactly the forced bytes. The tokenizer's own
    encoding is used when it does; a SentencePiece-style encode adds a leading ``▁`` (a space), so the text is
    then encoded after a newline whose tokens are dropped; failing both, greedy longest match over the table
    (always possible with byte tokens). llguidance calls this while filling masks too, from its fill threads,
    which take the GIL: results are cached (a hit holds the GIL for about a microsecond).
    """

    _PREFIX = "\n"

    def __init__(self, table: TokenTable, backend: Any, max_entries: int = 4096) -> None:
        self._table = table
        self._backend = backend
        self._prefix_ids = backend.encode(self._PREFIX, add_special_tokens=False).ids
        self._cached = functools.lru_cache(maxsize=max_entries)(self._tokenize)  # thread-safe

    def __call__(self, data: bytes) -> tuple[int, ...]:
        """Token ids spelling ``data`` (UTF-8 from llguidance; anything else is tokenized greedily). Only a byte
        that no token has (a vocabulary without byte tokens) cuts the result short, before that byte."""
        return self._cached(data)

    def _tokenize(self, data: bytes) -> tuple[int, ...]:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            return self._greedy(data)
        plain = self._backend.encode(text, add_special_tokens=False).ids
        if self._spells(plain, data):
            return tuple(plain)
        prefixed = self._backend.encode(self._PREFIX + text, add_special_tokens=False).ids
        rest = prefixed[len(self._prefix_ids) :]
        if prefixed[: len(self._prefix_ids)] == self._prefix_ids and self._spells(rest, data):
            return tuple(rest)
        return self._greedy(data)

    def _spells(self, ids: list[int], data: bytes) -> bool:
        # A special token spells its own name here: text naming a chat marker tokenizes to the marker, which the
        # token policy then refuses (a clean "special token" error instead of the marker spelled out as text).
        tokens = self._table.tokens
        return b"".join(tokens[i] for i in ids) == data

    @functools.cached_property
    def _by_bytes(self) -> dict[bytes, int]:
        """Bytes -> token id for the greedy fallback (built on first use; a race builds the same dict twice)."""
        # Equal bytes: the later id wins (a learned piece over a byte-fallback token).
        table = self._table
        return {data: i for i, data in enumerate(table.tokens) if data and i not in table.special_ids}

    def _greedy(self, data: bytes) -> tuple[int, ...]:
        """Longest match from the left; stops before a byte no token has (nothing can spell the rest)."""
        by_bytes = self._by_bytes
        longest = max(map(len, by_bytes), default=0)
        ids: list[int] = []
        pos = 0
        while pos < len(data):
            size = next((n for n in range(min(longest, len(data) - pos), 0, -1) if data[pos : pos + n] in by_bytes), 0)
            if size == 0:
                break
            ids.append(by_bytes[data[pos : pos + size]])
            pos += size
        return tuple(ids)


def lltokenizer(tokenizer: Any, table: TokenTable, n_vocab: int, eos_ids: Sequence[int]) -> Any:
    """llguidance's tokenizer over ``table``, with ``n_vocab`` rows (rows past the table are never allowed) and
    ``eos_ids`` as its end tokens.

    Raises:
        ConfigError: ``n_vocab`` is smaller than the table, ``eos_ids`` is empty, or llguidance rejects the table.
    """
    import llguidance

    if n_vocab < len(table.tokens):
        raise ConfigError(
            f"vocab_size {n_vocab} (logits width) is smaller than the tokenizer ({len(table.tokens)} tokens)"
        )
    if not eos_ids:
        raise ConfigError("eos_token_ids must list at least one token id")
    bos = getattr(tokenizer, "bos_token_id", None)
    source = _LLGuidanceSource(table, rust_backend(tokenizer), n_vocab, eos_ids, None if bos is None else int(bos))
    try:
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(source), eos_token=[int(i) for i in eos_ids])
    except Exception as exc:  # llguidance's own validation of the table
        raise ConfigError(f"llguidance cannot use this tokenizer's token table: {exc}") from exc


def llguidance_tokenizer(
    tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int] | None
) -> tuple[Any, TokenPolicy]:
    """llguidance's tokenizer over the token table derived from ``tokenizer``'s decoder and checked against its
    decode for every token (`token_table`), padded to ``vocab_size`` rows, and the token policy over it.

    ``eos_token_ids``: the ids that end generation; None = the tokenizer's ``eos_token_id``.

    Raises:
        ConfigError: no fast tokenizer, a table llguidance rejects or that disagrees with the tokenizer,
            ``vocab_size`` smaller than the tokenizer, EOS ids missing or out of range.
    """
    table = token_bytes(tokenizer)
    start = time.perf_counter()
    verify_token_bytes(tokenizer, table)
    logger.debug("grammar token table (%s, %d tokens) verified in %.0f ms", table.decoder, len(table.tokens),
                 1000 * (time.perf_counter() - start))
    lltok = lltokenizer(tokenizer, table, vocab_size, _eos_ids(tokenizer, eos_token_ids, len(table.tokens)))
    return lltok, _token_policy(lltok, tokenizer, vocab_size, eos_token_ids)


def _token_policy(lltok: Any, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int] | None) -> TokenPolicy:
    num_tokens = _num_tokens(tokenizer)
    # llguidance's special tokens are the token table's (added tokens marked special and HF's special ids), plus
    # any token whose bytes start with llguidance's special marker 0xFF (never valid UTF-8, so never in output).
    special = {i for i in range(num_tokens) if lltok.is_special_token(i)}
    return TokenPolicy.build(vocab_size, num_tokens, special, _eos_ids(tokenizer, eos_token_ids, num_tokens))


def _num_tokens(tokenizer: Any) -> int:
    backend = tokenizer.backend_tokenizer
    return max(len(tokenizer), backend.get_vocab_size(with_added_tokens=True))


def _eos_ids(tokenizer: Any, eos_token_ids: Sequence[int] | None, num_tokens: int) -> list[int]:
    if eos_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ConfigError("the tokenizer has no eos_token_id; pass eos_token_ids to the grammar backend")
        ids = [int(eos)]
    else:
        ids = [int(i) for i in eos_token_ids]
        if not ids:
            raise ConfigError("eos_token_ids must list at least one token id")
    bad = [i for i in ids if not 0 <= i < num_tokens]
    if bad:
        raise ConfigError(f"eos_token_ids must be token ids in [0, {num_tokens}); got {bad}")
    return sorted(set(ids))
