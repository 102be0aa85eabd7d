#!/usr/bin/env bash
# Case 3 (paper Fig. 8a): throughput of every method at megatron-lm's largest trainable size.
#
#   examples/case3.sh [-l LAYERS] [-m "METHODS"] [-i ITERS] [-h HIDDEN] [-b BATCH] [-w WINDOW]
#                     [--dry-run] [--no-extract] [-- EXTRA...]
#
#   -l LAYERS     layer count (default: megatron-lm's largest, from $RESULTS_DIR/case1.csv)
#   -m "METHODS"  methods to run (default: "megatron-lm l2l zero-offload zero-infinity stronghold")
#   -i ITERS      training iterations per run (default 20; the first is left out of the means)
#   -h HIDDEN     hidden size (default 2048)
#   -b BATCH      micro-batch size (default 4)
#   -w WINDOW     stronghold's window size (default 4)
#   --dry-run     print the training commands, run nothing
#   --no-extract  do not write case3.csv / case3.png
#   -- EXTRA      passed to pretrain_gpt.py last (e.g. -- --num-attention-heads 8 --seq-length 512)
#
# Logs go to $RESULTS_DIR/case3/, the table to $RESULTS_DIR/case3.csv, the figure to case3.png.
# Environment: PYTHON (interpreter, default python3), RESULTS_DIR (default results/).
# Exit status: 0 done, 1 a run failed (the others still ran and were extracted), 2 bad arguments.
set -euo pipefail
CASE=3
CASE_OPTS="l m i h b w"
CASE_USAGE="$(sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//')"
# shellcheck source=examples/artifact_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/artifact_common.sh"
METHODS="$ALL_METHODS"
parse_case_args "$@"
megatron_layers

for method in $METHODS; do
    run_point "$method" "$LAYERS" "$WINDOW"
done
finish
