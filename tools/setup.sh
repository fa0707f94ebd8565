#!/usr/bin/env bash
# Creates .venv (once) and installs claq-convert into it, editable, with the test extra.
# constraints.txt pins the CPU build of torch; GPU users see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import claq_convert, torch, numba, transformers, gguf, safetensors, click" \
  || { echo "setup failed: see the pip output above" >&2; exit 1; }
