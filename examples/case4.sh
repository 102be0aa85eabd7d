#!/usr/bin/env bash
# Case 4 (paper Fig. 8b): stronghold's iteration time as the model grows deeper.
#
#   examples/case4.sh [-p "LAYERS ..."] [-i ITERS] [-h HIDDEN] [-b BATCH] [-w WINDOW]
#                     [--dry-run] [--no-extract] [-- EXTRA...]
#
#   -p "LAYERS"   layer counts (default: 16 32 48 64 80 96 112 128, or, when $RESULTS_DIR/case1.csv
#                 has stronghold's largest size, those up to it and that size itself)
#   -i ITERS      training iterations per run (default 20; the first is left out of the means)
#   -h HIDDEN     hidden size (default 2048)
#   -b BATCH      micro-batch size (default 4)
#   -w WINDOW     window size (default 4)
#   --dry-run     print the training commands, run nothing
#   --no-extract  do not write case4.csv / case4.png
#   -- EXTRA      passed to pretrain_gpt.py last (e.g. -- --num-attention-heads 8 --seq-length 512)
#
# Logs go to $RESULTS_DIR/case4/, the table to $RESULTS_DIR/case4.csv, the figure to case4.png.
# Environment: PYTHON (interpreter, default python3), RESULTS_DIR (default results/).
# Exit status: 0 done, 1 a run failed (the others still ran and were extracted), 2 bad arguments.
set -euo pipefail
CASE=4
CASE_OPTS="p i h b w"
CASE_USAGE="$(sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//')"
# shellcheck source=examples/artifact_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/artifact_common.sh"
METHODS="stronghold"
parse_case_args "$@"

if [[ -z "$POINTS" ]]; then
    POINTS="16 32 48 64 80 96 112 128"
    largest="$(case1_layers stronghold)"
    if [[ -n "$largest" ]]; then
        capped=""
        for l in $POINTS; do (( l < largest )) && capped+="$l "; done
        POINTS="$capped$largest"
        note "stronghold's largest size from $RESULTS_ROOT/case1.csv: $largest layers"
    fi
fi
for layers in $POINTS; do require_positive_int "layers in -p" "$layers"; done

for layers in $POINTS; do
    run_point stronghold "$((10#$layers))" "$WINDOW"
done
finish
