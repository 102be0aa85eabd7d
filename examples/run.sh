#!/usr/bin/env bash
# Launch one GPT pre-training run (or all implemented methods) with the
# paper's default sizes.
#
#   examples/run.sh -m METHOD -l LAYERS -h HIDDEN -b BATCH -w WINDOW [-n NPROC] [-- extra args...]
#
# See usage() below, or run `examples/run.sh --help`.
set -euo pipefail

PY="${PYTHON:-python3}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Methods the launcher accepts ('all' runs the others in turn), and those that need a CUDA GPU:
# megatron/stronghold/methods/registry.py.
{ read -r METHODS; read -r CUDA_METHODS; } < <(cd "$REPO_ROOT" && "$PY" -c 'from megatron.stronghold.methods.registry import SPECS
print(*[s.name for s in SPECS]); print(*[s.name for s in SPECS if s.needs_cuda])' 2>/dev/null)
[[ -n "$METHODS" ]] ||
    { echo "examples/run.sh: error: cannot import megatron.stronghold with '$PY' (set PYTHON to the interpreter of your environment)" >&2; exit 1; }
VALID_METHODS="$METHODS all"

# Paper defaults (GPU).
DEFAULT_LAYERS=16
DEFAULT_HIDDEN=2048
DEFAULT_HEADS=16
DEFAULT_SEQ=1024
DEFAULT_BATCH=4
DEFAULT_WINDOW=4
DEFAULT_NPROC=1
TRAIN_ITERS=20

# Small model used on a machine without a GPU (unless -l or -h is given).
SMALL_LAYERS=4
SMALL_HIDDEN=128
SMALL_HEADS=4
SMALL_SEQ=128

PROG="examples/run.sh"

usage() {
    cat <<EOF
Usage: $PROG [-m METHOD] [-l LAYERS] [-h HIDDEN] [-b BATCH] [-w WINDOW] [-n NPROC] [--dry-run] [-- EXTRA...]

Run GPT pre-training through pretrain_gpt.py with Megatron-LM style flags.

  -m METHOD   offload method: ${VALID_METHODS// /, } (default: megatron-lm)
              'all' runs every implemented method in turn with the same sizes.
  -l LAYERS   number of transformer layers   (default: $DEFAULT_LAYERS)
  -h HIDDEN   hidden size                    (default: $DEFAULT_HIDDEN; must be divisible by the heads)
  -b BATCH    micro batch size per process; global batch = BATCH x NPROC (default: $DEFAULT_BATCH)
  -w WINDOW   StrongHold window size         (default: $DEFAULT_WINDOW)
  -n NPROC    processes on this node; > 1 uses torchrun (default: $DEFAULT_NPROC)
  --dry-run   print the command(s) and the log path, do not run them
  --help, -?  show this help (note: -h is the hidden size)
  -- EXTRA    everything after '--' is passed to pretrain_gpt.py last, so it
              overrides the defaults (e.g. -- --num-attention-heads 8 --train-iters 100)

Defaults: $DEFAULT_HEADS heads, sequence length $DEFAULT_SEQ, $TRAIN_ITERS iterations, bf16 on GPU, mock data unless
-- --data-path PREFIX is given.
Without a GPU (fp32) and unless -l or -h is given, a small model is used:
$SMALL_LAYERS layers, hidden $SMALL_HIDDEN, $SMALL_HEADS heads, sequence length $SMALL_SEQ.

Environment: PYTHON (interpreter, default python3), RESULTS_DIR (log directory, default results/).
Logs: \$RESULTS_DIR/log_<method>_l-<layers>_hs-<hidden>_bs-<batch>_ws-<window>_<YYYYmmdd-HHMMSS>.txt
      (-2, -3, ... before .txt when another launcher started the same second with the same sizes)
EOF
}

# die MESSAGE [STATUS]: print an error on stderr and exit (default status 2).
die() {
    echo "$PROG: error: $1" >&2
    [[ "${2:-2}" == 2 ]] && echo "Try '$PROG --help' for more information." >&2
    exit "${2:-2}"
}

note() { echo "$PROG: $*" >&2; }

contains() { # contains WORD LIST
    local w
    for w in $2; do [[ "$w" == "$1" ]] && return 0; done
    return 1
}

# require_positive_int NAME VALUE: VALUE must be a positive decimal integer.
require_positive_int() {
    local name="$1" value="$2"
    if ! [[ "$value" =~ ^[0-9]{1,9}$ ]] || (( 10#$value == 0 )); then
        die "$name must be a positive integer, got '$value'"
    fi
}

# ---------------------------------------------------------------- arguments
METHOD="megatron-lm"
LAYERS="" HIDDEN="" BATCH="" WINDOW="" NPROC=""
DRY_RUN=0
STOPPED=0  # a signal was passed on to a run (forward)
EXTRA=()

# take_value OPTION [NEXT...]: set VALUE to the option's argument, or die.
take_value() {
    local opt="$1"
    shift
    if (( $# == 0 )) || [[ "$1" == "--" || "$1" =~ ^-[a-zA-Z?]$ || "$1" == --* ]]; then
        die "option $opt requires a value"
    fi
    VALUE="$1"
}

parse_args() {
    while (( $# > 0 )); do
        case "$1" in
            -m | -l | -h | -b | -w | -n)
                take_value "$@"
                case "$1" in
                    -m) METHOD="$VALUE" ;;
                    -l) LAYERS="$VALUE" ;;
                    -h) HIDDEN="$VALUE" ;;
                    -b) BATCH="$VALUE" ;;
                    -w) WINDOW="$VALUE" ;;
                    -n) NPROC="$VALUE" ;;
                esac
                shift 2 ;;
            --help | -\?) usage; exit 0 ;;
            --dry-run) DRY_RUN=1; shift ;;
            --) shift; EXTRA=("$@"); break ;;
            *) die "unknown option '$1' (extra arguments for pretrain_gpt.py go after '--')" ;;
        esac
    done
}

