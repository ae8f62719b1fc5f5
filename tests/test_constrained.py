"""Tests of runtime/constrained: grammar specs, the llguidance backend, matchers and token bitmasks.

No model: decoding is simulated by random walks. Each step fills the request's bitmask row, checks the token
policy on it (no special token, no padded row, EOS exactly when the grammar may end), samples a random allowed
token (seeded; structural closers and EOS are favoured so walks end quickly), and feeds it to `accept_token`.
The decoded output is then checked with an independent oracle: `json` + `jsonschema`, `re.fullmatch`, a small
recursive-descent recognizer, or set membership.
"""

from __future__ import annotations

import json
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from .grammar_cases import POINT, REGEXES, SCHEMAS  # noqa: F401
from xinf_sglang.runtime.constrained import (
    BatchMask,
    CompiledGrammar,
    GrammarSpec,
    LLGuidanceBackend,
    LLGuidanceMatcher,
    allocate_bitmask,
    apply_bitmask_,
    bitmask_width,
    reset_rows_allow_all,
)
from xinf_sglang.runtime.constrained.spec import choices_from_lark, choices_to_lark
from xinf_sglang.runtime.errors import ConfigError, InvalidRequestError
from xinf_sglang.runtime.scheduler.schedule_batch import Req
from xinf_sglang.runtime.sampling.sampler import Sampler
from xinf_sglang.runtime.sampling.sampling_params import SamplingParams

PAD_ROWS = 45  # logits wider than the tokenizer, and not a multiple of 32
SEEDS = [0, 1, 2, 3]
MAX_STEPS = 600
WALK_STYLES = [(40.0, 0.5), (12.0, 0.2), (5.0, 0.1), (3.0, 0.05)]  # (weight of closing tokens, P(EOS) when allowed)


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Callable[..., Path]) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model("qwen2"))


@pytest.fixture(scope="module")
def eos_ids(tokenizer: Any) -> list[int]:
    # Like Qwen's generation config: <|im_end|> and <|endoftext|> both end generation.
    return [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]


@pytest.fixture(scope="module")
def vocab_size(tokenizer: Any) -> int:
    return len(tokenizer) + PAD_ROWS


