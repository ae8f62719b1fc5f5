"""Prepare what a machine without network access needs to run sglite: its wheel, the dependencies that machine
lacks, and (``--smollm2``) the SmolLM2 fixture, packed into folders small enough to carry one per call.

Made for the GPU device machines (no package registry; each call carries at most 64 MiB, the working tree
included, see the device tool's README), usable for any offline machine::

    python scripts/prepare_offline_wheels.py                        # sglite of the working tree + its deps
    python scripts/prepare_offline_wheels.py --ref v0.1 --extras test --smollm2 --ab-ref HEAD~5
    python scripts/prepare_offline_wheels.py --have target-freeze.txt   # that machine's `pip list --format=freeze`

What goes in:

- sglite's wheel, built from the working tree (its tracked and untracked-not-ignored files) or from ``--ref``
  (``git archive``); ``--ab-ref REF`` adds a second sglite wheel, the old side of ``sglite bench ab``;
- sglite's dependencies (and those of ``--extras``) that the target lacks: its Requires-Dist followed recursively,
  stopping at the packages the target has (``--have``: default the GPU image's list below); ``xinference`` and
  what only it needs come only with ``--xinference``. Wheels for ``--python-version`` on manylinux x86_64 (a
  package with no wheel there is built here with ``pip wheel``, which is right for pure-Python sdists only);
- ``--smollm2``: the fixture's GGUF file (fetched here once, as the ``smollm2`` test fixture does), cut into chunks.

Everything is packed into ``OUT/carry1``, ``OUT/carry2``, ... (each under ``--max-mib``, default what the 64 MiB
of a call leaves beside this working tree; the wheels first), each with the same ``install.sh``, which installs
the folder's wheels into ``$SGLITE_SITE`` (default /tmp/site), the A/B copies into ``$SGLITE_AB/{old,new}``
(default /tmp/ab), and collects GGUF chunks: with the last chunk in, it joins them into
``$SGLITE_CACHE/smollm2-135m-instruct/gguf/`` (default ~/.cache/sglite, where the fixture looks) and checks the
SHA-256. A GPU session (the device tool runs each command in a copy of this checkout and brings the folders its
``carry`` names, which git must ignore: the default ``.whl`` is; the machine stays warm between calls)::

    python scripts/prepare_offline_wheels.py --smollm2 --ab-ref origin/main     # here: .whl/carry1, .whl/carry2
    # call 1, carry [".whl/carry1"]: the wheels and a GGUF chunk
    bash .whl/carry1/install.sh && export PYTHONPATH=/tmp/site
    python3 -P -m pytest -m cuda tests/cuda --ignore tests/cuda/test_cuda_smollm2.py   # -P: the installed copy
    # call 2, carry [".whl/carry2"]: the rest of the GGUF, then the SmolLM2 tests and the benchmarks
    bash .whl/carry2/install.sh && export PYTHONPATH=/tmp/site
    python3 -P -m pytest -m cuda tests/cuda/test_cuda_smollm2.py
    python3 -P -m xinf_sglang.cli bench kernels --model-config configs/llama-3.1-8b.json
    python3 -P -m xinf_sglang.cli bench ab --old /tmp/ab/old --new /tmp/ab/new -- --load-format dummy \
        --model-config configs/llama-3.1-8b.json --num-prompts 1 --input-len 128 --output-len 256
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024**2
CARRY_LIMIT = 64 * MIB  # one device call: the working tree and everything carried
# The GPU machines' image ("cuda"), as listed in the device tool's KINDS.md (2026-11-17): torch, triton and the
# rest come from there. Pass --have with the target's `python3 -m pip list --format=freeze` for another machine.
# Names only: what the target has is never bundled, whatever version a dependency asks for (xinference's click<8.2).
GPU_IMAGE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
"""
TARGET_ENV = {"implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
PLATFORMS = ["manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35, 39)]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure exit with its output."""
    done = subprocess.run(cmd, capture_output=True, **{"text": True, **kw})
    if done.returncode:
        err = done.stderr or done.stdout
        raise SystemExit(f"`{' '.join(cmd)}` exited {done.returncode}:\n{err[-3000:] if done.stderr else ''}")
    return done


def source_tree(ref: str | None, dest: Path) -> Path:
    """A copy of the project at ``ref`` (``git archive``), or of the working tree without ignored files."""
    if ref:
        data = run(["git", "-C", str(ROOT), "archive", "--format=tar", ref], text=False).stdout
        tarfile.open(fileobj=io.BytesIO(data)).extractall(dest, filter="data")
        return dest
    files = run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    for name in filter(None, files.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def build_sglite(ref: str | None, out: Path) -> Path:
    """sglite's wheel of ``ref`` (or of the working tree) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sglite-src-") as tmp:
        src = source_tree(ref, Path(tmp))
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)])
    [wheel] = out.glob("xinf_sglang-*.whl")
    print(f"sglite {ref or 'working tree'}: {wheel.name}")
    return wheel


def requirements(wheel: Path, extras: set[str], python: str) -> list[Requirement]:
    """The Requires-Dist of ``wheel`` that apply on the target with ``extras``."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(zf.read(meta).decode())
    env = dict(TARGET_ENV, python_version=python, python_full_version=f"{python}.0")
    reqs = []
    for text in headers.get_all("Requires-Dist") or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate(dict(env, extra=e)) for e in extras | {""}):
            reqs.append(req)
    return reqs


def fetch(req: Requirement, dest: Path, python: str) -> Path:
    """The target's wheel of ``req`` into ``dest``: a binary one from the index, else built here from its sdist."""
    name = str(Requirement(f"{req.name}{req.specifier}"))
    before = set(dest.iterdir())
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), name]
    if subprocess.run(cmd, capture_output=True).returncode:
        print(f"  {name}: no wheel for the target on the index; building it here (pure-Python sdists only)")
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), name])
    [wheel] = set(dest.iterdir()) - before  # each name is fetched once (`dependencies`)
    return wheel