# extra_value FLAG: print the last value given to FLAG in the extra args
# ("--flag V" or "--flag=V"); print nothing if absent.
extra_value() {
    local flag="$1" found="" i
    for (( i = 0; i < ${#EXTRA[@]}; i++ )); do
        case "${EXTRA[i]}" in
            "$flag")
                (( i + 1 < ${#EXTRA[@]} )) || die "$flag after '--' requires a value"
                found="${EXTRA[i + 1]}" ;;
            "$flag="*) found="${EXTRA[i]#"$flag="}" ;;
        esac
    done
    printf '%s' "$found"
}

# has_extra FLAG: whether FLAG (a switch) is among the extra args.
has_extra() {
    local a
    for a in ${EXTRA[@]+"${EXTRA[@]}"}; do [[ "$a" == "$1" ]] && return 0; done
    return 1
}

# ---------------------------------------------------------------- validation
validate() {
    contains "$METHOD" "$VALID_METHODS" ||
        die "unknown method '$METHOD'; valid methods: ${VALID_METHODS// /, }"
    [[ -z "$LAYERS" ]] || require_positive_int "-l (layers)" "$LAYERS"
    [[ -z "$HIDDEN" ]] || require_positive_int "-h (hidden size)" "$HIDDEN"
    [[ -z "$BATCH" ]] || require_positive_int "-b (batch size)" "$BATCH"
    [[ -z "$WINDOW" ]] || require_positive_int "-w (window size)" "$WINDOW"
    [[ -z "$NPROC" ]] || require_positive_int "-n (processes)" "$NPROC"

    USER_HEADS="$(extra_value --num-attention-heads)"
    [[ -z "$USER_HEADS" ]] || require_positive_int "--num-attention-heads" "$USER_HEADS"
    USER_SEQ="$(extra_value --seq-length)"
    [[ -z "$USER_SEQ" ]] || require_positive_int "--seq-length" "$USER_SEQ"
    # pretrain_gpt.py flags after -- win over -l/-h/-b/-w: the sizes checked and the log's name are theirs
    local flag value
    for flag in LAYERS:--num-layers HIDDEN:--hidden-size BATCH:--micro-batch-size WINDOW:--window-size; do
        value="$(extra_value "${flag#*:}")"
        [[ -z "$value" ]] && continue
        require_positive_int "${flag#*:}" "$value"
        printf -v "${flag%%:*}" '%s' "$value"
    done
}

# Sizes are resolved once we know whether a GPU is present.
resolve_sizes() {
    local gpu
    gpu="$("$PY" -c 'import torch;print(torch.cuda.is_available())' 2>/dev/null)" ||
        die "cannot import torch with '$PY' (set PYTHON to the interpreter of your environment)" 1
    if [[ "$gpu" == True ]]; then
        HAS_GPU=1
    else
        HAS_GPU=0
        echo "$PROG: no GPU found (torch.cuda.is_available() is False): training in fp32 on the CPU"
    fi

    if (( HAS_GPU == 0 )) && [[ -z "$LAYERS" && -z "$HIDDEN" ]]; then
        echo "$PROG: using a small model ($SMALL_LAYERS layers, hidden $SMALL_HIDDEN, $SMALL_HEADS heads, seq $SMALL_SEQ); pass -l/-h for other sizes"
        LAYERS=$SMALL_LAYERS HIDDEN=$SMALL_HIDDEN HEADS=$SMALL_HEADS SEQ=$SMALL_SEQ
    else
        LAYERS=${LAYERS:-$DEFAULT_LAYERS} HIDDEN=${HIDDEN:-$DEFAULT_HIDDEN}
        HEADS=$DEFAULT_HEADS SEQ=$DEFAULT_SEQ
    fi
    HEADS=${USER_HEADS:-$HEADS}
    SEQ=${USER_SEQ:-$SEQ}
    BATCH=${BATCH:-$DEFAULT_BATCH} WINDOW=${WINDOW:-$DEFAULT_WINDOW} NPROC=${NPROC:-$DEFAULT_NPROC}
    # Strip leading zeros so the numbers are plain decimals from here on.
    LAYERS=$((10#$LAYERS)) HIDDEN=$((10#$HIDDEN)) HEADS=$((10#$HEADS)) SEQ=$((10#$SEQ))
    BATCH=$((10#$BATCH)) WINDOW=$((10#$WINDOW)) NPROC=$((10#$NPROC))

    # With --kv-channels the heads' width is the user's (Megatron-LM's rule): pretrain_gpt.py checks it.
    [[ -n "$(extra_value --kv-channels)" ]] || (( HIDDEN % HEADS == 0 )) ||
        die "hidden size $HIDDEN is not divisible by the number of attention heads $HEADS"
}

# ---------------------------------------------------------------- running
# build_command METHOD: set CMD to the full training command line.
build_command() {
    local method="$1"
    local args=(
        --num-layers "$LAYERS"
        --hidden-size "$HIDDEN"
        --num-attention-heads "$HEADS"
        --seq-length "$SEQ"
        --max-position-embeddings "$SEQ"
        --micro-batch-size "$BATCH"
        --global-batch-size "$(( BATCH * NPROC ))"
        --train-iters "$TRAIN_ITERS"
        --log-interval 5
        --lr 1e-4 --lr-decay-style cosine
        --weight-decay 0.01 --clip-grad 1.0
    )
    # Defaults that depend on the user's flags, so that one given after '--' never meets a launcher
    # default it contradicts: the minimum learning rate a tenth of the user's --lr, the warmup at most
    # the iterations before the last, --bf16 only when the user chose no precision.
    local lr iters
    lr="$(extra_value --lr)"
    iters="$(extra_value --train-iters)"
    [[ -n "$(extra_value --min-lr)" ]] || args+=(--min-lr "$("$PY" -c 'import sys; print(max(0.0, float(sys.argv[1]) / 10))' "${lr:-1e-4}" 2>/dev/null || echo 1e-5)")
    if [[ -z "$(extra_value --lr-warmup-iters)$(extra_value --lr-warmup-fraction)" ]]; then
        iters=${iters:-$TRAIN_ITERS}
        [[ "$iters" =~ ^[0-9]+$ ]] && (( iters < 3 )) && args+=(--lr-warmup-iters $(( iters > 0 ? iters - 1 : 0 ))) ||
            args+=(--lr-warmup-iters 2)
    fi
    # No --mock-data: pretrain_gpt.py uses mock data only without --data-path, so a user's
    # `-- --data-path PREFIX` trains on PREFIX (or stops if it does not exist).
    if (( HAS_GPU )) && ! has_extra --fp16 && ! has_extra --bf16; then args+=(--bf16); fi
    args+=(--offload-method "$method" --window-size "$WINDOW")
    if (( NPROC > 1 )); then
        # torchrun for the same interpreter, ending with its workers' status (megatron/stronghold/torchrun.py)
        CMD=("$PY" -m megatron.stronghold.torchrun --standalone --nproc-per-node "$NPROC" pretrain_gpt.py)
    else
        CMD=("$PY" pretrain_gpt.py)
    fi
    CMD+=("${args[@]}" ${EXTRA[@]+"${EXTRA[@]}"})
}

# say TEXT: print a line to the terminal, if there still is one: after the run started, a closed terminal
# (EIO) or a reader gone from a pipe (EPIPE; SIGPIPE is ignored) must not end the launcher.
say() { { echo "$*"; } 2>/dev/null || true; }

# forward SIGNAL: pass a signal on to the run: with torchrun, to its workers, which save and end well
# (torchrun answers a signal with a traceback, status 1, and kills its workers 30 s later, save or not).
forward() {
    STOPPED=1  # -m all: no further method starts
    if (( NPROC > 1 )); then pkill -"$1" -P "$pid" 2>/dev/null; else kill -"$1" "$pid" 2>/dev/null; fi
}

# watch_rss PID FILE: while PID runs, the resident host memory of it and its children (torchrun's
# workers) in GiB, every 2 s, into FILE: the last figure before the kernel's out-of-memory killer.
watch_rss() {
    trap '' INT HUP  # the launcher ends it with TERM
    while kill -0 "$1" 2>/dev/null; do
        ps -o rss= -p "$1" --ppid "$1" 2>/dev/null | awk '{ kib += $1 } END { printf "%.1f\n", kib / 1048576 }' \
            > "$2.new" && mv -f "$2.new" "$2"
        sleep 2
    done
}

# run_logged LOG: run CMD with its output to the terminal and LOG; its exit status in RUN_STATUS.
# The run gets a session of its own (setsid) and the launcher forwards SIGINT and SIGTERM to it, once
# each: Ctrl-C (SIGINT to the terminal's process group) or SIGTERM to the launcher or its group then
# reach the run exactly once, and it saves and exits as a direct run does (a second signal stops it
# at once). SIGHUP (the terminal closed, an ssh session dropped) is a SIGTERM: the run saves and exits.
# tee ignores all of these and keeps writing the log when the terminal or a downstream pipe goes away
# (GNU tee's --output-error=warn-nopipe), so the log is complete to the last line.
run_logged() {
    local log="$1" fifo pid tee_pid watch_pid again tee_opts=()
    tee --output-error=warn-nopipe /dev/null < /dev/null 2>/dev/null && tee_opts=(--output-error=warn-nopipe)
    trap '' PIPE  # the launcher's own lines go through say()
    fifo="$(mktemp -u "${TMPDIR:-/tmp}/stronghold-run.XXXXXX")"
    mkfifo "$fifo"
    ( trap '' INT TERM HUP PIPE; exec tee ${tee_opts[@]+"${tee_opts[@]}"} "$log" < "$fifo" ) &
    tee_pid=$!
    if command -v setsid >/dev/null; then
        setsid "${CMD[@]}" > "$fifo" 2>&1 &
    else
        "${CMD[@]}" > "$fifo" 2>&1 &
    fi
    pid=$!
    RSS_FILE="$fifo.rss"
    watch_rss "$pid" "$RSS_FILE" &
    watch_pid=$!
    trap 'forward INT' INT
    trap 'forward TERM' TERM HUP
    set +e
    while :; do
        wait "$pid"
        RUN_STATUS=$?
        kill -0 "$pid" 2>/dev/null || break  # still running: the wait was cut short by a signal
    done
    if (( RUN_STATUS > 128 )); then  # a signal cut the last wait short: reap the run for its status
        wait "$pid" 2>/dev/null
        again=$?
        (( again == 127 )) || RUN_STATUS=$again
    fi
    trap - INT TERM HUP
    wait "$tee_pid"
    kill "$watch_pid" 2>/dev/null
    wait "$watch_pid" 2>/dev/null
    rm -f "$RSS_FILE.new"
    set -e
    rm -f "$fifo"
}

# claim_log BASE: create the log BASE.txt, or BASE-2.txt, BASE-3.txt, ... where another launcher took
# the name first (started in the same second with the same sizes); LOG is the name. With noclobber, bash
# creates the file with O_EXCL, so two launchers never claim one name.
claim_log() {
    local base="$1" n=1
    LOG="$base.txt"
    until ( set -o noclobber; : > "$LOG" ) 2>/dev/null; do
        [[ -e "$LOG" ]] || die "cannot create the log file $LOG" 1
        n=$(( n + 1 ))
        LOG="$base-$n.txt"
    done
}

# run_method METHOD: run one training job, tee its output to a log file.
# Returns the exit status of the training command.
run_method() {
    local method="$1" log status
    build_command "$method"
    log="$RESULTS_DIR/log_${method}_l-${LAYERS}_hs-${HIDDEN}_bs-${BATCH}_ws-${WINDOW}_$(date +%Y%m%d-%H%M%S)"
    say "$PROG: running: ${CMD[*]}"
    if (( DRY_RUN )); then
        echo "$PROG: log would be: $log.txt"
        return 0
    fi
    [[ -f pretrain_gpt.py ]] || die "pretrain_gpt.py not found in $REPO_ROOT" 1
    mkdir -p "$RESULTS_DIR"
    claim_log "$log"
    log="$LOG"
    run_logged "$log"
    status=$RUN_STATUS
    # into the log too: a run killed before its summary line still says how it ended
    local how=""
    if (( status > 128 )); then  # killed by a signal (the trainer itself exits 130 or 143 after Ctrl-C/SIGTERM)
        how=" (signal SIG$(kill -l $(( status - 128 )) 2>/dev/null || echo $(( status - 128 ))))"
        if (( status == 137 )); then
            local rss total
            rss="$(cat "$RSS_FILE" 2>/dev/null || echo "?")"
            total="$(awk '/^MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo 2>/dev/null || echo "?")"
            how=" (killed by SIGKILL: unless someone sent it, the kernel's out-of-memory killer stopped it for host memory; the last host RSS seen was $rss GiB of $total GiB; \`dmesg | grep -i oom\` tells)"
        fi
    fi
    rm -f "$RSS_FILE"
    echo "$PROG: method $method exited with status $status$how" >> "$log"
    say "$PROG: method $method exited with status $status$how"
    say "$PROG: log: $log"
    return "$status"
}

main() {
    parse_args "$@"
    validate

    # Resolve RESULTS_DIR against the caller's directory before moving to the repo root.
    RESULTS_DIR="${RESULTS_DIR:-$REPO_ROOT/results}"
    [[ "$RESULTS_DIR" == /* ]] || RESULTS_DIR="$PWD/$RESULTS_DIR"
    cd "$REPO_ROOT"

    resolve_sizes

    if [[ "$METHOD" != all ]]; then
        run_method "$METHOD"
        return
    fi

    local m failed="" status=0
    for m in $VALID_METHODS; do
        [[ "$m" == all ]] && continue
        if (( ! HAS_GPU )) && contains "$m" "$CUDA_METHODS"; then
            say "$PROG: $m needs a CUDA GPU: not run"
            continue
        fi
        run_method "$m" || { status=$?; failed+=" $m"; }
        (( ! STOPPED )) || { say "$PROG: stopped by a signal: the remaining methods were not run"; break; }
    done
    if [[ -n "$failed" ]]; then
        say "$PROG: failed methods:$failed" >&2
    fi
    return "$status"
}

main "$@"
