"""The check of a `TokenTable` against the tokenizer's own decode, for every non-special token id (startup).

`token_table.token_bytes` derives each token's bytes from the decoder pipeline; a decoder the derivation gets
wrong must be a startup error that names the tokens, never grammar masks that are silently wrong.
`verify_token_bytes` decodes every token after an anchor, in batched decodes (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError
from .token_table import TokenTable, rust_backend

__all__ = ["verify_token_bytes"]

_MAX_LISTED = 5  # mismatching tokens named in the startup error


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
    backend = rust_backend(tokenizer)
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
