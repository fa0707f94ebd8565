#!/usr/bin/env bash
# The main job on the embedded default: build the SmolLM2 fixture, convert it with CLAQ, inspect the
# file, and show perplexity before (fp32) and after (run from the .claq file alone).
# BITS and OUTLIER_BITS choose the CLAQ setting (default: 4 bits, no outlier reservation).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
BITS=${BITS:-4}
OUTLIER_BITS=${OUTLIER_BITS:-0}
bin=.venv/bin
mkdir -p out bench
fixture=$($bin/claq-fixture)
out="out/smollm2-claq-${BITS}+${OUTLIER_BITS}.claq"
echo "== fp32 reference: $fixture"
$bin/claq-eval "$fixture" --json bench/baseline.json
echo "== convert ($BITS bits, outlier budget $OUTLIER_BITS bpw)"
$bin/claq-convert "$fixture" "$out" --bits "$BITS" --outlier-bits "$OUTLIER_BITS" --json out/convert.json
echo "== inspect"
$bin/claq-inspect "$out" --verify "$fixture"
echo "== perplexity from the .claq file"
$bin/claq-eval "$out" --json out/eval.json
echo "== chat from the .claq file"
$bin/claq-generate "$out" "What is the capital of France?" --max-new-tokens 24