@pytest.fixture(scope="module")
def backend(tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> Iterator[LLGuidanceBackend]:
    be = LLGuidanceBackend(tokenizer, vocab_size, eos_token_ids=eos_ids)
    yield be
    be.close()


@pytest.fixture(scope="module")
def token_texts(tokenizer: Any) -> list[str]:
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


# ---------------------------------------------------------------------------------------------------- walking


def allowed_ids(bitmask: torch.Tensor, row: int, vocab_size: int) -> np.ndarray:
    """Token ids whose bit is set in ``bitmask[row]`` (an independent unpacking of the layout)."""
    bits = np.unpackbits(bitmask[row].numpy().view(np.uint8), bitorder="little")[:vocab_size]
    return np.nonzero(bits)[0]


class Walker:
    """Random decoding against one backend, checking the token policy on every mask."""

    def __init__(self, backend: LLGuidanceBackend, tokenizer: Any, token_texts: list[str], closers: str) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        policy = backend.policy
        self.eos = sorted(policy.eos_ids)
        self.never = sorted(policy.never_ids)
        self.num_tokens = policy.num_tokens
        self.is_closer = np.zeros(backend.vocab_size, dtype=bool)
        self.is_closer[: len(token_texts)] = [any(c in text for c in closers) for text in token_texts]

    def walk(self, spec: GrammarSpec, seed: int, row: int = 3, batch: int = 5) -> str:
        """Decode ``spec`` to the end; return the text (EOS excluded). Fails on any policy violation."""
        rng = np.random.default_rng(seed)
        # Seeds differ in how eagerly they close structures and stop: short walks and long, deep ones.
        closer_weight, p_eos = WALK_STYLES[seed % len(WALK_STYLES)]
        weights = np.where(self.is_closer, closer_weight, 1.0)
        matcher = self.backend.new_matcher(self.backend.compile(spec))
        bitmask = allocate_bitmask(batch, self.backend.vocab_size)
        tokens: list[int] = []
        for _ in range(MAX_STEPS):
            bitmask[row] = 0x5A5A5A5A  # garbage: fill_bitmask must overwrite every word
            matcher.fill_bitmask(bitmask, row)
            ids = allowed_ids(bitmask, row, self.backend.vocab_size)
            assert ids.size, "no token allowed"
            assert ids.max() < self.num_tokens, "a padded vocabulary row is allowed"
            assert not np.isin(ids, self.never).any(), f"special token allowed: {np.intersect1d(ids, self.never)}"
            eos_allowed = np.isin(ids, self.eos)
            assert eos_allowed.any() == matcher.is_accepting(), "EOS must be allowed exactly when accepting"
            assert eos_allowed.sum() in (0, len(self.eos)), "all EOS ids or none"
            if eos_allowed.any() and (rng.random() < p_eos or eos_allowed.all()):
                token = int(rng.choice(self.eos))
            else:
                text_ids = ids[~eos_allowed]
                p = weights[text_ids] / weights[text_ids].sum()
                token = int(rng.choice(text_ids, p=p))
            assert matcher.accept_token(token), matcher.error()
            assert matcher.error() is None
            if token in self.eos:
                assert matcher.is_terminated()
                break
            tokens.append(token)
            if matcher.is_terminated():
                break
        else:
            pytest.fail(f"walk did not end in {MAX_STEPS} steps: {self.tokenizer.decode(tokens)!r}")
        assert all(bitmask[r].eq(-1).all() for r in range(batch) if r != row), "other rows were touched"
        return self.tokenizer.decode(tokens)


@pytest.fixture(scope="module")
def json_walker(backend: LLGuidanceBackend, tokenizer: Any, token_texts: list[str]) -> Walker:
    return Walker(backend, tokenizer, token_texts, closers='"]},')


@pytest.fixture(scope="module")
def text_walker(backend: LLGuidanceBackend, tokenizer: Any, token_texts: list[str]) -> Walker:
    return Walker(backend, tokenizer, token_texts, closers=')"]!')


# ---------------------------------------------------------------------------------------------------- JSON schema

_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_walks_are_valid_compact_json(json_walker: Walker, name: str, seed: int) -> None:
    schema = SCHEMAS[name]
    text = json_walker.walk(GrammarSpec.from_fields(json_schema=schema), seed)
    value = json.loads(text)
    jsonschema.validate(
        value, schema, cls=jsonschema.Draft202012Validator, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    outside_strings = _JSON_STRING.sub("", text)
    assert not re.search(r"\s", outside_strings), f"whitespace between JSON tokens: {text!r}"


def test_schema_given_as_text_or_dict_is_one_spec() -> None:
    as_dict = GrammarSpec.from_fields(json_schema={"type": "object", "properties": {"b": {}, "a": {}}})
    as_text = GrammarSpec.from_fields(json_schema='{"type":  "object",\n "properties": {"b": {}, "a": {}}}')
    assert as_dict == as_text
    assert as_dict.cache_key == ("json_schema", '{"type":"object","properties":{"b":{},"a":{}}}')
    assert GrammarSpec.from_fields() is None


def test_output_follows_the_schema_property_order(json_walker: Walker) -> None:
    props = {"zeta": {"type": "integer"}, "alpha": {"type": "boolean"}, "mid": {"const": 1}}
    schema = {"type": "object", "properties": props, "required": ["alpha", "mid", "zeta"], "additionalProperties": False}
    for seed in SEEDS:
        text = json_walker.walk(GrammarSpec.from_fields(json_schema=schema), seed)
        assert list(json.loads(text)) == ["zeta", "alpha", "mid"], text


# ---------------------------------------------------------------------------------------------------- regex



@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_walks_fullmatch(text_walker: Walker, pattern: str, seed: int) -> None:
    text = text_walker.walk(GrammarSpec.from_fields(regex=pattern), seed)
    assert re.fullmatch(pattern, text), (pattern, text)


def test_regex_digit_class_is_ascii(text_walker: Walker) -> None:
    for seed in range(8):  # Rust's \d alone would also emit Arabic-Indic, fullwidth, ... digits
        text = text_walker.walk(GrammarSpec.from_fields(regex=r"\d{6}|x\D"), seed)
        assert re.fullmatch(r"[0-9]{6}|x[^0-9]", text), text


# ---------------------------------------------------------------------------------------------------- EBNF

ARITH_LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")" | "-" factor
NUMBER: /[0-9]{1,4}(\.[0-9]{1,2})?/
"""


def is_arith(text: str) -> bool:
    """Recursive-descent recognizer of ARITH_LARK's language (no whitespace)."""
    number = re.compile(r"[0-9]{1,4}(\.[0-9]{1,2})?")
    pos = 0

    def peek() -> str:
        return text[pos] if pos < len(text) else ""

    def expr() -> bool:
        nonlocal pos
        if not term():
            return False
        while peek() in ("+", "-") and peek():
            pos += 1
            if not term():
                return False
        return True

    def term() -> bool:
        nonlocal pos
        if not factor():
            return False
        while peek() in ("*", "/") and peek():
            pos += 1
            if not factor():
                return False
        return True

    def factor() -> bool:
        nonlocal pos
        if peek() == "(":
            pos += 1
            if not expr() or peek() != ")":
                return False
            pos += 1
            return True
        if peek() == "-":
            pos += 1
            return factor()
        m = number.match(text, pos)
        if not m:
            return False
        pos = m.end()
        return True

    return expr() and pos == len(text)


def test_arith_recognizer_itself() -> None:
    assert is_arith("1+2*(3-4.5)/-6")
    assert not is_arith("1+")
    assert not is_arith("(1")
    assert not is_arith("1 2")


GBNF_LIST = r"""
# a list of words or quoted upper-case names
root ::= "[" item ("," item)* "]"
item ::= [a-z]+ | "\"" [A-Z]* "\""
"""

GBNF_PAIRS = r"""
root ::= pair (";" pair){0,3}
pair ::= key "=" value
key ::= [a-z] [a-z0-9_]{0,7}
value ::= [0-9]+ | "(" value ("+" value)? ")"
"""


def is_pairs(text: str) -> bool:
    """Recognizer of GBNF_PAIRS (value is recursive: not a regular language)."""
    pairs = text.split(";")
    if not 1 <= len(pairs) <= 4:
        return False
    for pair in pairs:
        m = re.fullmatch(r"[a-z][a-z0-9_]{0,7}=(.+)", pair)
        if not m or not _is_value(m.group(1)):
            return False
    return True


def _is_value(text: str) -> bool:
    if re.fullmatch(r"[0-9]+", text):
        return True
    if not (text.startswith("(") and text.endswith(")")):
        return False
    inner, depth = text[1:-1], 0
    for i, c in enumerate(inner):  # split at the top-level "+", if any
        depth += (c == "(") - (c == ")")
        if c == "+" and depth == 0:
            return _is_value(inner[:i]) and _is_value(inner[i + 1 :])
    return _is_value(inner)


EBNF_CASES: list[tuple[str, str, Callable[[str], bool]]] = [
    ("lark_arith", ARITH_LARK, is_arith),
    ("gbnf_list", GBNF_LIST, lambda s: re.fullmatch(r'\[([a-z]+|"[A-Z]*")(,([a-z]+|"[A-Z]*"))*\]', s) is not None),
    ("gbnf_pairs_recursive", GBNF_PAIRS, is_pairs),
    ("lark_with_llguidance_header", '%llguidance {}\nstart: "x" /[0-9]/{2} "y"', lambda s: re.fullmatch(r"x[0-9]{2}y", s) is not None),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", EBNF_CASES, ids=[c[0] for c in EBNF_CASES])
def test_ebnf_walks_are_in_the_language(text_walker: Walker, case: tuple[str, str, Callable[[str], bool]], seed: int) -> None:
    _, grammar, recognizer = case
    text = text_walker.walk(GrammarSpec.from_fields(ebnf=grammar), seed)
    assert recognizer(text), text


# ---------------------------------------------------------------------------------------------------- choices

CHOICES = [
    ["yes", "no", "maybe"],
    ["a", "ab", "abc"],
    ["café", "日本語", "🙂 ok"],
    ['say "hi"', "back\\slash", "new\nline", "tab\there"],
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("choices", CHOICES, ids=["words", "prefixes", "unicode", "escapes"])
def test_choices_walks_are_members(text_walker: Walker, choices: list[str], seed: int) -> None:
    assert text_walker.walk(GrammarSpec.from_fields(choices=choices), seed) in choices


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choices=st.lists(st.text(min_size=1, max_size=12).map(lambda t: unicodedata.normalize("NFC", t)), min_size=1, max_size=4))
def test_any_strings_work_as_choices(backend: LLGuidanceBackend, tokenizer: Any, choices: list[str]) -> None:
    """Quotes, backslashes, control and astral characters survive the choices -> grammar translation."""
    assume(all(choices) and not any("<|" in c for c in choices))
    compiled = backend.compile(GrammarSpec.from_fields(choices=choices))
    for choice in choices:
        matcher = backend.new_matcher(compiled)
        for token in tokenizer.encode(choice):
            assert matcher.accept_token(token), (choice, matcher.error())
        assert matcher.is_accepting(), choice
    # A string that extends the longest choice is no choice: it must be rejected on the way.
    extended = max(choices, key=len) + "\x07~"
    matcher = backend.new_matcher(compiled)
    assert not all(matcher.accept_token(t) for t in tokenizer.encode(extended))


def test_choice_that_cannot_be_extended_terminates(backend: LLGuidanceBackend, tokenizer: Any) -> None:
    matcher = backend.new_matcher(backend.compile(GrammarSpec.from_fields(choices=["yes", "no"])))
    for token in tokenizer.encode("yes"):
        assert not matcher.is_terminated()
        assert matcher.accept_token(token), matcher.error()
    assert matcher.is_terminated() and matcher.error() is None


def test_choice_prefix_allows_eos_and_extension(backend: LLGuidanceBackend, tokenizer: Any, vocab_size: int) -> None:
    matcher = backend.new_matcher(backend.compile(GrammarSpec.from_fields(choices=["a", "ab"])))
    assert matcher.accept_token(tokenizer.encode("a")[0])
    bitmask = allocate_bitmask(1, vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    ids = set(allowed_ids(bitmask, 0, vocab_size).tolist())
    assert set(backend.policy.eos_ids) <= ids
    assert tokenizer.encode("b")[0] in ids
    assert not matcher.is_terminated()


# ---------------------------------------------------------------------------------------------------- token policy


def test_policy_masks(backend: LLGuidanceBackend, tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
    policy = backend.policy
    assert policy.eos_ids == frozenset(eos_ids)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in policy.never_ids
    assert policy.num_tokens == len(tokenizer) and policy.vocab_size == vocab_size
    assert policy.num_words == bitmask_width(vocab_size)
    text = np.unpackbits(policy.text_mask.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)
    assert not text[len(tokenizer) :].any(), "padded rows must never be allowed"
    assert not text[list(policy.never_ids | policy.eos_ids)].any()


@pytest.mark.parametrize(
    "fields",
    [
        {"json_schema": {"const": "<|im_start|>"}},
        {"regex": r"<\|im_start\|>a"},
        {"regex": r"<\|im_end\|>x"},  # the EOS marker's text, where the grammar cannot end
        {"ebnf": 'start: <|im_start|> "a"'},  # llguidance's special-token syntax
        {"ebnf": 'start: "<|im_end|>"'},
        {"choices": ["<|im_start|>user"]},
    ],
)
def test_grammar_that_needs_a_special_token_fails_cleanly(
    backend: LLGuidanceBackend, vocab_size: int, fields: dict[str, Any]
) -> None:
    matcher = backend.new_matcher(backend.compile(GrammarSpec.from_fields(**fields)))
    bitmask = allocate_bitmask(2, vocab_size)
    for _ in range(10):  # consume the text before the marker, if any
        matcher.fill_bitmask(bitmask, 1)
        ids = allowed_ids(bitmask, 1, vocab_size)
        assert not np.isin(ids, sorted(backend.policy.never_ids)).any()
        if matcher.error() is not None:
            break
        assert matcher.accept_token(int(ids[0])), matcher.error()
    assert "special token" in (matcher.error() or "")
    assert set(ids.tolist()) <= backend.policy.eos_ids and ids.size, "failed rows allow only EOS (finite logits)"
    assert not matcher.accept_token(int(ids[0]))
    assert not matcher.is_terminated()


def test_accept_rejects_special_eos_early_and_bad_tokens(backend: LLGuidanceBackend, tokenizer: Any, eos_ids: list[int]) -> None:
    compiled = backend.compile(GrammarSpec.from_fields(json_schema={"type": "object"}))
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    cases = [(im_start, "special token"), (eos_ids[0], "EOS"), (len(tokenizer) + 1, "outside"), (tokenizer.encode("x")[0], "")]
    for token, message in cases:
        matcher = backend.new_matcher(compiled)
        assert not matcher.accept_token(token)
        assert message in (matcher.error() or "<none>")
        assert not matcher.accept_token(tokenizer.encode("{")[0]), "errors are sticky"
        assert not matcher.rollback(0)


def test_rollback_restores_the_mask(backend: LLGuidanceBackend, tokenizer: Any, vocab_size: int) -> None:
    matcher = backend.new_matcher(backend.compile(GrammarSpec.from_fields(json_schema=SCHEMAS["flat_required"])))
    bitmask = allocate_bitmask(2, vocab_size)
    prefix = tokenizer.encode('{"name":"')
    for token in prefix:
        assert matcher.accept_token(token), matcher.error()
    matcher.fill_bitmask(bitmask, 0)
    for token in tokenizer.encode('ab",'):
        assert matcher.accept_token(token), matcher.error()
    assert matcher.rollback(len(tokenizer.encode('ab",')))
    matcher.fill_bitmask(bitmask, 1)
    assert torch.equal(bitmask[0], bitmask[1])
    with pytest.raises(ValueError):
        matcher.rollback(-1)


def test_matchers_are_independent(backend: LLGuidanceBackend, tokenizer: Any, vocab_size: int) -> None:
    compiled = backend.compile(GrammarSpec.from_fields(regex=r"[a-z]+!"))
    first, second = backend.new_matcher(compiled), backend.new_matcher(compiled)
    assert isinstance(first, LLGuidanceMatcher) and first.spec == compiled.spec
    for token in tokenizer.encode("abc"):
        assert first.accept_token(token)
    bitmask = allocate_bitmask(2, vocab_size)
    first.fill_bitmask(bitmask, 0)
    second.fill_bitmask(bitmask, 1)
    assert not torch.equal(bitmask[0], bitmask[1])
    fresh = backend.new_matcher(compiled)
    fresh.fill_bitmask(bitmask, 0)
    assert torch.equal(bitmask[0], bitmask[1]), "the compiled template must stay at the start state"


def test_batched_fill_matches_per_row_fill(backend: LLGuidanceBackend, tokenizer: Any, vocab_size: int) -> None:
    specs = [
        GrammarSpec.from_fields(json_schema=SCHEMAS["nested_objects"]),
        GrammarSpec.from_fields(regex=r"(cat|dog)s?"),
        GrammarSpec.from_fields(choices=["<|im_start|>"]),  # fails at its first fill
        GrammarSpec.from_fields(ebnf=ARITH_LARK),
    ]
    prefixes = ['{"user":{"id":12,"address":{"', "ca", "", "(1+"]
    batch_matchers, row_matchers = [], []
    for spec, prefix in zip(specs, prefixes):
        pair = [backend.new_matcher(backend.compile(spec)) for _ in range(2)]
        for m in pair:
            for token in tokenizer.encode(prefix):
                assert m.accept_token(token), m.error()
        batch_matchers.append(pair[0])
        row_matchers.append(pair[1])
    rows = [5, 0, 2, 3]
    batched = allocate_bitmask(6, vocab_size)
    backend.fill_bitmasks(list(zip(batch_matchers, rows)), batched)
    single = allocate_bitmask(6, vocab_size)
    for matcher, row in zip(row_matchers, rows):
        matcher.fill_bitmask(single, row)
    assert torch.equal(batched, single)
    assert batch_matchers[2].error() is not None and row_matchers[2].error() is not None
    with pytest.raises(ValueError, match="distinct"):
        backend.fill_bitmasks([(batch_matchers[0], 1), (batch_matchers[1], 1)], batched)


def test_batch_mask_equals_row_by_row_masking(backend: LLGuidanceBackend, tokenizer: Any, vocab_size: int) -> None:
    """The sampler's grammar masks (`BatchMask`: one batched fill per step into a reused bitmask) give exactly the
    logits that filling row by row gave, over steps whose batch shrinks and grows (stale rows are reset), with
    unconstrained rows in between; greedy sampling then picks the same tokens, and each step is counted."""
    specs = [
        GrammarSpec.from_fields(json_schema=SCHEMAS["nested_objects"]),
        None,
        GrammarSpec.from_fields(regex=r"(cat|dog)s?[0-9]{2}"),
        GrammarSpec.from_fields(choices=["yes", "no", "maybe"]),
        None,
        GrammarSpec.from_fields(ebnf=ARITH_LARK),
    ]
    # Twin matchers per row: one driven by the batched path, one by the row-by-row reference.
    twins = [(None, None) if s is None else tuple(backend.new_matcher(backend.compile(s)) for _ in range(2))
             for s in specs]
    masks = BatchMask(vocab_size, lambda: backend)
    sampler = Sampler(vocab_size, torch.device("cpu"), lambda: backend)
    greedy = SamplingParams(temperature=0, max_new_tokens=64)
    for step, n in enumerate([6, 2, 5, 6]):
        batch = twins[:n]
        logits = torch.randn(n, vocab_size, generator=torch.Generator().manual_seed(step)) * 4
        expected = logits.clone()
        reference = allocate_bitmask(n, vocab_size)
        for row, (_, single) in enumerate(batch):
            if single is not None:
                single.fill_bitmask(reference, row)
        apply_bitmask_(expected, reference)
        masked = logits.clone()
        masks.apply(masked, [batched for batched, _ in batch])
        assert torch.equal(masked, expected), f"step {step}"
        reqs = [Req(f"r{row}", [1], greedy, frozenset(), 64) for row in range(n)]
        for req, (batched, _) in zip(reqs, batch):
            req.grammar = batched
        tokens, _ = sampler.sample(logits.clone(), reqs)
        tokens = tokens.tolist()
        assert tokens == expected.argmax(dim=-1).tolist()
        for token, (batched, single) in zip(tokens, batch):
            if batched is not None:
                assert batched.accept_token(token) == single.accept_token(token)
    assert masks.steps == 4 and sampler.masks.steps == 4 and masks.seconds > 0


@given(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=5, unique=True))
def test_choices_read_back_from_their_grammar(choices: list[str]) -> None:
    assert choices_from_lark(choices_to_lark(choices)) == choices


def test_fill_checks_the_bitmask_layout(backend: LLGuidanceBackend, vocab_size: int) -> None:
    matcher = backend.new_matcher(backend.compile(GrammarSpec.from_fields(regex="a")))
    with pytest.raises(ValueError, match="int32"):
        matcher.fill_bitmask(allocate_bitmask(2, vocab_size - 64), 0)
    with pytest.raises(ValueError, match="int32"):
        matcher.fill_bitmask(allocate_bitmask(2, vocab_size).to(torch.int64), 0)
    with pytest.raises(ValueError, match="contiguous"):
        matcher.fill_bitmask(allocate_bitmask(2, vocab_size * 2)[:, ::2], 0)
    with pytest.raises(IndexError):
        matcher.fill_bitmask(allocate_bitmask(2, vocab_size), 2)


# ---------------------------------------------------------------------------------------------------- bad specs

BAD_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("unique_items", {"json_schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
    ("if_then_else", {"json_schema": {"if": {"type": "string"}, "then": {"minLength": 2}, "else": {}}}, "if"),
    ("not", {"json_schema": {"not": {"type": "string"}}}, '"not"'),
    ("contains", {"json_schema": {"type": "array", "contains": {"type": "integer"}}}, "contains"),
    ("nested_unsupported", {"json_schema": {"type": "object", "properties": {"t": {"type": "array", "uniqueItems": True}}}}, "uniqueItems"),
    ("lenient_via_x_guidance", {"json_schema": {"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}}}, "x-guidance"),
    ("invalid_json_text", {"json_schema": '{"type": "object",'}, "not valid JSON"),
    ("json_not_object", {"json_schema": "[1, 2]"}, "JSON object"),
    ("json_wrong_python_type", {"json_schema": 42}, "JSON schema object"),
    ("unknown_type", {"json_schema": {"type": "foo"}}, "foo"),
    ("unknown_format", {"json_schema": {"type": "string", "format": "weird"}}, "weird"),
    ("overlapping_one_of", {"json_schema": {"oneOf": [{"type": "number"}, {"type": "integer"}]}}, "anyOf"),
    ("nan_bound", {"json_schema": {"type": "number", "maximum": float("nan")}}, "JSON-serialisable"),
    ("regex_unclosed_group", {"regex": "(abc"}, "regex does not compile"),
    ("regex_lookahead", {"regex": "(?=a)a"}, "look-around"),
    ("regex_empty", {"regex": ""}, "non-empty"),
    ("regex_trailing_backslash", {"regex": "ab\\"}, "lone backslash"),
    ("regex_not_string", {"regex": 5}, "regex must be"),
    ("lark_syntax_error", {"ebnf": 'start: "a" ('}, "ebnf grammar does not compile"),
    ("lark_unknown_rule", {"ebnf": "start: undefined_rule"}, "undefined_rule"),
    ("lark_no_start", {"ebnf": 'foo: "a"'}, "start"),
    ("gbnf_unknown_rule", {"ebnf": "root ::= foo"}, "foo"),
    ("gbnf_no_root", {"ebnf": 'item ::= "a"'}, "root"),
    ("ebnf_blank", {"ebnf": "  \n"}, "non-empty"),
    ("choices_empty", {"choices": []}, "non-empty"),
    ("choices_not_strings", {"choices": ["a", 1]}, "strings"),
    ("choices_empty_string", {"choices": ["a", ""]}, "empty"),
    ("choices_a_string", {"choices": "abc"}, "list"),
    ("two_fields", {"regex": "a", "choices": ["a"]}, "at most one"),
    ("three_fields", {"json_schema": {}, "regex": "a", "ebnf": 'start: "a"'}, "json_schema, regex, ebnf"),
]


@pytest.mark.parametrize("case", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_specs_are_invalid_requests(backend: LLGuidanceBackend, case: tuple[str, dict[str, Any], str]) -> None:
    _, fields, message = case
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        spec = GrammarSpec.from_fields(**fields)
        assert spec is not None
        backend.compile(spec)


def test_unsupported_keyword_message_says_what_to_do(backend: LLGuidanceBackend) -> None:
    with pytest.raises(InvalidRequestError) as info:
        backend.compile(GrammarSpec.from_fields(json_schema={"type": "array", "uniqueItems": True}))
    assert "cannot be enforced" in str(info.value) and "Remove them" in str(info.value)


def test_bad_backend_config(tokenizer: Any, vocab_size: int) -> None:
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        LLGuidanceBackend(tokenizer, len(tokenizer) - 1)
    with pytest.raises(ConfigError, match="compile_timeout_s"):
        LLGuidanceBackend(tokenizer, vocab_size, compile_timeout_s=0)
    with pytest.raises(ConfigError, match="max_workers"):
        LLGuidanceBackend(tokenizer, vocab_size, max_workers=0)
    with pytest.raises(ConfigError, match="eos_token_ids"):
        LLGuidanceBackend(tokenizer, vocab_size, eos_token_ids=[vocab_size])
    with pytest.raises(ConfigError, match="fast tokenizer"):
        LLGuidanceBackend(object(), vocab_size)


def test_matcher_from_another_backend_is_refused(backend: LLGuidanceBackend, tokenizer: Any, vocab_size: int) -> None:
    with LLGuidanceBackend(tokenizer, vocab_size) as other:
        compiled = other.compile(GrammarSpec.from_fields(regex="a"))
    with pytest.raises(ValueError, match="not produced by this"):
        backend.new_matcher(compiled)


# ---------------------------------------------------------------------------------------------------- cache


def test_compile_cache_hits(tokenizer: Any, vocab_size: int) -> None:
    with LLGuidanceBackend(tokenizer, vocab_size) as be:
        first = be.compile(GrammarSpec.from_fields(json_schema={"type": "object", "properties": {"a": {}, "b": {}}}))
        second = be.compile(GrammarSpec.from_fields(json_schema='{"type": "object", "properties": {"a": {}, "b": {}}}'))
        assert first is second
        assert be.cache_stats() == {"hits": 1, "misses": 1, "entries": 1}
        # The same text under another kind is another grammar.
        be.compile(GrammarSpec.from_fields(regex="abc"))
        be.compile(GrammarSpec.from_fields(ebnf='start: "abc"'))
        assert be.cache_stats()["misses"] == 3
        # Failures are cached too, and each caller gets the message.
        for _ in range(2):
            with pytest.raises(InvalidRequestError, match="uniqueItems"):
                be.compile(GrammarSpec.from_fields(json_schema={"uniqueItems": True}))
        assert be.cache_stats() == {"hits": 2, "misses": 4, "entries": 4}


def test_concurrent_requests_share_one_compilation(tokenizer: Any, vocab_size: int) -> None:
    with LLGuidanceBackend(tokenizer, vocab_size, max_workers=4) as be:
        spec = GrammarSpec.from_fields(json_schema=SCHEMAS["recursive_tree"])
        results: list[CompiledGrammar] = []
        threads = [threading.Thread(target=lambda: results.append(be.compile(spec))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 8 and all(r is results[0] for r in results)
        assert be.cache_stats()["misses"] == 1


def test_cache_is_bounded(tokenizer: Any, vocab_size: int) -> None:
    with LLGuidanceBackend(tokenizer, vocab_size, max_cache_entries=2) as be:
        for pattern in ["a", "b", "c", "a"]:
            be.compile(GrammarSpec.from_fields(regex=pattern))
        assert be.cache_stats() == {"hits": 0, "misses": 4, "entries": 2}


# ---------------------------------------------------------------------------------------------------- time bound


SLOW_REGEX = GrammarSpec("regex", "a{1000}{1000}")  # built directly: from_fields refuses it (repetition limit)
SLOW_LIMIT_S = 0.3  # a quarter of SLOW_REGEX's compile time on an idle runner; far above a small grammar's


def test_compile_timeout_stops_the_compile_and_names_the_grammar(tokenizer: Any, vocab_size: int) -> None:
    # SLOW_REGEX takes ~1.2 s on an idle 2-core runner (more when loaded); a warmed-up worker compiles "[0-9]" in
    # milliseconds: a limit of SLOW_LIMIT_S separates them on fast and on loaded machines.
    with LLGuidanceBackend(tokenizer, vocab_size, compile_timeout_s=SLOW_LIMIT_S, max_workers=1) as be:
        be.compile(GrammarSpec.from_fields(regex="b"))  # the worker is started (its start is never timed)
        start = time.monotonic()
        future: Future[CompiledGrammar] = be.compile_async(SLOW_REGEX)
        assert time.monotonic() - start < SLOW_LIMIT_S, "compile_async must not block"
        with pytest.raises(InvalidRequestError, match=r"longer than the limit of 0.3 s .*stopped.*regex #[0-9a-f]{12}"):
            future.result(timeout=30)
        # The one compile thread is free again at once: the slow compile was killed, not left running.
        start = time.monotonic()
        assert be.compile(GrammarSpec.from_fields(regex="[0-9]")).compile_time_s < 5
        assert time.monotonic() - start < 5
        # A first time-out is not cached (it may come from a loaded host): resending compiles again; the second
        # time-out is cached (tests/test_grammar_path.py::test_first_time_out_is_not_cached_a_second_one_is).
        with pytest.raises(InvalidRequestError, match="longer than"):
            be.compile(SLOW_REGEX)
        assert be.cache_stats()["misses"] == 4


def test_queued_compile_is_not_blamed_for_the_one_before_it(tokenizer: Any, vocab_size: int) -> None:
    # One compile thread: "[0-9]" waits behind the slow grammar for about the whole limit, yet its own limit
    # only starts when its compile does.
    with LLGuidanceBackend(tokenizer, vocab_size, compile_timeout_s=SLOW_LIMIT_S, max_workers=1) as be:
        slow = be.compile_async(SLOW_REGEX)
        quick = be.compile_async(GrammarSpec.from_fields(regex="[0-9]"))
        with pytest.raises(InvalidRequestError, match="regex #"):
            slow.result(timeout=30)
        assert be.new_matcher(quick.result(timeout=30)).error() is None


def test_compile_async_resolves(tokenizer: Any, vocab_size: int) -> None:
    with LLGuidanceBackend(tokenizer, vocab_size) as be:
        ok = be.compile_async(GrammarSpec.from_fields(regex="[0-9]+"))
        bad = be.compile_async(GrammarSpec.from_fields(regex="(("))
        assert isinstance(ok.result(timeout=10), CompiledGrammar)
        assert isinstance(bad.exception(timeout=10), InvalidRequestError)
        assert ok.result().compile_time_s > 0


def test_huge_schema_with_tiny_timeout(tokenizer: Any, vocab_size: int) -> None:
    props = {f"field_{i}": {"type": "string", "pattern": f"^[a-z]{{{i % 7 + 1},{i % 7 + 40}}}$"} for i in range(300)}
    schema = {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}
    with LLGuidanceBackend(tokenizer, vocab_size, compile_timeout_s=1e-4) as be:
        with pytest.raises(InvalidRequestError, match="longer than"):
            be.compile(GrammarSpec.from_fields(json_schema=schema))


def test_close_is_idempotent_and_final(tokenizer: Any, vocab_size: int) -> None:
    be = LLGuidanceBackend(tokenizer, vocab_size)
    be.close()
    be.close()
    with pytest.raises(RuntimeError, match="closed"):
        be.compile_async(GrammarSpec.from_fields(regex="a"))


# ---------------------------------------------------------------------------------------------------- bitmask


def _reference_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not (int(bitmask[b, t // 32]) >> (t % 32)) & 1:
                out[b, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100])
def test_apply_bitmask_matches_bit_by_bit_reference(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, bitmask_width(vocab)), generator=gen, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    logits = torch.randn(3, vocab, generator=gen)
    expected = _reference_mask(logits, bitmask)
    assert apply_bitmask_(logits, bitmask) is logits
    assert torch.equal(logits, expected)


def test_allocate_and_reset(vocab_size: int) -> None:
    bitmask = allocate_bitmask(4, vocab_size, pin_memory=False)
    assert bitmask.shape == (4, (vocab_size + 31) // 32) and bitmask.dtype == torch.int32
    assert bitmask.eq(-1).all()
    bitmask.zero_()
    reset_rows_allow_all(bitmask, [1, 3])
    assert bitmask[[1, 3]].eq(-1).all() and bitmask[[0, 2]].eq(0).all()
    reset_rows_allow_all(bitmask, torch.tensor([0]))
    reset_rows_allow_all(bitmask, [])
    assert bitmask[0].eq(-1).all() and bitmask[2].eq(0).all()
    reset_rows_allow_all(bitmask, slice(2, 3))
    assert bitmask.eq(-1).all()


def test_scheduler_style_step(backend: LLGuidanceBackend, tokenizer: Any, vocab_size: int) -> None:
    """One decode step as the scheduler runs it: constrained rows filled, the others reset, logits masked."""
    matchers = {1: backend.new_matcher(backend.compile(GrammarSpec.from_fields(choices=["yes", "no"])))}
    matchers[3] = backend.new_matcher(backend.compile(GrammarSpec.from_fields(regex=r"[0-9]{2}")))
    bitmask = allocate_bitmask(4, vocab_size)
    bitmask.zero_()  # left over from a previous batch
    backend.fill_bitmasks(list((m, r) for r, m in matchers.items()), bitmask)
    reset_rows_allow_all(bitmask, [0, 2])
    logits = torch.randn(4, vocab_size, generator=torch.Generator().manual_seed(0))
    original = logits.clone()
    apply_bitmask_(logits, bitmask)
    assert torch.equal(logits[[0, 2]], original[[0, 2]]), "unconstrained rows untouched"
    sampled = logits.argmax(dim=-1).tolist()
    assert tokenizer.decode([sampled[1]]) in ("y", "ye", "yes", "n", "no")
    assert tokenizer.decode([sampled[3]]).isdigit()
    for row, matcher in matchers.items():
        assert matcher.accept_token(sampled[row]), matcher.error()
