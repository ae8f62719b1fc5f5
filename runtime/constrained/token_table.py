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

`verify_token_bytes` then checks the table against the tokenizer for every non-special token id, so a decoder
the derivation gets wrong is a startup error that names the tokens instead of masks that are silently wrong.
`lltokenizer` builds llguidance's tokenizer from the table.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_MAX_LISTED = 5  # mismatching tokens named in the startup error


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
    backend = _backend(tokenizer)
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


def _backend(tokenizer: Any) -> Any:
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


# ----------------------------------------------------------------------------------------------- verification


def verify_token_bytes(tokenizer: Any, table: TokenTable) -> None:
    """Check every non-special token's bytes against the tokenizer's own decode; raise on any difference.

    Tokens are decoded after an anchor token (``" a"``, else ``"a"``), so sequence-start effects (a dropped
    leading space) hit the anchor, and a token that changes how its neighbours decode shows up too. Tokens whose
    bytes are valid UTF-8 are checked in runs of `_RUN` (a run that differs is re-checked token by token); a
    token that is not valid UTF-8 alone (a piece of a multi-byte character) is completed into valid UTF-8 with
    single-byte tokens around it and compared exactly. Everything goes through batched decodes.

    Raises:
        ConfigError: a token decodes differently from its table entry (the first few are named, with both
            values), or the tokenizer's ``decode`` rewrites the decoder's text (``clean_up_tokenization_spaces``).
    """
    backend = _backend(tokenizer)
    _check_no_cleanup(tokenizer, backend)
    anchor = _anchor_id(table)
    head = backend.decode([anchor], skip_special_tokens=False)
    whole, pieces = _split_by_utf8(table)
    singles = _single_byte_ids(table)
    runs = [_Probe.of(anchor, whole[k : k + _RUN], table) for k in range(0, len(whole), _RUN)]
    probes = runs + [_piece_probe(anchor, i, table.tokens[i], singles) for i in pieces]
    failed = _failures(backend, head, probes)
    retry = [_Probe.of(anchor, [i], table) for probe, _ in failed if len(probe.ids) > 1 for i in probe.ids]
    bad = [(p.ids[0], p.want, got) for p, got in failed if len(p.ids) == 1]
    bad += [(p.ids[0], p.want, got) for p, got in _failures(backend, head, retry)]
    if bad:
        raise ConfigError(_mismatch_message(backend, table, sorted(bad)))


_RUN = 256  # tokens decoded together in one verification sequence


@dataclass(frozen=True)
class _Probe:
    """A decode to check: ``seq`` (anchor first) must decode to the anchor's text followed by ``want``."""

    ids: list[int]  # the token ids under test
    seq: list[int]
    want: str

    @classmethod
    def of(cls, anchor: int, ids: list[int], table: TokenTable) -> _Probe:
        """Tokens whose bytes are valid UTF-8, decoded one after the other."""
        return cls(ids, [anchor, *ids], b"".join(table.tokens[i] for i in ids).decode(errors="replace"))


def _failures(backend: Any, head: str, probes: list[_Probe]) -> list[tuple[_Probe, str]]:
    """The probes whose decode differs from what they want, with what the text after the anchor was."""
    if not probes:
        return []
    decoded = backend.decode_batch([p.seq for p in probes], skip_special_tokens=False)
    return [
        (p, got[len(head) :] if got.startswith(head) else got)
        for p, got in zip(probes, decoded)
        if got[len(head) :] != p.want or not got.startswith(head)
    ]


def _split_by_utf8(table: TokenTable) -> tuple[list[int], list[int]]:
    """Non-special ids whose bytes are valid UTF-8 alone, and the others."""
    whole: list[int] = []
    pieces: list[int] = []
    for i, data in enumerate(table.tokens):
        if i in table.special_ids:
            continue
        if data.isascii():
            whole.append(i)
            continue
        try:
            data.decode()
            whole.append(i)
        except UnicodeDecodeError:
            pieces.append(i)
    return whole, pieces


def _piece_probe(anchor: int, token: int, data: bytes, singles: dict[int, int]) -> _Probe:
    """The probe of a token that is not valid UTF-8 alone: completed with single-byte tokens when possible."""
    completion = _utf8_completion(data, singles)
    if completion is None:
        return _Probe([token], [anchor, token], data.decode(errors="replace"))  # compare the lossy text
    pre, post = completion
    seq = [anchor, *(singles[b] for b in pre), token, *(singles[b] for b in post)]
    return _Probe([token], seq, (pre + data + post).decode())


