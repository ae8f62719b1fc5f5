"""The GGUF tokenizer cache (issue 33 point 4): the first load converts and writes an entry beside the file, the
second loads it (the log names the cache, and no conversion runs), both tokenizers give the same ids (plain text,
special tokens, the chat template), a damaged entry is rebuilt, and a folder that cannot be written falls back to
``$SGLITE_CACHE/tokenizers``. Real tiny GGUF files written by the runtime's writer; nothing mocked."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from xinf_sglang.runtime.model_loader import gguf_tokenizer_cache as cache
from xinf_sglang.runtime.model_loader.checkpoint import GGUFCheckpoint, open_checkpoint

from .gguf_writer import write_gguf

LOGGER = "xinf_sglang.runtime.model_loader.gguf_tokenizer_cache"
TEXTS = ["def f(x):\n\treturn x  # héllo 😀", "<|im_start|>user\nThe quick brown fox<|im_end|>\n", "12345 6789"]
# tiny DeepSeek-V2's YaRN as the llama.cpp writer represents it (tests/test_gguf_deepseek.REPRESENTABLE)
DEEPSEEK = {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024,
                             "mscale": 0.707, "mscale_all_dim": 0.707}}


@pytest.fixture
def gguf_file(tmp_path: Path, tiny_model, monkeypatch):
    """``build(arch) -> Path``: a tiny GGUF alone in a fresh folder; the user cache redirected into tmp_path."""
    monkeypatch.setenv("SGLITE_CACHE", str(tmp_path / "user-cache"))

    def build(arch: str = "qwen2") -> Path:
        folder = tmp_path / f"model-{arch}"
        folder.mkdir()
        source = tiny_model(arch, **(DEEPSEEK if arch.startswith("deepseek") else {}))
        return write_gguf(source, folder / f"tiny-{arch}.gguf", "Q8_0")

    return build


def _load(path: Path, caplog) -> tuple[object, list[str]]:
    """The checkpoint's tokenizer and the cache's log lines of that load."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ckpt = open_checkpoint(path)
        assert isinstance(ckpt, GGUFCheckpoint)
        tokenizer = ckpt.load_tokenizer()
    return tokenizer, [r.getMessage() for r in caplog.records if r.name == LOGGER]


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(".sglite-tokenizer-"))


def _assert_same(a, b) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi <|im_end|> there"}]
    assert [a(t).input_ids for t in TEXTS] == [b(t).input_ids for t in TEXTS]
    assert a.apply_chat_template(chat, add_generation_prompt=True) == b.apply_chat_template(
        chat, add_generation_prompt=True)
    assert (a.eos_token_id, a.bos_token_id, a.chat_template) == (b.eos_token_id, b.bos_token_id, b.chat_template)
    assert a.decode(a(TEXTS[1]).input_ids) == b.decode(b(TEXTS[1]).input_ids)


@pytest.mark.parametrize("arch", ["qwen2", "deepseek_v2"])
def test_second_load_reads_the_entry_and_tokenizes_alike(arch: str, gguf_file, caplog) -> None:
    """qwen2: transformers' converter; deepseek_v2: sglite's own `gguf_tokenizer`."""
    path = gguf_file(arch)
    first, logs = _load(path, caplog)
    [entry] = _entries(path.parent)
    assert any("converted and cached beside the GGUF file" in m for m in logs), logs
    assert (entry / cache.MANIFEST).is_file()
    second, logs = _load(path, caplog)
    assert logs == [f"sglite: GGUF tokenizer loaded from the cache {entry}"]
    _assert_same(first, second)
    assert _entries(path.parent) == [entry]  # the entry is the only thing written beside the file