def dependencies(sglite: Path, extras: set[str], have: set[str], python: str, dest: Path) -> list[Path]:
    """The wheels of what sglite (with ``extras``) needs and the target lacks, followed recursively."""
    dest.mkdir(parents=True, exist_ok=True)
    queue, seen, wheels = requirements(sglite, extras, python), set(), []
    while queue:
        req = queue.pop(0)
        key = canonicalize_name(req.name)
        if key in have or key in seen:
            continue
        seen.add(key)
        wheel = fetch(req, dest, python)
        wheels.append(wheel)
        print(f"  {wheel.name} ({wheel.stat().st_size / MIB:.1f} MiB), for {req}")
        queue += requirements(wheel, set(req.extras), python)
    return wheels


def smollm2_chunks(dest: Path, chunk: int) -> tuple[list[Path], str]:
    """The fixture's GGUF cut into ``chunk``-byte files ``gguf.NN`` in ``dest``, and its SHA-256."""
    sys.path.insert(0, str(ROOT))
    from xinf_sglang.runtime.testing.smollm2 import fetch_smollm2

    gguf = fetch_smollm2().gguf
    dest.mkdir(parents=True, exist_ok=True)
    digest, parts = hashlib.sha256(), []
    with open(gguf, "rb") as f:
        while data := f.read(chunk):
            digest.update(data)
            parts.append(dest / f"gguf.{len(parts):02d}")
            parts[-1].write_bytes(data)
    return parts, digest.hexdigest()


def tree_bytes() -> int:
    """What the working tree adds to each call (tracked and untracked-not-ignored files)."""
    files = run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    return sum((ROOT / n).stat().st_size for n in filter(None, files.split("\0")) if (ROOT / n).is_file())


def pack(items: list[tuple[Path, str]], capacity: int) -> list[list[tuple[Path, str]]]:
    """First-fit packing of ``(file, subfolder)`` items, in their order, into folders of ``capacity`` bytes: the
    wheels come first, so they share the first folder (everything works once it is installed)."""
    bins: list[list[tuple[Path, str]]] = []
    for item in items:
        size = item[0].stat().st_size
        if size > capacity:
            raise SystemExit(f"{item[0].name} ({size / MIB:.1f} MiB) alone is over --max-mib; lower --chunk-mib")
        target = next((b for b in bins if sum(p.stat().st_size for p, _ in b) + size <= capacity), None)
        if target is None:
            bins.append(target := [])
        target.append(item)
    return bins


