#!/usr/bin/env bash
# After the prompt-before grids (before_grids.sh): the mechanism grid (prompt after the text, three seeds) and
# the long runs (120 rounds, prompt before, one seed each), in the order. Resumable like before_grids.sh;
# run it from a worktree pinned to a commit that has both grid files:
#   git worktree add --detach ../wt-later HEAD && cd ../wt-later && bash experiments/later_grids.sh
# Each run goes in fresh processes of at most RESTART_EVERY rounds (default 4), every one resuming from the
# checkpoint the one before left: a precaution against the slowdown of long-lived processes seen on the
# project's CPU machine (experiments/README.md); each restart costs one compilation.
set -euo pipefail
export OPENBLAS_NUM_THREADS=1
PY=${PY:-python}
EVERY=(--restart-every "${RESTART_EVERY:-4}")
for method in manual fedbpt fedbpt_random_rank fedbpt_sigma_clamp fedbpt_norm_clip; do
  "$PY" experiments/grid.py run experiments/grids/sst2_mechanism_after.toml --only "method=${method}" "${EVERY[@]}"
done
"$PY" experiments/grid.py run experiments/grids/sst2_long_before.toml "${EVERY[@]}"
