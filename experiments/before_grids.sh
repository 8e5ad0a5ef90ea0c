#!/usr/bin/env bash
# The prompt-before grids (SST-2, then MR), one method at a time over the three seeds, in the order that
# completes the headline pairs first: manual and FedBPT, then the baselines. Resumable: finished runs are
# skipped, interrupted ones resume from their checkpoints. Run it from a worktree pinned to a commit:
#   git worktree add --detach ../wt-grid HEAD && cd ../wt-grid && bash experiments/before_grids.sh
# Carried across machines through the repository (experiments/README.md, "Across machines"): from main,
#   python experiments/grid.py sync ../wt-grid/experiments/results/grid_mr_noniid_before experiments/results/grid_mr_noniid_before
# lands finished runs and parks the one in flight (git add -f its ckpt/); on a fresh machine the same command
# with the folders swapped brings them back before the script runs.
set -euo pipefail
export OPENBLAS_NUM_THREADS=1
PY=${PY:-python}
for task in sst2 mr; do
  for method in manual fedbpt fedavg_bbt_perturb centralized_bbt fedavg_bbt fedprompt; do
    "$PY" experiments/grid.py run "experiments/grids/${task}_noniid_before.toml" --only "method=${method}"
  done
done
