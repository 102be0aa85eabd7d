#!/usr/bin/env bash
# Case 2 (paper Fig. 7a): throughput of each baseline at its largest trainable size, against
# stronghold at that same size.
#
#   examples/case2.sh [-p "METHOD:LAYERS ..."] [-m "METHODS"] [-i ITERS] [-h HIDDEN] [-b BATCH]
#                     [-w WINDOW] [--dry-run] [--no-extract] [-- EXTRA...]
#
#   -p POINTS     baselines and their largest layer counts, e.g. "megatron-lm:16 l2l:40 zero-offload:24";
#                 default: every baseline of $RESULTS_DIR/case1.csv (run examples/case1.sh first)
#   -m "METHODS"  keep only these baselines of the points (default: all of them)
#   -i ITERS      training iterations per run (default 20; the first is left out of the means)
#   -h HIDDEN     hidden size (default 2048)
#   -b BATCH      micro-batch size (default 4)
#   -w WINDOW     stronghold's window size (default 4)
#   --dry-run     print the training commands, run nothing
#   --no-extract  do not write case2.csv / case2.png
#   -- EXTRA      passed to pretrain_gpt.py last (e.g. -- --num-attention-heads 8 --seq-length 512)
#
# Logs go to $RESULTS_DIR/case2/, the table to $RESULTS_DIR/case2.csv, the figure to case2.png.
# Environment: PYTHON (interpreter, default python3), RESULTS_DIR (default results/).
# Exit status: 0 done, 1 a run failed (the others still ran and were extracted), 2 bad arguments.
set -euo pipefail
CASE=2
CASE_OPTS="p m i h b w"
CASE_USAGE="$(sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//')"
# shellcheck source=examples/artifact_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/artifact_common.sh"
METHODS="${ALL_METHODS/ stronghold/}"  # the baselines; stronghold is run at each one's size
parse_case_args "$@"

if [[ -z "$POINTS" ]]; then
    POINTS="$(case1_baselines | tr '\n' ' ')"
    [[ -n "${POINTS// /}" ]] ||
        die "no sizes: pass -p \"METHOD:LAYERS ...\", or run examples/case1.sh first ($RESULTS_ROOT/case1.csv)"
    note "largest sizes from $RESULTS_ROOT/case1.csv: $POINTS"
fi

for point in $POINTS; do
    [[ "$point" == *:* ]] || die "bad point '$point' (expected METHOD:LAYERS)"
    require_methods "${point%%:*}"
    require_positive_int "layers of ${point%%:*}" "${point##*:}"
done

ran=0
for point in $POINTS; do
    method="${point%%:*}" layers="${point##*:}"
    [[ "$method" == stronghold ]] && continue
    [[ " $METHODS " == *" $method "* ]] || continue
    run_point "$method" "$((10#$layers))" "$WINDOW"
    run_point stronghold "$((10#$layers))" "$WINDOW"
    ran=1
done
(( ran )) || die "none of the points ($POINTS) is a baseline selected by -m ($METHODS)"
finish
