"""Tests for the incremental detokenizer (UTF-8 safe deltas) and the stop-string matcher."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from xinf_sglang.runtime.scheduler.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringMatcher

WORDS = (
    "héllo", "wörld", "世界", "🙂", "the", "quick", "brown", "fox", "naïve", "café", "Привет", "こんにちは",
    "👍🏽", "日本語", "ünïcödé", "jumps", "over", "lazy", "dog", "€100", "😀😃", "hello", "world", ".", ",",
)  # fmt: skip

SAMPLE_TEXTS = (
    "héllo wörld 世界 🙂",
    "the quick brown fox jumps over the lazy dog",
    "Привет, こんにちは! 日本語 👍🏽 😀😃 café naïve €100",
    "🙂🙂🙂 世界世界 ünïcödé",
    "emoji alone: 🦀 and 🧪 (never in the training text)",
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on a few KB of mixed-script text; its tiny vocabulary splits characters."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(100)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def stream(tokenizer, ids: list[int], chunks: list[int] | None = None, skip_special_tokens: bool = True):
    """Feed `ids` in chunks of the given sizes (default one token at a time); return (deltas, flushed text)."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas, start = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(detok.add(ids[start : start + size]))
        start += size
    if start < len(ids):
        deltas.append(detok.add(ids[start:]))
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


# --- incremental detokenizer ---------------------------------------------------------------------------------------


def test_fixture_splits_characters_across_tokens(tokenizer) -> None:
    # The tests below are only meaningful if some token ends inside a multi-byte character.
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("🙂 🦀 世界")]
    assert any(REPLACEMENT_CHAR in piece for piece in pieces)


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_token_by_token_equals_full_decode_without_half_characters(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids) == text
    assert tail == ""  # the text ends on a whole character, so nothing stays held back
    assert all(REPLACEMENT_CHAR not in d for d in deltas)


def test_emoji_split_across_tokens_is_emitted_whole(tokenizer) -> None:
    ids = tokenizer.encode("a🦀b")
    assert len(ids) > 3  # the crab emoji takes several byte tokens
    deltas, _ = stream(tokenizer, ids)
    assert [d for d in deltas if d] == ["a", "🦀", "b"]


def test_text_before_an_unfinished_character_is_not_delayed(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    emoji_ids = tokenizer.encode("🦀")
    assert detok.add(tokenizer.encode("ok ") + emoji_ids[:1]) == "ok "
    assert detok.add(emoji_ids[1:]) == "🦀"


def test_flush_emits_held_bytes_when_stopped_mid_character(tokenizer) -> None:
    ids = tokenizer.encode("done 🦀")[:-1]  # cut inside the emoji
    full = tokenizer.decode(ids)
    assert full.endswith(REPLACEMENT_CHAR)
    deltas, tail = stream(tokenizer, ids)
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "".join(deltas) == "done "
    assert "".join(deltas) + tail == full


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip: bool) -> None:
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = tokenizer.encode("héllo") + [eos] + tokenizer.encode(" 世界") + [eos]
    deltas, tail = stream(tokenizer, ids, skip_special_tokens=skip)
    text = "".join(deltas) + tail
    assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|endoftext|>" in text) is not skip


def test_chunked_adds_equal_token_by_token(tokenizer) -> None:
    ids = tokenizer.encode(" ".join(SAMPLE_TEXTS))
    rng = random.Random(0)
    chunks = [rng.randint(1, 5) for _ in range(len(ids))]
    deltas, tail = stream(tokenizer, ids, chunks)
    assert "".join(deltas) + tail == tokenizer.decode(ids)


def test_each_call_decodes_a_small_window(tokenizer) -> None:
    class CountingTokenizer:
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            self.longest = max(self.longest, len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = CountingTokenizer()
    ids = tokenizer.encode(" ".join(SAMPLE_TEXTS * 20))
    deltas, tail = stream(counting, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids)
    assert len(ids) > 500 and counting.longest <= 12  # O(window), not O(length)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_token_streams_equal_full_decode(tokenizer, data) -> None:
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=40), label="ids")
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=40), label="chunks")
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    deltas, tail = stream(tokenizer, ids, chunks, skip_special_tokens=skip)
    assert "".join(deltas) + tail == full
    if REPLACEMENT_CHAR not in full:
        assert all(REPLACEMENT_CHAR not in d for d in deltas)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from("aé世🙂👍🏽 x€ж"), max_size=30))
def test_random_valid_text_never_shows_half_characters(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == text
    assert tail == ""
    assert all(REPLACEMENT_CHAR not in d for d in deltas)


# --- stop strings --------------------------------------------------------------------------------------------------


def run_matcher(stop: list[str], deltas: list[str]) -> tuple[str, bool]:
    """Everything the matcher lets through for `deltas` (plus its flush when no stop was hit during the stream), and
    whether a stop string ended it (during the stream or at the flush)."""
    matcher = StopStringMatcher(stop)
    out = []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out.append(text)
        if stopped:
            assert matcher.stopped
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), matcher.stopped


def test_later_stop_applies_when_the_earlier_candidate_never_completes() -> None:
    # "ab": "b" is complete at 1 while "aba" (from 0) might still come; the stream ends, so "b" stops it.
    assert run_matcher(["b", "aba"], ["ab"]) == ("a", True)
    assert run_matcher(["b", "aba"], ["a", "b"]) == ("a", True)
    assert run_matcher(["b", "aba"], ["aba"]) == ("", True)  # the earlier-starting one completes: it wins


