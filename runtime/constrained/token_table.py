"""The grammar backend's token table: the exact bytes each token id adds to the output text.

A grammar engine masks tokens by their bytes, so those bytes must be what the tokenizer's own decode produces,
or a mask allows tokens that break the grammar (and forbids ones that fit). `token_bytes` derives them by running
each token string through the tokenizer's decoder pipeline, step by step:

- ``ByteLevel`` (GPT-2 style): every character of the token maps back to one byte through the byte alphabet; a
  token with a character outside the alphabet decodes to its own UTF-8 (what the Rust decoder does per token);
- ``ByteFallback``: ``<0xNN>`` is byte ``NN`` (a lone byte of a multi-byte character is only valid next to the
  others, which is the only way a grammar lets it through);
- ``Replace``, ``Metaspace`` (``▁`` -> space): applied to every token; ``Fuse``: nothing per token;
- effects that only touch the start or end of a whole decoded sequence are ignored: ``Metaspace`` dropping the
  first token's space, a ``Strip`` after ``Fuse``. Output is decoded after the prompt, where they do not apply;
- added tokens (non-special) go through the same decoder, as in the Rust tokenizer; special tokens (added with
  ``special=True`` and the HF tokenizer's ``all_special_ids``) get their content's UTF-8, which is only their name
  for the grammar engine: constrained output never contains them.

Any other decoder (``WordPiece``, ``BPEDecoder``, ``CTC``, none) joins or rewrites tokens depending on their
neighbours: no per-token table is exact, so it is a `ConfigError` naming it.

`token_table_check.verify_token_bytes` then checks the table against the tokenizer for every non-special token
id, so a decoder the derivation gets wrong is a startup error that names the tokens instead of masks that are
silently wrong. `llg_tokenizer.lltokenizer` builds llguidance's tokenizer from the table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError

__all__ = ["TokenTable", "rust_backend", "token_bytes"]

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte -> printable character map, inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    chars.update((b, chr(256 + n)) for n, b in enumerate(shifted))
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = MappingProxyType(_byte_level_alphabet())
_BYTE_LEVEL_TRANSLATE = MappingProxyType(str.maketrans({c: chr(b) for c, b in _BYTE_LEVEL.items()}))
_NOT_BYTE_LEVEL = re.compile("[^" + "".join(re.escape(c) for c in _BYTE_LEVEL) + "]")


@dataclass(frozen=True, eq=False)
class TokenTable:
    """Bytes of every token id (index = id) and the ids that are special (never part of constrained output).

    ``tokens[i]`` of a special token is its content's UTF-8; of an id the tokenizer does not define, ``b""``.
    """

    tokens: tuple[bytes, ...]
    special_ids: frozenset[int]
    decoder: str  # the decoder pipeline the bytes were derived from, e.g. "ByteLevel" (for messages)


# ----------------------------------------------------------------------------------------------- derivation

Piece = str | bytes  # a token on its way through the decoder: text, or bytes once a byte-producing step ran
Step = Callable[[list[Piece]], list[Piece]]  # one decoder step, applied to every token of the vocabulary


def token_bytes(tokenizer: Any) -> TokenTable:
    """Derive the `TokenTable` of a Hugging Face fast tokenizer from its decoder (see the module docstring).

    Raises:
        ConfigError: the tokenizer has no Rust backend, no decoder, or a decoder that has no per-token bytes.
    """
    backend = rust_backend(tokenizer)
    steps, decoder = _decoder_steps(backend)
    num_tokens = max(len(tokenizer), backend.get_vocab_size(with_added_tokens=True))
    special = _special_ids(tokenizer, backend, num_tokens)
    strings = [backend.id_to_token(i) or "" for i in range(num_tokens)]  # None: an id the tokenizer lacks
    pieces: list[Piece] = list(strings)
    for step in steps:  # step by step over the whole vocabulary: one Python call per step, not per token
        pieces = step(pieces)
    tokens = [p if isinstance(p, bytes) else p.encode() for p in pieces]
    for i in special:
        tokens[i] = strings[i].encode()
    return TokenTable(tuple(tokens), special, decoder)


def rust_backend(tokenizer: Any) -> Any:
    """The Rust ``tokenizers.Tokenizer`` behind a Hugging Face fast tokenizer; `ConfigError` if there is none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            "the llguidance grammar backend needs a Hugging Face fast tokenizer (with a Rust backend); "
            f"got {type(tokenizer).__name__}"
        )
    return backend


