#!/usr/bin/env bash
# Installs what this folder carries; written by scripts/prepare_offline_wheels.py (its docstring says how a
# session without network uses the folders). Safe to run again; the folders may come in any order.
#   wheels/  -> $SGLITE_SITE (default /tmp/site); sglite's own wheel also into $SGLITE_AB/new
#   ab-old/  -> $SGLITE_AB/old (default /tmp/ab): the old side of `sglite bench ab --old ... --new ...`
#   smollm2/ -> chunks of the SmolLM2 GGUF; once every chunk has come, joined into the fixture's cache
#               ($SGLITE_CACHE/smollm2-135m-instruct/gguf, default ~/.cache/sglite) and its SHA-256 checked
set -euo pipefail
shopt -s nullglob
here=$(cd "$(dirname "$0")" && pwd)
site=${SGLITE_SITE:-/tmp/site}
ab=${SGLITE_AB:-/tmp/ab}
cache=${SGLITE_CACHE:-$HOME/.cache/sglite}/smollm2-135m-instruct
pipi() {
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$@"
}

wheels=("$here"/wheels/*.whl)
if (( ${#wheels[@]} )); then
  pipi "$site" "${wheels[@]}"
  # Folders on PYTHONPATH do not run .pth files, and sglite's registers its engine with Xinference: this one does.
  echo "import site; site.addsitedir('$site')" > "$site/sitecustomize.py"
  echo "installed ${#wheels[@]} wheel(s) into $site (export PYTHONPATH=$site; commands in $site/bin)"
fi
mine=("$here"/wheels/xinf_sglang-*.whl)
old=("$here"/ab-old/xinf_sglang-*.whl)
if (( ${#old[@]} )); then pipi "$ab/old" "${old[@]}" && echo "installed the A/B old side into $ab/old"; fi
if (( ${#mine[@]} )); then pipi "$ab/new" "${mine[@]}" && echo "installed the A/B new side into $ab/new"; fi

chunks=("$here"/smollm2/gguf.*)
if (( ${#chunks[@]} )); then
  read -r sum count < "$here/smollm2/manifest"
  mkdir -p "$cache/parts" "$cache/gguf"
  cp "${chunks[@]}" "$cache/parts/"
  parts=("$cache"/parts/gguf.*)
  if (( ${#parts[@]} < count )); then
    echo "SmolLM2: ${#parts[@]} of $count chunks here; run the install.sh of the folders holding the others"
  else
    target=$cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    cat "${parts[@]}" > "$target.tmp"  # the glob sorts gguf.00, gguf.01, ...
    [[ $(sha256sum "$target.tmp" | cut -d' ' -f1) == "$sum" ]] || { echo "SmolLM2: SHA-256 mismatch"; exit 1; }
    mv "$target.tmp" "$target" && rm -rf "$cache/parts"
    echo "SmolLM2: $target (SHA-256 checked)"
  fi
fi
