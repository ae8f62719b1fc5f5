"""The tokenizer of a GGUF file whose architecture transformers' GGUF reader refuses (`OWN_TOKENIZER`: llama.cpp's
``deepseek2``; transformers 5.17 reads neither its config nor, through ``AutoTokenizer``, its vocabulary).

What the file holds (facts of llama.cpp's ``convert_hf_to_gguf.py``, ``_set_vocab_gpt2``): ``tokenizer.ggml.model``
``gpt2`` (byte-level BPE), ``.tokens`` in id order, ``.merges`` as ``"left right"`` strings, ``.token_type`` (3 =
control: special tokens, never split), ``.bos_token_id`` / ``.eos_token_id``, ``.add_bos_token`` and the chat
template. The pre-tokenizer is not in the file: llama.cpp picks its split regexes by the ``tokenizer.ggml.pre`` name
(``deepseek-v3``, ``deepseek-llm``, ...). This reader splits as GPT-2 does, like transformers' own GGUF converter of
``gpt2`` vocabularies; the ids of a text may then differ from the HF tokenizer's where the regexes differ (runs of
digits, CJK), never the decoding of ids.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..errors import ConfigError

OWN_TOKENIZER = frozenset({"deepseek2"})
"""GGUF architectures whose tokenizer sglite builds itself (`gguf_tokenizer`) instead of ``AutoTokenizer``."""
TOKEN_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


class GGUFMetadata(Protocol):
    """What this module reads of `gguf.GGUFMetadata`."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def require(self, key: str) -> Any: ...


def gguf_tokenizer(metadata: GGUFMetadata) -> Any:
    """A ``PreTrainedTokenizerFast`` of the file's ``gpt2`` vocabulary: BPE over byte-level GPT-2 splits, control
    tokens special, BOS prepended when ``add_bos_token`` says so, the chat template.

    Raises:
        ConfigError: the vocabulary is not ``gpt2`` (byte-level BPE), or lacks tokens or merges.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConfigError(f"GGUF tokenizer model {model!r} is not supported for this architecture; sglite reads gpt2 "
                          "(byte-level BPE) vocabularies")
    tokens = list(metadata.require("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in metadata.require("tokenizer.ggml.merges")]
    types = list(metadata.get("tokenizer.ggml.token_type") or [])
    backend = Tokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, kind in enumerate(types) if kind == TOKEN_CONTROL])
    names = {name: _token(metadata, tokens, f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "padding")}
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token") and bos_id is not None:
        bos = tokens[int(bos_id)]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, int(bos_id))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=names["bos"], eos_token=names["eos"],
                                   pad_token=names["padding"],
                                   chat_template=metadata.get("tokenizer.chat_template"))


def _token(metadata: GGUFMetadata, tokens: list[str], key: str) -> str | None:
    token_id = metadata.get(key)
    return None if token_id is None or not 0 <= int(token_id) < len(tokens) else tokens[int(token_id)]
