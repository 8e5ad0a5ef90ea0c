#!/usr/bin/env bash
# After the prompt-before grids (before_grids.sh): the mechanism grid (prompt after the text, three seeds) and
# the long runs (120 rounds, prompt before, one seed each), in the order. Resumable like before_grids.sh;
# run it from a worktree pinned to a commit that has both grid files:
#   git worktree add --detach ../wt-later HEAD && cd ../wt-later && bash experiments/later_grids.sh
# RESTART_EVERY=N runs each run in fresh processes of at most N rounds, every one resuming from the checkpoint
# the one before left (grid.py run --restart-every; one compilation more per restart). Off by default: the
# slowdown of long-lived processes once seen on the project's CPU machine tracked the host's own speed
# (experiments/README.md).
set -euo pipefail
export OPENBLAS_NUM_THREADS=1
PY=${PY:-python}
EVERY=()
if [ -n "${RESTART_EVERY:-}" ]; then EVERY=(--restart-every "$RESTART_EVERY"); fi
for method in manual fedbpt fedbpt_random_rank fedbpt_sigma_clamp fedbpt_norm_clip; do
  "$PY" experiments/grid.py run experiments/grids/sst2_mechanism_after.toml --only "method=${method}" "${EVERY[@]}"
done
"$PY" experiments/grid.py run experiments/grids/sst2_long_before.toml "${EVERY[@]}"
