# Shared code of the artifact-evaluation scripts examples/case1.sh ... case5.sh.
# Sourced, not run: each case script sets CASE, CASE_OPTS (the options it takes), CASE_USAGE
# and its defaults, then calls parse_case_args "$@".
#
# Layout of the results (RESULTS_DIR, default results/ in the repository):
#   $RESULTS_DIR/caseN/      the logs of case N (one per training run), nothing else
#   $RESULTS_DIR/caseN.csv   written by tools/extract_results.py caseN
#   $RESULTS_DIR/caseN.png   written by tools/draw_results.py caseN

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
PROG="examples/case${CASE}.sh"
# Every method of examples/run.sh, in the tables' order (megatron.stronghold.arguments.METHODS).
ALL_METHODS="$(cd "$REPO_ROOT" && "$PY" -c 'from megatron.stronghold.arguments import METHODS; print(*METHODS)' 2>/dev/null)" ||
    { echo "$PROG: error: cannot import megatron.stronghold with '$PY' (set PYTHON)" >&2; exit 1; }

# The paper's model (GPT, hidden 2048, 16 heads, sequence 1024, micro-batch 4). Heads and sequence
# length come from examples/run.sh; change them with -- --num-attention-heads N --seq-length S.
HIDDEN=2048
HEADS=16
SEQ=1024
BATCH=4
WINDOW=4
ITERS=20
METHODS=""
POINTS=""
LAYERS=""
DRY_RUN=0
EXTRACT=1
EXTRA=()

die() { # die MESSAGE [STATUS]
    echo "$PROG: error: $1" >&2
    [[ "${2:-2}" == 2 ]] && echo "Try '$PROG --help' for more information." >&2
    exit "${2:-2}"
}

note() { echo "$PROG: $*" >&2; }

require_positive_int() { # NAME VALUE
    [[ "$2" =~ ^[0-9]{1,9}$ ]] && (( 10#$2 > 0 )) || die "$1 must be a positive integer, got '$2'"
}

require_methods() { # require_methods LIST: every word of LIST is a method of examples/run.sh
    local m
    [[ -n "${1// /}" ]] || die "-m needs at least one method"
    for m in $1; do
        [[ " $ALL_METHODS " == *" $m "* ]] || die "unknown method '$m'; valid: ${ALL_METHODS// /, }"
    done
}

parse_case_args() {
    local opt
    while (( $# > 0 )); do
        opt="$1"
        case "$opt" in
            --help | -\?) echo "$CASE_USAGE"; exit 0 ;;
            --dry-run) DRY_RUN=1; shift; continue ;;
            --no-extract) EXTRACT=0; shift; continue ;;
            --) shift; EXTRA=("$@"); break ;;
            -[a-z])
                [[ " $CASE_OPTS " == *" ${opt#-} "* ]] || die "option $opt is not used by case $CASE"
                (( $# >= 2 )) || die "option $opt requires a value"
                case "$opt" in
                    -m) METHODS="$2" ;;
                    -p) POINTS="$2" ;;
                    -i) require_positive_int "-i (iterations)" "$2"; ITERS=$((10#$2)) ;;
                    -h) require_positive_int "-h (hidden size)" "$2"; HIDDEN=$((10#$2)) ;;
                    -b) require_positive_int "-b (batch size)" "$2"; BATCH=$((10#$2)) ;;
                    -w) require_positive_int "-w (window size)" "$2"; WINDOW=$((10#$2)) ;;
                    -l) require_positive_int "-l (layers)" "$2"; LAYERS=$((10#$2)) ;;
                esac
                shift 2 ;;
            *) die "unknown option '$opt' (arguments for the training go after '--')" ;;
        esac
    done
    require_methods "$METHODS"

    RESULTS_ROOT="${RESULTS_DIR:-$REPO_ROOT/results}"
    [[ "$RESULTS_ROOT" == /* ]] || RESULTS_ROOT="$PWD/$RESULTS_ROOT"
    CASE_DIR="$RESULTS_ROOT/case$CASE"
    cd "$REPO_ROOT"
}

# case1_layers METHOD: print the largest layer count of METHOD in $RESULTS_ROOT/case1.csv (nothing
# if the file or the row is missing). The CSV is read with Python's csv module, not split by hand.
case1_layers() {
    local csv="$RESULTS_ROOT/case1.csv"
    [[ -f "$csv" ]] || return 0
    "$PY" - "$csv" "$1" <<'EOF'
import csv, sys
with open(sys.argv[1], newline="") as f:
    rows = [r for r in csv.DictReader(f) if r.get("method") == sys.argv[2] and r.get("layers")]
if rows:
    print(int(float(rows[-1]["layers"])))
EOF
}

# case1_baselines: print "method:layers" for every method of case1.csv except stronghold.
case1_baselines() {
    local csv="$RESULTS_ROOT/case1.csv"
    [[ -f "$csv" ]] || return 0
    "$PY" - "$csv" <<'EOF'
import csv, sys
with open(sys.argv[1], newline="") as f:
    for r in csv.DictReader(f):
        if r.get("method") and r["method"] != "stronghold" and r.get("layers"):
            print(f"{r['method']}:{int(float(r['layers']))}")
EOF
}

# megatron_layers: LAYERS from -l, else megatron-lm's largest size from case1.csv, else die.
megatron_layers() {
    [[ -n "$LAYERS" ]] && return 0
    LAYERS="$(case1_layers megatron-lm)"
    [[ -n "$LAYERS" ]] ||
        die "no layer count: pass -l LAYERS, or run examples/case1.sh first (megatron-lm's row of $RESULTS_ROOT/case1.csv)"
    note "megatron-lm's largest size from $RESULTS_ROOT/case1.csv: $LAYERS layers"
}

FAILED=()

# run_point METHOD LAYERS WINDOW: one training run through examples/run.sh, its log in $CASE_DIR.
# A failed run (out of memory, refused size) is recorded and the case goes on with the next point.
run_point() {
    local method="$1" layers="$2" window="$3" status=0
    local args=(-m "$method" -l "$layers" -h "$HIDDEN" -b "$BATCH" -w "$window")
    (( DRY_RUN )) && args+=(--dry-run)
    note "case $CASE: $method, $layers layers, hidden $HIDDEN, batch $BATCH, window $window, $ITERS iterations"
    RESULTS_DIR="$CASE_DIR" PYTHON="$PY" bash "$REPO_ROOT/examples/run.sh" "${args[@]}" \
        -- --train-iters "$ITERS" ${EXTRA[@]+"${EXTRA[@]}"} || status=$?
    if (( status != 0 )); then
        FAILED+=("$method l=$layers w=$window (status $status)")
    fi
}

# finish: extract the CSV and draw the figure from whatever logs exist, then report failures.
finish() {
    local status=0
    if (( DRY_RUN )); then
        note "dry run: nothing extracted"
    elif (( EXTRACT )); then
        "$PY" tools/extract_results.py "case$CASE" --results "$RESULTS_ROOT" || status=$?
        if (( status == 0 )); then
            "$PY" tools/draw_results.py "case$CASE" --results "$RESULTS_ROOT" || status=$?
        fi
    fi
    if (( ${#FAILED[@]} > 0 )); then
        note "failed runs:"
        printf '  %s\n' "${FAILED[@]}" >&2
        exit 1
    fi
    exit "$status"
}
