#!/usr/bin/env bash
# Case 5 (paper Fig. 9): stronghold's throughput against its window size, at megatron-lm's
# largest trainable size.
#
#   examples/case5.sh [-p "WINDOWS ..."] [-l LAYERS] [-i ITERS] [-h HIDDEN] [-b BATCH]
#                     [--dry-run] [--no-extract] [-- EXTRA...]
#
#   -p "WINDOWS"  window sizes (default: 1 2 4 8 16; those larger than the layer count are skipped)
#   -l LAYERS     layer count (default: megatron-lm's largest, from $RESULTS_DIR/case1.csv)
#   -i ITERS      training iterations per run (default 20; the first is left out of the means)
#   -h HIDDEN     hidden size (default 2048)
#   -b BATCH      micro-batch size (default 4)
#   --dry-run     print the training commands, run nothing
#   --no-extract  do not write case5.csv / case5.png
#   -- EXTRA      passed to pretrain_gpt.py last (e.g. -- --num-attention-heads 8 --seq-length 512)
#
# Logs go to $RESULTS_DIR/case5/, the table to $RESULTS_DIR/case5.csv, the figure to case5.png.
# Environment: PYTHON (interpreter, default python3), RESULTS_DIR (default results/).
# Exit status: 0 done, 1 a run failed (the others still ran and were extracted), 2 bad arguments.
set -euo pipefail
CASE=5
CASE_OPTS="p l i h b"
CASE_USAGE="$(sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//')"
# shellcheck source=examples/artifact_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/artifact_common.sh"
METHODS="stronghold"
POINTS="1 2 4 8 16"
parse_case_args "$@"
for window in $POINTS; do require_positive_int "window in -p" "$window"; done
megatron_layers

for window in $POINTS; do
    window=$((10#$window))
    if (( window > LAYERS )); then
        note "skipping window $window: larger than the $LAYERS layers"
        continue
    fi
    run_point stronghold "$LAYERS" "$window"
done
finish