def cut_before_first_stop(text: str, stop: list[str]) -> str:
    starts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(starts)] if starts else text


def test_stop_string_in_one_delta() -> None:
    assert run_matcher(["STOP"], ["hello STOP world"]) == ("hello ", True)


def test_stop_string_split_across_deltas() -> None:
    assert run_matcher(["STOP"], ["hello S", "T", "O", "P world"]) == ("hello ", True)


def test_possible_stop_prefix_is_held_then_released() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("go ST") == ("go ", False)
    assert matcher.feed("ART") == ("START", False)
    assert matcher.feed(" ST") == (" ", False)
    assert matcher.flush() == "ST"


def test_overlapping_prefix() -> None:
    assert run_matcher(["ab"], ["a", "a", "b"]) == ("a", True)
    assert run_matcher(["ab"], ["aab"]) == ("a", True)
    assert run_matcher(["aab"], ["a", "a", "a", "b", "c"]) == ("a", True)


def test_multiple_stop_strings_earliest_wins() -> None:
    assert run_matcher(["world", "lo"], ["hello world"]) == ("hel", True)
    assert run_matcher(["world", "lo"], ["h", "e", "l", "l", "o world"]) == ("hel", True)


def test_earlier_starting_stop_wins_even_if_a_later_one_completes_first() -> None:
    # "bc" completes at "xabc" but "abcd" starts earlier and may still complete: wait for it.
    assert run_matcher(["abcd", "bc"], ["xa", "b", "c", "d"]) == ("x", True)
    assert run_matcher(["abcd", "bc"], ["xa", "b", "c", "e"]) == ("xa", True)


def test_matched_stop_string_reported() -> None:
    matcher = StopStringMatcher(["END", "EN"])
    assert matcher.feed("the EN") == ("the ", True)
    assert matcher.matched == "EN"
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_no_stop_strings_pass_everything() -> None:
    assert run_matcher([], ["a", "b"]) == ("ab", False)


def test_empty_stop_string_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


@settings(max_examples=400, deadline=None)
@given(
    before=st.text(alphabet="abcé世", max_size=20),
    after=st.text(alphabet="abcé世", max_size=20),
    stop=st.lists(st.text(alphabet="abcé世", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 50), max_size=12),
)
def test_random_splits_equal_one_piece_search(before: str, after: str, stop: list[str], cuts: list[int]) -> None:
    text = before + stop[0] + after
    points = sorted({c for c in cuts if c <= len(text)} | {0, len(text)})
    deltas = [text[a:b] for a, b in zip(points, points[1:])]
    out, stopped = run_matcher(stop, deltas)
    assert stopped
    assert out == cut_before_first_stop(text, stop)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=30),
    stop=st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_random_text_with_or_without_stop(text: str, stop: list[str], cuts: list[int]) -> None:
    points = sorted({c for c in cuts if c <= len(text)} | {0, len(text)})
    deltas = [text[a:b] for a, b in zip(points, points[1:])]
    out, stopped = run_matcher(stop, deltas)
    assert out == cut_before_first_stop(text, stop)
    assert stopped == any(s in text for s in stop)


def test_detokenizer_then_stop_matcher(tokenizer) -> None:
    text = "héllo wörld 世界 🙂 the quick brown fox"
    ids = tokenizer.encode(text)
    detok, matcher = IncrementalDetokenizer(tokenizer), StopStringMatcher(["界 🙂"])
    shown = []
    for token in ids:
        piece, stopped = matcher.feed(detok.add([token]))
        shown.append(piece)
        if stopped:
            break
    assert stopped
    assert "".join(shown) == "héllo wörld 世"


@pytest.mark.parametrize("decoder", ["llama2", "metaspace"])
def test_prompt_context_keeps_the_space_of_the_first_sentencepiece_token(decoder: str) -> None:
    """A SentencePiece decoder strips the space of a text's first ``▁piece``; decoded after the prompt's last
    tokens, the output reads as it does inside the sequence (what a grammar that forced " 1" accepted)."""
    from .test_token_table import sentencepiece_tokenizer

    tok = sentencepiece_tokenizer(decoder)
    prompt = tok.encode("The answer is", add_special_tokens=False)
    output = tok.encode("1 and 2", add_special_tokens=False)  # the normalizer prepends the ▁
    assert tok.convert_ids_to_tokens(output[0]).startswith("▁")
    whole = tok.decode(prompt + output)
    expected = whole[len(tok.decode(prompt)):]
    assert expected.startswith(" 1")

    with_context = IncrementalDetokenizer(tok, prompt_ids=prompt)
    text = "".join(with_context.add([t]) for t in output) + with_context.flush()
    assert text == expected and with_context.token_ids == output
    without = IncrementalDetokenizer(tok)
    assert "".join(without.add([t]) for t in output) + without.flush() == expected.lstrip(" ")


def test_prompt_ending_inside_a_character_gives_no_context(tokenizer) -> None:
    """A prompt whose last token ends mid-character is no context: the output reads as without one."""
    ids = tokenizer.encode("wörld 🦀 and 🧪", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith(REPLACEMENT_CHAR))
    with_prompt, alone = IncrementalDetokenizer(tokenizer, prompt_ids=ids[:cut]), IncrementalDetokenizer(tokenizer)
    for detok in (with_prompt, alone):
        for t in ids[cut:]:
            detok.add([t])
        detok.flush()
    assert with_prompt.text == alone.text == tokenizer.decode(ids[cut:])
