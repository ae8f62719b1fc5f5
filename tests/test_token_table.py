"""The grammar backend's token table (runtime/constrained/token_table.py): each token's bytes derived from the
tokenizer's decoder, checked at startup against the tokenizer's decode, and fed to llguidance.

Four tokenizer families: this project's tiny byte-level BPE, a Qwen2-style one (``Qwen2Tokenizer`` over the same
vocabulary), SmolLM2's GGUF-converted tokenizer (decoder ``ByteFallback, Fuse, Replace, ByteLevel``, which
llguidance's own reader misread: "Ġ" was two bytes instead of a space) and a Llama-2-like SentencePiece BPE
(``▁`` for spaces, ``<0x00>``..``<0xFF>`` byte fallback) trained here. End to end through the engine, regexes with
spaces, tabs, newlines, non-ASCII text and emoji full-match, and JSON whose string values hold spaces validates.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from xinf_sglang.runtime import SamplingParams
from xinf_sglang.runtime.constrained import LLGuidanceBackend
from xinf_sglang.runtime.constrained.llg_tokenizer import TextTokenizer, lltokenizer
from xinf_sglang.runtime.constrained.token_table import TokenTable, token_bytes
from xinf_sglang.runtime.constrained.token_table_check import verify_token_bytes
from xinf_sglang.runtime.errors import ConfigError

from .engine_helpers import CORPUS, make_engine

FAMILIES = ["byte_level_bpe", "qwen2", "smollm2_gguf", "sentencepiece"]

SPACE_REGEXES = [" [0-2]", "a b", "(yes|no) (yes|no)", "(1[0-2]|[1-9]) (am|pm)"]
OTHER_REGEXES = [
    r"x\ty\nz",
    r"\t[a-z]{1,4}\n\n[0-9]",
    r"(é|ü|ß){1,3} ok",
    r"日本語?",
    r"(😀|🎉) (yes|no)",
    r"[α-ω]{2,4}\n",
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "city": {"enum": ["New York", "Rio de Janeiro", "Hong Kong"]},
        "motto": {"type": "string", "pattern": "^[a-z]{1,6}( [a-z]{1,6}){1,2}$"},
    },
    "required": ["name", "city", "motto"],
    "additionalProperties": False,
}

# ---------------------------------------------------------------------------------------------------- tokenizers

SP_SPECIALS = ["<unk>", "<s>", "</s>"]
SP_BYTES = [f"<0x{b:02X}>" for b in range(256)]


def sentencepiece_tokenizer(decoder: str = "llama2") -> PreTrainedTokenizerFast:
    """A Llama-2-like tokenizer: BPE over ``▁``-joined words with byte fallback (ids 3..258 are ``<0x00>``..
    ``<0xFF>``, ordinary vocabulary entries as in Llama-2), trained on local text whose rarer characters (tabs,
    Greek, CJK, emoji) have no piece of their own. ``decoder``: "llama2" (``Replace ▁, ByteFallback, Fuse,
    Strip``, transformers' Llama converter) or "metaspace" (``ByteFallback, Metaspace``)."""
    text = CORPUS + "\ncafé naïve über façade déjà vu, crème brûlée, straße\n" * 20
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SP_SPECIALS, limit_alphabet=64, show_progress=False)
    base.train_from_iterator([text], trainer)
    trained = json.loads(base.to_str())["model"]
    vocab = {piece: i for i, piece in enumerate(SP_SPECIALS + SP_BYTES)}
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    if decoder == "llama2":
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    else:
        steps = [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always")]
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens(SP_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=False
    )


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sentencepiece-tokenizer")
    sentencepiece_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dirs(tiny_model, smollm2, sp_dir) -> dict[str, tuple[Path, Path]]:
    """family -> (model folder, tokenizer folder); the SentencePiece tokenizer drives the tiny Llama's weights."""
    llama = tiny_model("llama")
    return {
        "byte_level_bpe": (llama, llama),
        "qwen2": (tiny_model("qwen2"),) * 2,
        "smollm2_gguf": (Path(smollm2.hf_dir),) * 2,
        "sentencepiece": (llama, sp_dir),
    }


@pytest.fixture(scope="module")
def tokenizers_(model_dirs) -> dict[str, Any]:
    return {family: AutoTokenizer.from_pretrained(tok_dir) for family, (_, tok_dir) in model_dirs.items()}


@pytest.fixture(scope="module")
def tables(tokenizers_) -> dict[str, TokenTable]:
    return {family: token_bytes(tok) for family, tok in tokenizers_.items()}


def ids_of(tokenizer: Any, *pieces: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(pieces))
    assert tokenizer.unk_token_id not in ids or tokenizer.unk_token_id is None, pieces
    return ids


# ---------------------------------------------------------------------------------------------------- derivation


def test_loaded_tokenizers_are_the_intended_families(tokenizers_, tables):
    assert type(tokenizers_["qwen2"]).__name__ == "Qwen2Tokenizer"
    assert tables["byte_level_bpe"].decoder == tables["qwen2"].decoder == "ByteLevel"
    assert tables["smollm2_gguf"].decoder == "Sequence[ByteFallback, Fuse, Replace, ByteLevel]"
    assert tables["sentencepiece"].decoder == "Sequence[Replace, ByteFallback, Fuse, Strip]"


@pytest.mark.parametrize("family", ["byte_level_bpe", "qwen2", "smollm2_gguf"])
def test_byte_level_tokens_map_back_to_bytes(tokenizers_, tables, family):
    tok, table = tokenizers_[family], tables[family]
    space, newline, tab, lead, cont = ids_of(tok, "Ġ", "Ċ", "ĉ", "Ã", "©")
    assert [table.tokens[i] for i in (space, newline, tab, lead, cont)] == [b" ", b"\n", b"\t", b"\xc3", b"\xa9"]
    assert table.tokens[tok.convert_tokens_to_ids("Ġa")] == b" a"
    # The one-character tokens of the byte alphabet are distinct bytes (all 256 in the tiny BPE, trained with the
    # whole alphabet; SmolLM2's vocabulary lacks most control bytes and those UTF-8 never uses).
    vocab = tok.get_vocab()
    present = [vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab]
    singles = {table.tokens[i] for i in present}
    assert len(singles) == len(present) and all(len(b) == 1 for b in singles)
    assert len(singles) == (256 if family != "smollm2_gguf" else len(present)) and len(singles) > 200


def test_smollm2_space_token_is_a_space(tokenizers_, tables):
    """The reported bug: token 216 "Ġ" is one space (llguidance read it as the two UTF-8 bytes of "Ġ")."""
    tok, table = tokenizers_["smollm2_gguf"], tables["smollm2_gguf"]
    assert tok.convert_ids_to_tokens(216) == "Ġ" and table.tokens[216] == b" "
    assert table.special_ids == frozenset(range(17))  # <|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...
    assert table.tokens[2] == b"<|im_end|>"


@pytest.mark.parametrize("decoder", ["llama2", "metaspace"])
def test_sentencepiece_pieces_and_byte_fallback(decoder):
    tok = sentencepiece_tokenizer(decoder)
    table = token_bytes(tok)
    pieces = ["<0x41>", "<0x09>", "<0xE2>", "<0xFF>", "▁", "\n", "é"]
    expected = [b"A", b"\t", b"\xe2", b"\xff", b" ", b"\n", "é".encode()]
    assert [table.tokens[i] for i in ids_of(tok, *pieces)] == expected
    word = next(p for p in tok.get_vocab() if p.startswith("▁") and len(p) > 3)
    assert table.tokens[tok.convert_tokens_to_ids(word)] == word.replace("▁", " ").encode()
    assert table.special_ids == frozenset({0, 1, 2})
    verify_token_bytes(tok, table)  # both decoder spellings check out


@pytest.mark.parametrize("family", FAMILIES)
def test_table_verifies_and_llguidance_gets_it(tokenizers_, tables, family):
    tok, table = tokenizers_[family], tables[family]
    verify_token_bytes(tok, table)
    eos = [tok.eos_token_id]
    lltok = lltokenizer(tok, table, len(table.tokens) + 40, eos)
    assert lltok.vocab_size == len(table.tokens) + 40
    assert all(lltok.is_special_token(i) for i in table.special_ids)
    text_ids = [i for i in range(len(table.tokens)) if i not in table.special_ids and table.tokens[i][:1] != b"\xff"]
    assert not any(lltok.is_special_token(i) for i in text_ids)
    assert all(lltok.decode_bytes([i]) == table.tokens[i] for i in text_ids)


def test_backend_policy_forbids_the_special_tokens(tokenizers_, tables):
    tok, table = tokenizers_["smollm2_gguf"], tables["smollm2_gguf"]
    with LLGuidanceBackend(tok, len(table.tokens) + 64, eos_token_ids=[2], isolate_compiles=False) as backend:
        assert backend.policy.eos_ids == {2}
        assert set(table.special_ids) - {2} <= backend.policy.never_ids
        assert not {216, 253} & backend.policy.never_ids


# ---------------------------------------------------------------------------------------------------- the check


def test_corrupted_table_is_a_startup_error_naming_the_tokens(tokenizers_, tables):
    tok, table = tokenizers_["smollm2_gguf"], tables["smollm2_gguf"]
    lead = tok.convert_tokens_to_ids("Ã")  # b"\xc3": only checkable completed into a whole character
    tokens = list(table.tokens)
    tokens[216] = "Ġ".encode()  # what llguidance used to believe
    tokens[lead] = b"\xc4"
    with pytest.raises(ConfigError) as err:
        verify_token_bytes(tok, TokenTable(tuple(tokens), table.special_ids, table.decoder))
    message = str(err.value)
    assert "2 token(s)" in message and "id 216 'Ġ'" in message and f"id {lead} 'Ã'" in message
    assert "ByteFallback, Fuse, Replace, ByteLevel" in message


def test_corrupted_byte_fallback_token_is_caught(tokenizers_, tables):
    tok, table = tokenizers_["sentencepiece"], tables["sentencepiece"]
    tokens = list(table.tokens)
    tokens[tok.convert_tokens_to_ids("<0xE2>")] = b"\xe3"
    with pytest.raises(ConfigError, match=r"1 token\(s\).*'<0xE2>'"):
        verify_token_bytes(tok, TokenTable(tuple(tokens), table.special_ids, table.decoder))


def test_neighbour_dependent_decode_is_refused(tiny_model):
    """With SmolLM2's decoder, a token holding a character outside the byte alphabet (here an added token with a
    space) makes the whole fused text fall back to raw characters: "Ġ" then shows as "Ġ" around it."""
    tok = AutoTokenizer.from_pretrained(tiny_model("llama"))
    tok.backend_tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " "), decoders.ByteLevel()]
    )
    tok.add_tokens(["hello world"])
    with pytest.raises(ConfigError, match="'hello world'"):
        verify_token_bytes(tok, token_bytes(tok))


