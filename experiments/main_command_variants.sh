#!/usr/bin/env bash
# The README's main command (FedBPT, SmolLM2-135M-Instruct, embedded Rotten Tomatoes snippets, 10 clients,
# 5 rounds, 300 test snippets) and a few one-flag variants: the partition (Dirichlet(1) vs IID), the
# starting step size sigma0 (1, the paper's, vs 0.5) and the seed (data draw, split, test subset and keys).
# About 6 minutes per run on 2 CPU cores. Results: experiments/results/main_<variant>/metrics.json.
set -euo pipefail
cd "$(dirname "$0")/.."
run() { name=$1; shift; fedbpt-jax simulate --no-progress --results-dir "experiments/results/main_$name" "$@"; }
for seed in ${SEEDS:-0 1}; do
  run "seed${seed}_sigma1" --seed "$seed"
  run "seed${seed}_sigma0.5" --seed "$seed" --sigma0 0.5
done
run seed0_sigma1_iid --seed 0 --alpha 0
