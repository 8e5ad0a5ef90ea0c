#!/usr/bin/env bash
# The benchmark set for an accelerator (GPU/TPU) machine, in priority order, under one time budget.
#
#   bash benchmarks/accelerator_suite.sh OUT_DIR [STEP ...]
#
# Steps (default: all, in this order):
#   round_smollm2_k10    whole FedBPT rounds, SmolLM2, K = 10, float32 and bfloat16, with the reference-style run
#   round_smollm2_k100   the same at K = 100 (reference-style time extrapolated from one client)
#   round_smollm2_k1000  the same at K = 1000 (clients in chunks of 100)
#   round_tiny           the tiny model at K = 10, 100, 1000, 10000 (chunks of 1000)
#   sweep_smollm2        S seeds as one compiled sweep vs S sequential runs, SmolLM2, S in {1, 4, 16}
#   forward_throughput   batched population scoring and the prefix cache, both models
#   sweep_tiny           the sweep with the tiny model
#
# Each step writes OUT_DIR/STEP.json and OUT_DIR/STEP.log; OUT_DIR/suite.log says what ran, its exit code and
# seconds. SUITE_DEADLINE (seconds, default 3000) bounds the whole suite: a step gets at most its own limit
# and what is left, so a slow step cannot take the time of those after it (a step cut short leaves its log).
# The round benchmark runs one invocation per K so that each K's JSON is written as soon as it is measured.
# The step limits come from one H100 (2026-11-26): round_smollm2_k10 took 175 s; K = 100 and 1000 did not finish
# both precisions in 180 and 170 s (each configuration compiles ~25 s and runs the reference-style client, the
# pure-inference pass and the checks); the sweep with SmolLM2 did not pass S = 1 in 120 s. The whole set needs
# ~40 minutes there.
#
# On a machine that cannot read the SmolLM2 checkpoint, export its architecture here
# (`python benchmarks/common.py export-architecture smollm2 DIR`) and set FEDBPT_BENCH_RANDOM_WEIGHTS=DIR
# there: the same shapes and tokenizer with random weights (throughput does not depend on the values).
# JAX preallocates most of a GPU's memory per process; the round benchmark runs each configuration in a
# subprocess beside its parent, so the suite turns preallocation off.
set -u
out=${1:?usage: accelerator_suite.sh OUT_DIR [STEP ...]}
shift
steps=${*:-round_smollm2_k10 round_smollm2_k100 round_smollm2_k1000 round_tiny sweep_smollm2 forward_throughput sweep_tiny}
py=${PYTHON:-python3}
deadline=$((SECONDS + ${SUITE_DEADLINE:-3000}))
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
mkdir -p "$out"
log="$out/suite.log"

step() {  # name, own limit (s), script and arguments
    local name=$1 limit=$2 left=$((deadline - SECONDS))
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        echo "$(date +%T) $name: not run (budget left ${left} s)" | tee -a "$log"
        return
    fi
    echo "$(date +%T) $name: start (limit ${limit} s)" | tee -a "$log"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$py" "$@" --json "$out/$name.json" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$(date +%T) $name: exit $rc$( ((rc == 124)) && echo ' (time limit)') after $((SECONDS - t0)) s" | tee -a "$log"
}

R=benchmarks/round_throughput.py
for s in $steps; do
    case $s in
    round_smollm2_k10) step "$s" 240 $R --models smollm2 --ks 10 --warmup-smollm2 --rounds-smollm2 3 \
        --ref-clients-smollm2 2 --es-ks 10 --plot "$out/$s.png" ;;
    round_smollm2_k100) step "$s" 300 $R --models smollm2 --ks 100 --warmup-smollm2 --rounds-smollm2 2 \
        --es-ks none --plot "$out/$s.png" ;;
    round_smollm2_k1000) step "$s" 420 $R --models smollm2 --ks 1000 --warmup-smollm2 --rounds-smollm2 1 \
        --es-ks none --plot "$out/$s.png" ;;
    round_tiny) step "$s" 360 $R --models tiny --ks 10,100,1000,10000 --chunk 1000 --ref-clients 10 \
        --ref-before-clients 0 --es-ks none --plot "$out/$s.png" ;;
    sweep_smollm2) step "$s" 420 benchmarks/sweep_throughput.py --model smollm2-135m-instruct ;;
    forward_throughput) step "$s" 300 benchmarks/forward_throughput.py ;;
    sweep_tiny) step "$s" 240 benchmarks/sweep_throughput.py ;;
    *) echo "unknown step $s" | tee -a "$log" ;;
    esac
done
