#!/usr/bin/env bash
# Centralized BBT on SST-2 (16-shot train + 16-shot dev, test = the 872 GLUE dev sentences) with
# SmolLM2-135M-Instruct, for the prompt-after (prefix cache) and prompt-before (paper) layouts.
# The CPU budget is small (2 cores): fewer generations than BBT's 400, stated in the results.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${FEDBPT_JAX_DATA:-../shared/data}
GENS_AFTER=${GENS_AFTER:-60}
GENS_BEFORE=${GENS_BEFORE:-15}
common=(bbt --task sst2 --data "$DATA" --shots 16 --test-size 0 --n-prompt 10 --population 10 --seed 0 --no-progress)
fedbpt-jax "${common[@]}" --layout after --generations "$GENS_AFTER" --eval-every 20 \
  --results-dir experiments/results/bbt_sst2_after
fedbpt-jax "${common[@]}" --layout before --generations "$GENS_BEFORE" --eval-every 15 \
  --results-dir experiments/results/bbt_sst2_before