# Lead bytes taking 1, 2 or 3 continuation bytes, the unconstrained ones first (after E0, ED, F0 and F4 the next
# byte has a narrower range).
_LEADS = MappingProxyType(
    {1: tuple(range(0xC2, 0xE0)), 2: (*range(0xE1, 0xED), 0xEE, 0xEF, 0xE0, 0xED), 3: (0xF1, 0xF2, 0xF3, 0xF0, 0xF4)}
)


def _utf8_completion(data: bytes, singles: dict[int, int]) -> tuple[bytes, bytes] | None:
    """Bytes with single-byte tokens to put before and after ``data`` so that the whole is valid UTF-8; None if
    there are none (bytes UTF-8 never uses, or byte tokens the vocabulary lacks)."""
    lead = len(data) - len(data.lstrip(bytes(range(0x80, 0xC0))))
    if lead > 3:
        return None
    conts = [b for b in range(0x80, 0xC0) if b in singles]
    for pre in [b""] if lead == 0 else [bytes([b]) for b in _LEADS[lead] if b in singles]:
        missing = _missing_continuations(pre + data)
        for post in [b""] if missing == 0 else [bytes([c]) * missing for c in conts]:
            if _is_utf8(pre + data + post):
                return pre, post
    return None


def _missing_continuations(data: bytes) -> int:
    """How many continuation bytes the last character of ``data`` still needs (0 if it is complete)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if not 0x80 <= byte < 0xC0:
            need = 2 if 0xC0 <= byte < 0xE0 else 3 if 0xE0 <= byte < 0xF0 else 4 if byte >= 0xF0 else 1
            return max(0, need - back)
    return 0


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _anchor_id(table: TokenTable) -> int:
    """A non-special, non-byte-fallback token decoding to ``" a"`` (else ``"a"``) to decode every token after."""
    for want in (b" a", b"a"):
        for i, data in enumerate(table.tokens):
            if data == want and i not in table.special_ids:
                return i
    raise ConfigError("the tokenizer has no token for 'a' or ' a' to check its token table against")


def _single_byte_ids(table: TokenTable) -> dict[int, int]:
    """Byte value -> the first non-special token id whose bytes are exactly that byte."""
    singles: dict[int, int] = {}
    for i, data in enumerate(table.tokens):
        if len(data) == 1 and i not in table.special_ids:
            singles.setdefault(data[0], i)
    return singles


def _check_no_cleanup(tokenizer: Any, backend: Any) -> None:
    """The HF tokenizer's ``decode`` must return the Rust decoder's text (no space clean-up around punctuation)."""
    decode = getattr(tokenizer, "decode", None)
    if decode is None:
        return
    ids = backend.encode("a . b , c ! d ? e 's f n't g 're", add_special_tokens=False).ids
    if decode(ids) != backend.decode(ids, skip_special_tokens=False):
        raise ConfigError(
            "the tokenizer's decode rewrites the text after decoding (clean_up_tokenization_spaces), so output "
            "text would not be the bytes the grammar checked; set clean_up_tokenization_spaces to false"
        )


def _mismatch_message(backend: Any, table: TokenTable, bad: list[tuple[int, str, str]]) -> str:
    listed = "; ".join(
        f"id {i} {backend.id_to_token(i)!r}: table {table.tokens[i]!r}, tokenizer decodes {got!r} "
        f"(table as text {want!r})"
        for i, want, got in bad[:_MAX_LISTED]
    )
    more = f" (and {len(bad) - _MAX_LISTED} more)" if len(bad) > _MAX_LISTED else ""
    return (
        f"grammar token table disagrees with the tokenizer's decode for {len(bad)} token(s){more}; decoder "
        f"{table.decoder}: {listed}. Grammar masks would not be exact, so structured output is refused"
    )


# ----------------------------------------------------------------------------------------------- llguidance


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
    source = _LLGuidanceSource(table, _backend(tokenizer), n_vocab, eos_ids, None if bos is None else int(bos))
    try:
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(source), eos_token=[int(i) for i in eos_ids])
    except Exception as exc:  # llguidance's own validation of the table
        raise ConfigError(f"llguidance cannot use this tokenizer's token table: {exc}") from exc


__all__ = ["TextTokenizer", "TokenTable", "lltokenizer", "token_bytes", "verify_token_bytes"]