def _special_ids(tokenizer: Any, backend: Any, num_tokens: int) -> frozenset[int]:
    """Added tokens marked special, plus the HF tokenizer's special ids (either may list more)."""
    special = {int(i) for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    special.update(int(i) for i in getattr(tokenizer, "all_special_ids", ()) if 0 <= int(i) < num_tokens)
    return frozenset(special)


def _decoder_steps(backend: Any) -> tuple[list[Step], str]:
    """The steps of the backend's decoder pipeline that change a token in mid-text, and the pipeline's name."""
    if backend.decoder is None:
        raise ConfigError(
            "the tokenizer has no decoder (its decode joins tokens with spaces), so a token's text depends on its "
            "neighbours and grammar masks cannot be exact; structured output is not available for it"
        )
    flat = _flatten(json.loads(backend.decoder.__getstate__()))
    steps: list[Step] = []
    fused = False
    for spec in flat:
        fused = fused or spec["type"] == "Fuse"
        step = _step(spec, fused)
        if step is not None:
            steps.append(step)
    names = [spec["type"] for spec in flat]
    return steps, names[0] if len(names) == 1 else f"Sequence[{', '.join(names)}]"


def _flatten(spec: dict[str, Any]) -> list[dict[str, Any]]:
    if spec["type"] == "Sequence":
        return [leaf for child in spec["decoders"] for leaf in _flatten(child)]
    return [spec]


def _step(spec: dict[str, Any], after_fuse: bool) -> Step | None:
    """One decoder step; None for steps that do nothing to a token in mid-text."""
    kind = spec["type"]
    if kind == "ByteLevel":
        return _byte_level
    if kind == "ByteFallback":
        return _each(_byte_fallback)
    if kind == "Fuse":
        return None
    if kind == "Metaspace":
        return _each(_replacer(spec["replacement"], " "))  # the first token's space is dropped at sequence start
    if kind == "Replace":
        return _each(_replace_step(spec))
    if kind == "Strip":
        # After Fuse it strips the whole text's ends (sequence start / end); before, every token's.
        return None if after_fuse else _each(_strip_step(spec["content"], int(spec["start"]), int(spec["stop"])))
    raise ConfigError(
        f"the tokenizer's decoder {kind} rewrites tokens depending on their neighbours, so grammar masks cannot be "
        "exact for it; structured output supports ByteLevel, ByteFallback, Metaspace, Replace, Fuse and Strip"
    )


def _each(fn: Callable[[Piece], Piece]) -> Step:
    return lambda pieces: [fn(p) for p in pieces]


def _byte_level(pieces: list[Piece]) -> list[Piece]:
    """GPT-2 byte alphabet -> bytes; a token with a character outside it keeps its UTF-8 (as the Rust decoder)."""
    table, outside = _BYTE_LEVEL_TRANSLATE, _NOT_BYTE_LEVEL.search
    return [
        p if isinstance(p, bytes) or outside(p) else p.translate(table).encode("latin-1")  # type: ignore[arg-type]
        for p in pieces
    ]


def _byte_fallback(piece: Piece) -> Piece:
    if isinstance(piece, str) and len(piece) == 6 and (m := _BYTE_FALLBACK.fullmatch(piece)):
        return bytes([int(m.group(1), 16)])
    return piece


def _replacer(old: str, new: str) -> Callable[[Piece], Piece]:
    old_b, new_b = old.encode(), new.encode()

    def replace(piece: Piece) -> Piece:
        return piece.replace(old_b, new_b) if isinstance(piece, bytes) else piece.replace(old, new)

    return replace


def _replace_step(spec: dict[str, Any]) -> Callable[[Piece], Piece]:
    pattern, content = spec["pattern"], spec["content"]
    if "String" in pattern:
        return _replacer(pattern["String"], content)
    regex = re.compile(pattern["Regex"])  # Rust regex syntax; the verification catches a differing dialect

    def replace(piece: Piece) -> Piece:
        return piece if isinstance(piece, bytes) else regex.sub(content.replace("\\", "\\\\"), piece)

    return replace


def _strip_step(content: str, start: int, stop: int) -> Callable[[Piece], Piece]:
    def strip(piece: Piece) -> Piece:
        if isinstance(piece, bytes):
            return piece
        head = len(piece) - len(piece.lstrip(content))
        piece = piece[min(head, start) :]
        tail = len(piece) - len(piece.rstrip(content))
        return piece[: len(piece) - min(tail, stop)]

    return strip
