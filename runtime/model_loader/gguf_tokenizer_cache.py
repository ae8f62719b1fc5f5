"""The tokenizer of a GGUF file, converted once and kept on disk (issue 33 point 4).

Converting a GGUF vocabulary into a fast tokenizer (transformers' GGUF converter, or `gguf_tokenizer` for
``deepseek2``) takes ~7-11 s on a 49k-token vocabulary; loading the saved result takes ~0.1 s. So the converted
tokenizer is saved (``save_pretrained``) in a folder beside the file, ``.sglite-tokenizer-<file stem>-<key>``, or,
when that folder is not writable, under ``$SGLITE_CACHE/tokenizers`` (default ``~/.cache/sglite/tokenizers``).

The key: SHA-256 of the file's header, metadata and tensor table (the bytes before the tensor data), the
converter's versions (transformers, tokenizers) and `CACHE_VERSION`. The tokenizer is a function of the metadata
alone, so hashing all of it is sound (an edited vocabulary or template is a new key) and cheap (~2 MB, a few ms);
hashing the whole file would also be sound but reads gigabytes for a large model, costing more than the conversion.
Size and mtime are not part of the key: a copied or touched file keeps its entry.

An entry is written into a temporary folder and renamed into place (readers never see half an entry); its
``manifest.json``, written last, holds the SHA-256 of every file. A folder without a valid manifest, with a file
whose hash differs or that transformers cannot load is logged, removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when what is saved changes: older entries are then never read
MANIFEST = "manifest.json"


class CacheEntryError(Exception):
    """A cache entry that cannot be used (missing manifest, a file whose hash differs, unloadable)."""


def cache_key(file: Path, metadata_end: int) -> str:
    """The entry key of ``file`` (see the module docstring): hex SHA-256, 16 characters."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(f"sglite-tokenizer {CACHE_VERSION} transformers {transformers.__version__} tokenizers "
                            f"{tokenizers.__version__}\n".encode())
    with open(file, "rb") as f:
        digest.update(f.read(metadata_end))
    return digest.hexdigest()[:16]


def cache_dirs(file: Path, key: str) -> list[Path]:
    """Where the entry of ``file`` may be, in lookup order: beside the file, then the user cache."""
    root = os.environ.get("SGLITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sglite")
    name = f".sglite-tokenizer-{file.stem}-{key}"
    return [file.parent / name, Path(root) / "tokenizers" / name.lstrip(".")]


def cached_tokenizer(file: Path, metadata_end: int, convert: Callable[[], Any]) -> Any:
    """The tokenizer of GGUF ``file`` (first part): a valid cache entry loaded, else ``convert()`` run and saved.

    ``metadata_end``: where the tensor data starts (the reader's ``data_offset``)."""
    key = cache_key(file, metadata_end)
    candidates = cache_dirs(file, key)
    for folder in candidates:
        if folder.exists():
            try:
                tokenizer = load_entry(folder)
            except CacheEntryError as exc:
                logger.warning("sglite: GGUF tokenizer cache %s is unusable (%s): removing it and converting again",
                               folder, exc)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            logger.info("sglite: GGUF tokenizer loaded from the cache %s", folder)
            return tokenizer
    tokenizer = convert()
    _store(tokenizer, candidates)
    return tokenizer


def load_entry(folder: Path) -> Any:
    """The tokenizer saved in ``folder``, after checking every file against its manifest.

    Raises:
        CacheEntryError: no readable manifest, a missing file or a hash mismatch, or transformers fails to load it.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheEntryError(f"no valid {MANIFEST}: {exc}") from None
    for name, digest in files.items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise CacheEntryError(f"{name} is missing or differs from its manifest hash")
    try:
        return _from_folder(folder)
    except Exception as exc:  # transformers raises many types for a bad folder; any of them means rebuild
        raise CacheEntryError(f"transformers cannot load it: {exc}") from None


_NOT_PASSED = ("tokenizer_class", "init_inputs", "add_bos_token", "add_eos_token")
"""Keys of ``tokenizer_config.json`` that ``from_pretrained`` drops before calling the constructor when the folder
holds a ``tokenizer.json`` (the BOS/EOS flags live in its post-processor)."""


def _from_folder(folder: Path) -> Any:
    """The tokenizer ``save_pretrained`` wrote into ``folder``, as ``PreTrainedTokenizerFast.from_pretrained``
    builds it: the constructor with ``tokenizer.json`` and the saved configuration. ``from_pretrained`` also parses
    ``tokenizer.json`` in Python for its added tokens and deep-copies the Rust tokenizer (on SmolLM2's 49k vocabulary
    ~0.2 s and ~8 MiB that stay mapped after); its rewriting of the configuration only matters for what this
    folder may hold but does not here (`_plain`), and then it is used as it is."""
    # The class the conversion builds (gguf_tokenizer.py): not AutoTokenizer, whose import alone is ~2 s and
    # ~150 MiB of transformers' model machinery.
    from transformers import PreTrainedTokenizerFast

    config = json.loads((folder / "tokenizer_config.json").read_text())
    if not _plain(config, PreTrainedTokenizerFast.SPECIAL_TOKENS_ATTRIBUTES) or (
            folder / "additional_chat_templates").exists():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    kwargs = {k: v for k, v in config.items() if k not in _NOT_PASSED}
    template = folder / "chat_template.jinja"
    if template.is_file():
        kwargs["chat_template"] = template.read_text()
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), name_or_path=str(folder), **kwargs)


def _plain(config: dict[str, Any], special: list[str]) -> bool:
    """Whether the saved configuration is what the constructor takes as it is: special tokens as plain strings
    under the standard names, no added-token table or extra special tokens (``from_pretrained`` converts those)."""
    tokens = {k: v for k, v in config.items() if k.endswith("_token")}
    return (not {"added_tokens_decoder", "extra_special_tokens", "additional_special_tokens"} & config.keys()
            and all(k in special and (v is None or isinstance(v, str)) for k, v in tokens.items()))


def _store(tokenizer: Any, candidates: list[Path]) -> None:
    """Save ``tokenizer`` into the first candidate whose parent folder is writable; log where (or why nowhere)."""
    for i, folder in enumerate(candidates):
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            _write_entry(tokenizer, folder)
        except OSError as exc:
            nxt = f"; trying {candidates[i + 1]}" if i + 1 < len(candidates) else ""
            logger.warning("sglite: cannot write the GGUF tokenizer cache in %s (%s)%s", folder.parent, exc, nxt)
            continue
        where = "beside the GGUF file" if i == 0 else "in the user cache (the GGUF's folder is not writable)"
        logger.info("sglite: GGUF tokenizer converted and cached %s: %s", where, folder)
        return
    logger.warning("sglite: the GGUF tokenizer is not cached: the next launch converts it again")


def _write_entry(tokenizer: Any, folder: Path) -> None:
    """Save into a temporary sibling folder, manifest last, then rename it to ``folder`` (atomic on POSIX). A
    concurrent launch that renamed its own entry first wins; ours is dropped."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-", dir=folder.parent))
    try:
        tokenizer.save_pretrained(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"version": CACHE_VERSION, "files": files}, indent=1))
        os.rename(tmp, folder)
    except OSError:
        if not folder.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
