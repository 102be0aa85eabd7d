#!/usr/bin/env bash
# Case 1 (paper Fig. 6a): the largest GPT each method can train on this machine.
#
#   examples/case1.sh [-m "METHODS"] [-h HIDDEN] [-b BATCH] [--dry-run] [--no-extract] [-- TOOL_ARGS...]
#
# For each method, tools/largest_model.py searches the largest layer count that trains at hidden 2048,
# 16 heads, sequence 1024, micro-batch 4 and writes its result (a CSV, format in
# tools/extract_results.py) and its probe logs into $RESULTS_DIR/case1/. Then
# tools/extract_results.py case1 merges them into $RESULTS_DIR/case1.csv and tools/draw_results.py
# draws $RESULTS_DIR/case1.png. Cases 2, 3 and 5 read their sizes from case1.csv.
#
#   -m "METHODS"  methods to search (default: "megatron-lm l2l zero-offload zero-infinity stronghold")
#   -h HIDDEN     hidden size (default 2048)
#   -b BATCH      micro-batch size (default 4)
#   --dry-run     print the tool commands, run nothing
#   --no-extract  do not write case1.csv / case1.png
#   -- ARGS       passed to tools/largest_model.py last (e.g. -- --heads 8 --seq 512)
#
# Environment: PYTHON (interpreter, default python3), RESULTS_DIR (default results/),
# LARGEST_MODEL_TOOL (default tools/largest_model.py).
# Exit status: 0 done, 1 a method failed, 2 bad arguments, 3 the search tool does not exist.
set -euo pipefail
CASE=1
CASE_OPTS="m h b"
CASE_USAGE="$(sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//')"
# shellcheck source=examples/artifact_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/artifact_common.sh"
METHODS="$ALL_METHODS"
parse_case_args "$@"

TOOL="${LARGEST_MODEL_TOOL:-tools/largest_model.py}"
if [[ ! -f "$TOOL" ]]; then
    die "$TOOL does not exist (LARGEST_MODEL_TOOL names the largest-model search; the default is tools/largest_model.py)" 3
fi

mkdir -p "$CASE_DIR"
for method in $METHODS; do
    # Start at the capacity the method's pre-flight check admits: two or three trials per method.
    cmd=("$PY" "$TOOL" --method "$method" --hidden "$HIDDEN" --heads "$HEADS" --seq "$SEQ"
         --batch "$BATCH" --start planner --out "$CASE_DIR/" ${EXTRA[@]+"${EXTRA[@]}"})
    note "running: ${cmd[*]}"
    (( DRY_RUN )) && continue
    status=0
    RESULTS_DIR="$CASE_DIR" PYTHON="$PY" "${cmd[@]}" || status=$?
    (( status == 0 )) || FAILED+=("$method (status $status)")
done
finish
