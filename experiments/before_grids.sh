#!/usr/bin/env bash
# The prompt-before grids (SST-2, then MR), one method at a time over the three seeds, in the order that
# completes the headline pairs first: manual and FedBPT, then the baselines. Resumable: finished runs are
# skipped, interrupted ones resume from their checkpoints. Run it from a worktree pinned to a commit:
#   git worktree add --detach ../wt-grid HEAD && cd ../wt-grid && bash experiments/before_grids.sh
set -euo pipefail
export OPENBLAS_NUM_THREADS=1
PY=${PY:-python}
for task in sst2 mr; do
  for method in manual fedbpt fedavg_bbt_perturb centralized_bbt fedavg_bbt fedprompt; do
    "$PY" experiments/grid.py run "experiments/grids/${task}_noniid_before.toml" --only "method=${method}"
  done
done