@pytest.mark.parametrize(
    "decoder, match",
    [(decoders.WordPiece(), "WordPiece"), (decoders.CTC(), "CTC"), (decoders.BPEDecoder(), "BPEDecoder")],
)
def test_decoders_without_per_token_bytes_are_refused(tiny_model, decoder, match):
    tok = AutoTokenizer.from_pretrained(tiny_model("llama"))
    tok.backend_tokenizer.decoder = decoder
    with pytest.raises(ConfigError, match=match):
        token_bytes(tok)


def test_text_clean_up_after_decoding_is_refused():
    vocab = [("<unk>", 0.0), ("▁a", -1.0), ("▁.", -1.0), ("▁,", -1.0), ("▁b", -1.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz.,!?'"]
    raw = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", clean_up_tokenization_spaces=True)
    with pytest.raises(ConfigError, match="clean_up_tokenization_spaces"):
        verify_token_bytes(tok, token_bytes(tok))


# ---------------------------------------------------------------------------------------------------- forced text


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("text", ["a b", " yes", '{"city":"New York"', "x\ty\n\nz", "日本 😀", "<|im_end|>"])
def test_forced_text_tokenizes_to_exactly_its_bytes(tokenizers_, tables, family, text):
    """llguidance allows the tokens it gets for forced text; a SentencePiece encode would add a leading space."""
    table, tok = tables[family], tokenizers_[family]
    ids = TextTokenizer(table, tok.backend_tokenizer)(text.encode())
    assert b"".join(table.tokens[i] for i in ids) == text.encode()
    # A chat marker's text is the marker (which the token policy refuses: test_constrained), where it is one.
    marker = tok.convert_tokens_to_ids(text) if text in tok.get_vocab() else None
    assert set(ids) & table.special_ids == ({marker} if marker in table.special_ids else set())


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def engines(model_dirs):
    """family -> engine, built on first use; one per family for the module."""
    built: dict[str, Any] = {}

    def get(family: str):
        if family not in built:
            model_dir, tok_dir = model_dirs[family]
            extra = {"max_total_tokens": 4096} if family == "smollm2_gguf" else {"tokenizer_path": str(tok_dir)}
            built[family] = make_engine(model_dir, **extra)
        return built[family]

    yield get
    for eng in built.values():
        eng.shutdown()


def prompt_ids(engine: Any, family: str, question: str) -> list[int]:
    tok = engine.tokenizer
    if family == "sentencepiece":
        return tok.encode(question)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    return [int(i) for i in (ids if isinstance(ids, list) else ids["input_ids"])]


def table_text(engine: Any, out: Any) -> str:
    """The output as the grammar saw it: the table bytes of every generated token but the final EOS."""
    table = token_bytes(engine.tokenizer)
    body = out.token_ids[:-1] if out.token_ids and out.token_ids[-1] in engine.eos_token_ids else out.token_ids
    return b"".join(table.tokens[i] for i in body).decode()


@pytest.mark.parametrize("family", FAMILIES)
def test_regexes_fullmatch_on_every_output(engines, family):
    engine = engines(family)
    prompt = prompt_ids(engine, family, "What time is it? Answer briefly.")
    patterns = SPACE_REGEXES + OTHER_REGEXES
    params = [SamplingParams(regex=p, temperature=t, seed=s, max_new_tokens=24) for p in patterns
              for t, s in ((0.0, 0), (1.0, 1))]
    outs = engine.generate(input_ids=[prompt] * len(params), sampling_params=params)
    for p, out in zip(params, outs):
        assert out.finish_reason == "stop", (p.regex, out.finish_reason, out.error, out.text)
        assert re.fullmatch(p.regex, table_text(engine, out)), (p.regex, out.text)
        # The text is what the grammar accepted, also where the SentencePiece decoder would strip the space of a
        # text's first token (the detokenizer decodes with prompt tokens as left context).
        assert out.text == table_text(engine, out), (p.regex, out.text)
    assert engine.check_invariants() == []


def test_smollm2_answers_the_time_regexes(engines):
    engine = engines("smollm2_gguf")
    prompt = prompt_ids(engine, "smollm2_gguf", "It is ten in the morning. What time is it?")
    params = [SamplingParams(regex=p, temperature=0.0, max_new_tokens=12) for p in SPACE_REGEXES]
    texts = [out.text for out in engine.generate(input_ids=[prompt] * len(params), sampling_params=params)]
    assert all(re.fullmatch(p, t) for p, t in zip(SPACE_REGEXES, texts)), texts


@pytest.mark.parametrize("family", FAMILIES)
def test_json_string_values_with_spaces_validate(engines, family):
    engine = engines(family)
    prompt = prompt_ids(engine, family, "Describe a person as JSON with a name, a city and a short motto.")
    params = [SamplingParams(json_schema=PERSON, temperature=t, seed=s, max_new_tokens=160)
              for t, s in ((0.0, 0), (0.8, 1), (1.0, 2))]
    for out in engine.generate(input_ids=[prompt] * len(params), sampling_params=params):
        assert out.finish_reason == "stop", (out.error, out.text)
        value = json.loads(out.text)
        jsonschema.validate(value, PERSON)
        assert " " in value["city"] and " " in value["motto"]
    assert engine.check_invariants() == []
