#!/usr/bin/env bash
# Candidate defaults for the main command, each on seeds 0, 1, 2: the bare `fedbpt-jax simulate` (5 rounds,
# Rotten Tomatoes, 16 shots per class, Dirichlet(1), 300 test snippets) with one setting changed. The target:
# the dev-selected prompt beats the manual prompt in the mean over the three seeds. Resumable: a variant/seed
# whose metrics.json exists is skipped. Results: experiments/results/main_search/<variant>_seed<S>/.
#   VARIANTS="bbt iid" bash experiments/main_command_search.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FEDBPT=${FEDBPT:-fedbpt-jax}
declare -A FLAGS=(
  [defaults]=""
  [bbt]="--style bbt"                              # BBT's own template: " It was" + " terrible"/" great"
  [iid]="--alpha 0"                                # no label skew
  [normclip]="--norm-clip"                         # the reference's ||z|| clip (15, +1 a round up to 20)
  [clamp]="--sigma-schedule clamp"                 # the server sigma clamp stabiliser
  [shots32]="--shots 32"                           # twice the examples (and a 64-example dev split)
  [sigma0.5]="--sigma0 0.5"                        # half the paper's starting step size
)
for variant in ${VARIANTS:-bbt iid}; do
  [[ -v "FLAGS[$variant]" ]] || { echo "unknown variant '$variant'; accepted: ${!FLAGS[*]}" >&2; exit 2; }
  for seed in ${SEEDS:-0 1 2}; do
    out="experiments/results/main_search/${variant}_seed${seed}"
    if [[ -f "$out/metrics.json" ]]; then echo "skip $out (finished)"; continue; fi
    echo "run $out: --seed $seed ${FLAGS[$variant]}"
    # shellcheck disable=SC2086
    $FEDBPT simulate --no-progress --no-plot --seed "$seed" --results-dir "$out" ${FLAGS[$variant]}
  done
done