def write_folders(bins: list[list[tuple[Path, str]]], out: Path, smollm2: tuple[int, str] | None) -> None:
    """``out/carryN/<subfolder>/<file>`` per bin, each with install.sh (and the GGUF's manifest where it has
    chunks)."""
    installer = Path(__file__).parent / "prepare_offline_wheels.install.sh"
    for i, items in enumerate(bins, 1):
        folder = out / f"carry{i}"
        for path, sub in items:
            (folder / sub).mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), folder / sub / path.name)
        if smollm2 and (folder / "smollm2").is_dir():
            count, digest = smollm2
            (folder / "smollm2" / "manifest").write_text(f"{digest} {count}\n")
        shutil.copy(installer, folder / "install.sh")
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        names = ", ".join(sorted(f"{sub}/{p.name}" for p, sub in items))
        print(f"{folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}: {size / MIB:.1f} MiB: {names}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", help="git ref to build sglite from (default: the working tree)")
    p.add_argument("--ab-ref", help="also build sglite at this ref: the old side of `sglite bench ab`")
    p.add_argument("--extras", default="", help="sglite extras whose dependencies to add, e.g. test,bench")
    p.add_argument("--xinference", action="store_true", help="also xinference and what only it needs")
    p.add_argument("--smollm2", action="store_true", help="also the SmolLM2 GGUF (the smollm2 test fixture)")
    p.add_argument("--have", type=Path, help="the target's `pip list --format=freeze` (default: the GPU image)")
    p.add_argument("--python-version", default="3.12", help="the target's Python (default 3.12)")
    p.add_argument("--out", type=Path, default=ROOT / ".whl", help="output folder, ignored by git (default .whl)")
    p.add_argument("--max-mib", type=float, help="size of one carried folder (default: 64 MiB less the working "
                                                 "tree, less 1 MiB)")
    p.add_argument("--chunk-mib", type=float, help="size of a GGUF chunk (default --max-mib less 1)")
    return p.parse_args(argv)


def have_names(path: Path | None, xinference: bool) -> set[str]:
    """Distributions not to bundle: the target's, and xinference unless asked for."""
    text = path.read_text() if path else GPU_IMAGE
    names = {canonicalize_name(t.split("==")[0].split(" @ ")[0]) for t in text.split() if t and t[0].isalnum()}
    return names if xinference else names | {"xinference"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    capacity = int((args.max_mib or (CARRY_LIMIT - tree_bytes()) / MIB - 1) * MIB)
    out = args.out.resolve()
    for old in out.glob("carry*"):
        shutil.rmtree(old)
    staging = out / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    sglite = build_sglite(args.ref, staging / "wheels")
    extras = {e.strip() for e in args.extras.split(",") if e.strip()}
    print(f"dependencies the target lacks (extras: {', '.join(sorted(extras)) or 'none'}):")
    deps = dependencies(sglite, extras, have_names(args.have, args.xinference), args.python_version,
                        staging / "deps")
    items = [(sglite, "wheels")] + [(w, "wheels") for w in deps]
    if args.ab_ref:
        items.append((build_sglite(args.ab_ref, staging / "ab-old"), "ab-old"))
    manifest = None
    if args.smollm2:
        chunks, digest = smollm2_chunks(staging / "smollm2", int((args.chunk_mib or capacity / MIB - 1) * MIB))
        items += [(c, "smollm2") for c in chunks]
        manifest = (len(chunks), digest)
    bins = pack(items, capacity)
    write_folders(bins, out, manifest)
    shutil.rmtree(staging)
    print(f"{len(bins)} folder(s) of at most {capacity / MIB:.1f} MiB; on the offline machine, carry each in turn and "
          f"run its install.sh (then PYTHONPATH={{SGLITE_SITE:-/tmp/site}})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
