#!/usr/bin/env bash
# The test command: set up (idempotent), then every test, the real SmolLM2 ones included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -q tests "$@"