@pytest.mark.parametrize("damage", ["truncate tokenizer.json", "drop manifest", "garble manifest"])
def test_a_damaged_entry_is_rebuilt(damage: str, gguf_file, caplog) -> None:
    path = gguf_file()
    reference, _ = _load(path, caplog)
    [entry] = _entries(path.parent)
    if damage == "truncate tokenizer.json":
        data = (entry / "tokenizer.json").read_bytes()
        (entry / "tokenizer.json").write_bytes(data[: len(data) // 2])
    elif damage == "drop manifest":
        (entry / cache.MANIFEST).unlink()
    else:
        (entry / cache.MANIFEST).write_text("{not json")
    rebuilt, logs = _load(path, caplog)
    assert any("is unusable" in m and "removing it and converting again" in m for m in logs), logs
    assert any("converted and cached" in m for m in logs), logs
    cache.load_entry(entry)  # the rebuilt entry is whole again
    _assert_same(reference, rebuilt)


def test_the_key_follows_the_metadata(gguf_file, tmp_path: Path) -> None:
    """Another file with the same metadata shares the key (size and mtime play no part); edited metadata does not."""
    path = gguf_file()
    end = open_checkpoint(path).metadata_end
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    assert cache.cache_key(copy, end) == cache.cache_key(path, end)
    data = bytearray(path.read_bytes())
    template = data.find(b"{%")  # a byte of the chat template, inside the metadata
    assert 0 < template < end
    data[template + 1] = ord("-")
    copy.write_bytes(bytes(data))
    assert cache.cache_key(copy, end) != cache.cache_key(path, end)


def test_unwritable_folder_falls_back_to_the_user_cache(gguf_file, tmp_path: Path, caplog) -> None:
    """A candidate folder that cannot be created (its parent is a file: what a read-only folder does to root, who
    ignores permission bits) is skipped with a warning; the entry lands in the user cache and loads from there."""
    path = gguf_file()
    tokenizer = open_checkpoint(path).convert_tokenizer()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    user = tmp_path / "user-cache" / "tokenizers" / "entry"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        cache._store(tokenizer, [blocked / "entry", user])
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert any("cannot write the GGUF tokenizer cache" in m for m in messages), messages
    assert any("in the user cache (the GGUF's folder is not writable)" in m for m in messages), messages
    _assert_same(tokenizer, cache.load_entry(user))
    assert json.loads((user / cache.MANIFEST).read_text())["version"] == cache.CACHE_VERSION


def _assert_identical(ours, ref) -> None:
    """Everything of the two tokenizers that the runtime, the constrained decoders and the plugin read."""
    assert type(ours) is type(ref)
    assert ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    assert ours.special_tokens_map == ref.special_tokens_map and ours.all_special_ids == ref.all_special_ids
    assert {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in ref.added_tokens_decoder.items()}
    assert ours.get_vocab() == ref.get_vocab() and len(ours) == len(ref)
    for attr in ("chat_template", "model_max_length", "clean_up_tokenization_spaces", "padding_side",
                 "pad_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    _assert_same(ours, ref)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "deepseek_v2"])
def test_an_entry_loads_as_from_pretrained_builds_it(arch: str, gguf_file, caplog) -> None:
    """The entry is read through the constructor (`_from_folder`, no second parse of tokenizer.json), and the
    result equals ``from_pretrained``'s on the same folder."""
    from transformers import PreTrainedTokenizerFast

    path = gguf_file(arch)
    _load(path, caplog)
    [entry] = _entries(path.parent)
    config = json.loads((entry / "tokenizer_config.json").read_text())
    assert cache._plain(config, PreTrainedTokenizerFast.SPECIAL_TOKENS_ATTRIBUTES)  # the direct path is the one taken
    _assert_identical(cache.load_entry(entry), PreTrainedTokenizerFast.from_pretrained(entry))


def test_smollm2_entry_loads_as_from_pretrained_builds_it(smollm2) -> None:
    from transformers import PreTrainedTokenizerFast

    ckpt = open_checkpoint(smollm2.gguf)
    ckpt.load_tokenizer()  # writes the entry if this machine has none yet
    end = ckpt.metadata_end
    entry = next(p for p in cache.cache_dirs(smollm2.gguf, cache.cache_key(smollm2.gguf, end)) if p.exists())
    _assert_identical(cache.load_entry(entry), PreTrainedTokenizerFast.from_pretrained(entry))
