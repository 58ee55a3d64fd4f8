#!/usr/bin/env bash
# Wheels of what logitcache needs beyond a GPU machine without network access whose Python has
# torch, transformers, tokenizers, numpy, pandas, fsspec, huggingface-hub, xxhash, click, pyyaml,
# tqdm, matplotlib, pyarrow and pytest but no datasets or zarr: for Python 3.12 on x86-64, at the
# versions of this checkout's .venv, saved into .whl/ (ignored by git; copy it to the GPU machine
# with the checkout). pyarrow's wheel is about 50 MB, so it is fetched only with --with-pyarrow,
# for a machine whose pyarrow is older than datasets needs.
# How to use them there: benchmarks/README.md, "On a GPU machine".
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || { echo "no .venv here: run scripts/install.sh first" >&2; exit 1; }
packages=(datasets dill multiprocess zarr numcodecs donfig google-crc32c)
[ "${1:-}" = "--with-pyarrow" ] && packages=(pyarrow)
pins=()
for name in "${packages[@]}"; do
  version=$("$python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "$name is not installed in .venv" >&2; exit 1; }
  pins+=("$name==$version")
done
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${pins[@]}"
echo "wheels in .whl/ ($(du -sh .whl | cut -f1)): ${pins[*]}"
