#!/usr/bin/env bash
# The main job on the embedded default: build the SmolLM2 fixture, convert it with CLAQ, inspect the
# file, and show perplexity before (fp32) and after (run from the .claq file alone).
# Without settings it converts with claq-convert's default (the measured per-column allocation at
# --bpw 4.6); BPW, or BITS (the paper's fixed rule) and OUTLIER_BITS, choose another setting.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bin=.venv/bin
mkdir -p out bench
fixture=$($bin/claq-fixture)
setting=() name=smollm2-claq
if [ -n "${BPW:-}" ]; then setting=(--bpw "$BPW") name="$name-bpw$BPW"; fi
if [ -n "${BITS:-}" ]; then setting+=(--bits "$BITS") name="$name-$BITS"; fi
if [ -n "${OUTLIER_BITS:-}" ]; then setting+=(--outlier-bits "$OUTLIER_BITS") name="$name+$OUTLIER_BITS"; fi
out="out/$name.claq"
echo "== fp32 reference: $fixture"
$bin/claq-eval "$fixture" --json bench/baseline.json
echo "== convert (${setting[*]:-the default setting})"
$bin/claq-convert "$fixture" "$out" ${setting[@]+"${setting[@]}"} --json out/convert.json
echo "== inspect"
$bin/claq-inspect "$out" --verify "$fixture"
echo "== perplexity from the .claq file"
$bin/claq-eval "$out" --json out/eval.json
echo "== chat from the .claq file"
$bin/claq-generate "$out" "What is the capital of France?" --max-new-tokens 24
