#!/usr/bin/env bash
# The measurements of a GPU machine, by stage, each writing under OUT (default results/gpu).
#
#   bash tools/gpu_campaign.sh STAGE...      stages run in the order given
#
#   tests     GPU tests (tests/gpu) and the fused-AdamW extension tests on this card
#   bench32   tools/bench_stronghold.py at 32 layers, windows 1 2 4 8 and the planner's choice
#   bench64   the same at 64 layers; bench64-noclip (any bench stage): stronghold alone with --clip-grad 0.0
#   diag      32 layers all streamed, W=2 and W=4, with and without gradient clipping: the summary's
#             CPU timers and step counts
#   trace     tools/trace_stronghold.py: a profiler trace of steady-state iterations, 32 layers all streamed
#   largest   case 1: largest trainable model per method (LARGEST_METHODS; tools/largest_model.py,
#             seeded by the pre-flight capacity), start-up times, case1.csv and case1.png
#   case3     examples/case3.sh: the methods at megatron-lm's largest size
#   case4     examples/case4.sh at CASE_POINTS layers, every layer streamed (case 2 needs case 1's baselines)
#   case5     examples/case5.sh at CASE_LAYERS and CASE_POINTS windows, every layer streamed
#   threads   tools/thread_cpu.py: each thread's CPU use during megatron-lm's and stronghold's steady
#             iterations at CASE_LAYERS (default 88, megatron-lm's largest on an H100) with CASE_EXTRA
#   realbatch tools/bench_real_batch.py: global batch 64 beside megatron-lm and zero-offload (REALBATCH_CASES,
#             default "1 2 3 4 5"; case 4 runs the code before the layer-major step from BASELINE_TREE)
#   dp        2 GPUs: DP=1 and DP=2 at a size megatron-lm cannot hold (micro-batch per rank fixed);
#             the tests stage on such a machine also runs the 2-GPU data-parallel tests
#   llama     a Llama-style model (RMSNorm, SwiGLU, rope, grouped-query attention, no biases, untied,
#             Llama 3's vocabulary; hidden 4096, 32 heads, 8 query groups, ffn 14336, seq 4096) with
#             LLAMA_RUNS (model_runs below; default "stronghold:48 megatron-lm:16": more layers than the card
#             holds, so layers stream, beside megatron-lm); llama.csv: samples/s and TFLOP/s of each
#   cpuadam   tools/bench_cpu_adam.py: the CPU AdamW kernel's rate in each host-store layout, 15 threads
#   layouts   the paper's regime (BYTES_LAYERS=64 layers h2048 all streamed, W=2, global batch 4, no
#             clipping), then a real batch (global batch 64, micro-batch 8, full recompute), each in the
#             three host-store layouts: 16 B/param (--no-store-param-remainders), 14 (remainders), 10
#             (remainders and bf16 Adam moments); layouts.txt: plan, host store, iteration lines
#             (BYTES_BATCHES=1: the paper's batch only; BYTES_LAYOUTS: a subset of "16 14 10")
#   capacity  the largest model at hidden 2048 and the paper's batch in the 10 B/param layout: one trial at
#             the planner's capacity (tools/largest_model.py --start planner --max-layers planner)
#   qwen14b   Qwen2.5-14B's shape (h5120, 48 layers, 40 heads, 8 query groups, ffn 13824, qkv bias, untied,
#             vocabulary 152064, seq 4096), global batch 16, full recompute, bf16 moments: QWEN_RUNS, each
#             METHOD:LAYERS or METHOD:search, each with :norecompute where it should run without recompute
#             (model_runs below); default "stronghold:48 megatron-lm:search"
#   zerobytes the host and GPU bytes DeepSpeed really holds per parameter: ZERO_METHODS (zero-offload
#             zero-infinity) at ZERO_LAYERS (16 48) layers h2048, paper batch, 3 iterations each;
#             zerobytes.txt: their summary lines (peak host RSS, peak GPU memory) for the pre-flight counts
#   offload   megatron-core's optimizer CPU offload (-m megatron-offload): its GPU test against megatron-lm and
#             across checkpoints, then 96 layers h2048 (micro-batch 8, global batch 64, full recompute) beside
#             stronghold, then its largest model (tools/largest_model.py); offload.txt
#   sft-seen  fine-tuning losses on seen and unseen batches: padded and packed from imported weights, then
#             from weights fine-tuned 4 iterations on those batches again (--finetune) and on the next ones
#             (resumed); sft-seen.txt
#   sft       the attention kernels against fp32 (tools/attention_check.py) and the GPU tests of causal
#             fine-tuning losses, then the fine-tuning path (tools/sft_round_trip.py): a Llama-3-8B-shaped Hugging Face model at SFT_LAYERS
#             (16 of its 32: at 32 the HF model, the imported fp32 checkpoint and the trained one exceed the
#             machine's 64 GiB disk) made with transformers, imported, fine-tuned with --sft by stronghold at
#             global batch 32 x 2048 tokens, packed (saved) and padded, exported in bf16, and transformers' loss
#             on the held-out conversation before and after beside the run's validation loss; sft.txt
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-results/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
model_runs() {
    # model_runs NAME HIDDEN HEADS SEQ MICRO_BATCH "RUN..." FLAGS...: each RUN is METHOD:LAYERS or
    # METHOD:search (the most layers that train, from the pre-flight count down: tools/largest_model.py),
    # with :norecompute appended to drop --recompute-granularity full (megatron-lm's fastest configuration
    # where it fits); WINDOW and ITERS (the iterations a search trial must finish) from the environment;
    # logs under OUT/NAME[-norecompute], their key lines in OUT/NAME.txt
    local name=$1 hidden=$2 heads=$3 seq=$4 micro=$5 runs=$6 run method layers variant dir flags i
    shift 6
    for run in $runs; do
        IFS=: read -r method layers variant <<< "$run"
        flags=("$@") dir="$OUT/$name"
        if [[ "${variant:-}" == norecompute ]]; then
            flags=() dir="$OUT/$name-norecompute"
            for ((i = 1; i <= $#; i++)); do
                [[ "${!i}" == --recompute-granularity ]] && { i=$((i + 1)); continue; }  # and its value
                flags+=("${!i}")
            done
        fi
        if [[ "$layers" == search ]]; then
            "$PY" tools/largest_model.py --method "$method" --start planner --max-layers planner --hidden "$hidden" \
                --heads "$heads" --seq "$seq" --batch "$micro" --iters "${ITERS:-4}" --timeout 400 --out "$dir" -- "${flags[@]}" 2>&1 |
                sed "s/^/$run /" | tee -a "$OUT/$name.txt"
            continue
        fi
        RESULTS_DIR="$dir" bash examples/run.sh -m "$method" -l "$layers" -h "$hidden" -b "$micro" -w "${WINDOW:-4}" \
            -- "${flags[@]}" 2>&1 | grep -E "total parameters|^plan|host store|start-up|iteration +[0-9]+/|summary|exited|error" |
            sed "s/^/$run /" | tee -a "$OUT/$name.txt"
    done
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
free -g | tee -a "$OUT/card.txt"

stage() { echo; echo "===== $1 ($(date +%T))"; }

# the fine-tuning stages' training flags (sft, sft-seen), over DIR/chat.jsonl: sets the array sft
sft_flags() {
    sft=(--sft --data-path "$1/chat.jsonl" --split 1500,40,0 --seq-length "${SFT_SEQ:-2048}" --micro-batch-size 2
         --global-batch-size "${SFT_BATCH:-32}" --bf16 --recompute-granularity full --use-precision-aware-optimizer
         --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16 --lr 1e-4 --min-lr 1e-5 --lr-warmup-iters 1
         --log-interval 1 --eval-iters 1)
}

for s in "$@"; do
    stage "$s"
    case "$s" in
        tests)
            "$PY" -m pytest -q -x tests/gpu tests/test_fused_adamw.py 2>&1 | tail -20 | tee "$OUT/tests_gpu.txt" ;;
        realbatch)
            "$PY" tools/bench_real_batch.py --out "$OUT/realbatch" --cases ${REALBATCH_CASES:-1 2 3 4 5} \
                --iters "${BENCH_ITERS:-8}" --baseline-tree "${BASELINE_TREE:-.baseline}" 2>&1 | tee "$OUT/realbatch.txt" ;;
        bench*)  # bench32, bench64, bench64-noclip (stronghold only)
            layers="${s#bench}"; layers="${layers%-noclip}"; windows="${BENCH_WINDOWS:-1 2 4 8 auto}"; extra=()
            [[ "$s" == *-noclip ]] && windows="${windows//auto/}" && extra=(--skip-megatron -- --clip-grad 0.0)
            "$PY" tools/bench_stronghold.py --layers "$layers" --windows $windows \
                --iters "${BENCH_ITERS:-10}" ${BENCH_SKIP_MEGATRON:+--skip-megatron} --out "$OUT/$s" ${extra[@]+"${extra[@]}"} 2>&1 |
                grep -v "^{" | tee "$OUT/$s.txt" ;;
        diag)
            for w in 2 4; do
                for clip in 1.0 0.0; do
                    RESULTS_DIR="$OUT/diag" bash examples/run.sh -m stronghold -l 32 -w "$w" -- --train-iters 10 \
                        --log-interval 1 --resident-layers 0 --clip-grad "$clip" 2>&1 |
                        grep -E "iteration +(3|6|10)/|summary" | sed "s/^/W=$w clip=$clip /" | tee -a "$OUT/diag.txt"
                done
            done ;;
        trace)
            for w in 2 4; do
                "$PY" tools/trace_stronghold.py --out "$OUT/trace_w$w" -- --num-layers 32 --bf16 --resident-layers 0 \
                    --window-size "$w" 2>&1 | tail -14 | tee -a "$OUT/trace.txt"
            done ;;
        largest)  # case 1's searches (LARGEST_START: first size, default the pre-flight capacity;
                  # LARGEST_TIMEOUT: seconds per trial, LARGEST_BUDGET: seconds per search, both under the
                  # call's limit: either ends the search with a lower bound), then case1.csv / case1.png
            for m in ${LARGEST_METHODS:-megatron-lm l2l stronghold}; do
                "$PY" tools/largest_model.py --method "$m" --start "${LARGEST_START:-planner}" \
                    --timeout "${LARGEST_TIMEOUT:-480}" --budget "${LARGEST_BUDGET:-0}" --out "$OUT/case1" 2>&1 |
                    tee -a "$OUT/largest.txt"
            done
            grep -h -E "start-up|plan \|" "$OUT"/case1/log_* | tee -a "$OUT/largest.txt"
            "$PY" tools/extract_results.py case1 --results "$OUT" && "$PY" tools/draw_results.py case1 --results "$OUT" ;;
        case3)  # every method at megatron-lm's largest size (CASE_LAYERS; CASE_EXTRA: training flags)
            RESULTS_DIR="$OUT" bash examples/case3.sh -l "${CASE_LAYERS:-64}" -i "${CASE_ITERS:-6}" \
                -m "${CASE_METHODS:-megatron-lm l2l stronghold zero-offload}" -- --log-interval 1 ${CASE_EXTRA:-} ;;
        threads)
            for m in megatron-lm stronghold; do
                "$PY" tools/thread_cpu.py -- --num-layers "${CASE_LAYERS:-88}" --hidden-size 2048 \
                    --num-attention-heads 16 --seq-length 1024 --max-position-embeddings 1024 --micro-batch-size 4 \
                    --global-batch-size 4 --train-iters "${CASE_ITERS:-15}" --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine \
                    --lr-warmup-iters 2 --weight-decay 0.01 --clip-grad 1.0 --mock-data --bf16 --offload-method "$m" \
                    ${CASE_EXTRA:-} 2>&1 | grep -E "^threads|^  thread|plan \||summary" | sed "s/^/$m /" | tee -a "$OUT/threads.txt"
            done ;;
        case4)  # as in the paper's Fig. 8b, every layer streamed (--resident-layers 0): with the
                # planner's default a model that fits would stay on the GPU
            RESULTS_DIR="$OUT" bash examples/case4.sh -p "${CASE_POINTS:-16 32 64 96 128}" -i "${CASE_ITERS:-6}" \
                -w 2 -- --log-interval 1 --resident-layers 0 ${CASE_EXTRA:-} ;;
        case5)  # Fig. 9: windows at megatron-lm's largest size (CASE_LAYERS, default 88: an H100's), all streamed
            RESULTS_DIR="$OUT" bash examples/case5.sh -l "${CASE_LAYERS:-88}" -p "${CASE_POINTS:-1 2 4 8}" \
                -i "${CASE_ITERS:-6}" -- --log-interval 1 --resident-layers 0 ${CASE_EXTRA:-} ;;
        dp)  # a model megatron-lm cannot hold (DP_LAYERS; default 96 on 80 GB cards, 176 on 141 GB ones),
             # planner's placement, DP=1 then DP=2
            mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
            layers="${DP_LAYERS:-$(( mib > 100000 ? 176 : 96 ))}"
            for n in 1 2; do
                RESULTS_DIR="$OUT/dp" bash examples/run.sh -m stronghold -l "$layers" -n "$n" -- --train-iters 8 \
                    --log-interval 1 --recompute-granularity full 2>&1 | grep -E "iteration +8/|summary|plan|host store" |
                    sed "s/^/DP=$n /" | tee -a "$OUT/dp.txt"
            done ;;
        llama)  # about 5 minutes on an H200; LLAMA_* shrink it (a CPU check of the stage runs it tiny)
            llama=(--num-attention-heads "${LLAMA_HEADS:-32}" --group-query-attention
                   --num-query-groups "${LLAMA_GROUPS:-8}" --ffn-hidden-size "${LLAMA_FFN:-14336}"
                   --normalization RMSNorm --swiglu --position-embedding-type rope --rotary-base 500000
                   --disable-bias-linear --untie-embeddings-and-output-weights --hidden-dropout 0
                   --attention-dropout 0 --tokenizer-type NullTokenizer --vocab-size "${LLAMA_VOCAB:-128255}"
                   --seq-length "${LLAMA_SEQ:-4096}" --global-batch-size "${LLAMA_GLOBAL_BATCH:-8}"
                   --recompute-granularity full --train-iters "${LLAMA_ITERS:-6}" --log-interval 1)
            ITERS="${LLAMA_ITERS:-6}" model_runs llama "${LLAMA_HIDDEN:-4096}" "${LLAMA_HEADS:-32}" "${LLAMA_SEQ:-4096}" 1 \
                "${LLAMA_RUNS:-stronghold:48 megatron-lm:16}" "${llama[@]}"
            "$PY" tools/extract_results.py llama --results "$OUT" && tee -a "$OUT/llama.txt" < "$OUT/llama.csv" ;;
        cpuadam)
            "$PY" tools/bench_cpu_adam.py --threads "${ADAM_THREADS:-15}" 2>&1 | tee "$OUT/cpuadam.txt" ;;
        layouts)
            bf16_moments=(--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16)
            batches=("4 4 --clip-grad 0" "64 8 --recompute-granularity full")
            layouts=("16 --no-store-param-remainders" "14" "10 ${bf16_moments[*]}")
            for batch in "${batches[@]:0:${BYTES_BATCHES:-2}}"; do
                set -- $batch
                for layout in "${layouts[@]}"; do
                    name=${layout%% *}
                    [[ " ${BYTES_LAYOUTS:-16 14 10} " == *" $name "* ]] || continue
                    RESULTS_DIR="$OUT/layouts" bash examples/run.sh -m stronghold -l "${BYTES_LAYERS:-64}" -w 2 -b "$2" \
                        -- --global-batch-size "$1" --train-iters "${BYTES_ITERS:-6}" --log-interval 1 \
                        --resident-layers 0 "${@:3}" ${layout#$name} 2>&1 |
                        grep -E "^plan|host store|start-up|iteration +[0-9]+/|summary|exited" |
                        sed "s/^/gbs=$1 ${name}B/ " | tee -a "$OUT/layouts.txt"
                done
            done ;;
        capacity)
            flags=(--bf16 --recompute-granularity full --use-precision-aware-optimizer --exp-avg-dtype bf16
                   --exp-avg-sq-dtype bf16)
            "$PY" tools/largest_model.py --method stronghold --start planner --max-layers planner \
                --timeout "${LARGEST_TIMEOUT:-480}" --out "$OUT/capacity" -- "${flags[@]}" 2>&1 | tee -a "$OUT/capacity.txt"
            grep -h -E "total parameters|^plan|host store|start-up|summary" "$OUT"/capacity/log_* | tee -a "$OUT/capacity.txt" ;;
        qwen14b)
            qwen=(--num-attention-heads 40 --group-query-attention --num-query-groups 8 --ffn-hidden-size 13824
                  --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --position-embedding-type rope
                  --rotary-base 1000000 --disable-bias-linear --add-qkv-bias --untie-embeddings-and-output-weights
                  --hidden-dropout 0 --attention-dropout 0 --tokenizer-type NullTokenizer --vocab-size 152063
                  --seq-length 4096 --global-batch-size 16 --recompute-granularity full --bf16
                  --use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16
                  --train-iters "${QWEN_ITERS:-4}" --log-interval 1)
            WINDOW="${QWEN_WINDOW:-2}" ITERS="${QWEN_ITERS:-4}" model_runs qwen14b 5120 40 4096 1 \
                "${QWEN_RUNS:-stronghold:48 megatron-lm:search}" "${qwen[@]}" ;;
        zerobytes)
            for m in ${ZERO_METHODS:-zero-offload zero-infinity}; do
                for l in ${ZERO_LAYERS:-16 48}; do
                    RESULTS_DIR="$OUT/zerobytes" bash examples/run.sh -m "$m" -l "$l" -- --train-iters 3 \
                        --log-interval 1 2>&1 | grep -E "total parameters|summary|exited|error" |
                        sed "s/^/$m L=$l /" | tee -a "$OUT/zerobytes.txt"
                done
            done ;;
        offload)
            "$PY" -m pytest -q -x tests/gpu/test_gpu_training.py -k megatron_offload 2>&1 | tail -5 | tee -a "$OUT/offload.txt"
            for m in megatron-offload stronghold; do
                RESULTS_DIR="$OUT/offload" bash examples/run.sh -m "$m" -l 96 -b 8 -- --global-batch-size 64 \
                    --recompute-granularity full --train-iters "${OFFLOAD_ITERS:-5}" --log-interval 1 2>&1 |
                    grep -E "total parameters|^plan|megatron-core optimizer|start-up|iteration +[0-9]+/|summary|exited|rror" |
                    sed "s/^/$m L=96 /" | tee -a "$OUT/offload.txt"
            done
            "$PY" tools/largest_model.py --method megatron-offload --start planner --timeout "${LARGEST_TIMEOUT:-480}" \
                --budget "${LARGEST_BUDGET:-0}" --out "$OUT/offload" 2>&1 | tee -a "$OUT/offload.txt" ;;
        sft-seen)
            # the first iteration's loss of each layout on batches the model has not seen, from the imported
            # weights; then from weights fine-tuned for 4 iterations, on those 4 batches again (--finetune
            # restarts the data) and on the next ones (resumed): the gap is what the model memorised
            d=/tmp/sft_seen
            rm -rf "$d" && mkdir -p "$d"
            keep() { grep -E "$1" | sed "s/^/${2:-}/" | tee -a "$OUT/sft-seen.txt"; }
            "$PY" tools/sft_round_trip.py make --out "$d" --layers "${SFT_LAYERS:-4}" --hidden "${SFT_HIDDEN:-4096}" 2>&1 | keep "made|wrote|rror"
            "$PY" tools/convert_hf.py import --hf "$d/hf" --output "$d/ckpt" > "$d/import.log" 2>&1
            read -r -a imported < <(grep -E "^--load " "$d/import.log" | tail -1)
            sft_flags "$d"
            lines="iteration +[0-9]+/|validation|loaded|exited|rror"
            run() { label="$1"; shift; RESULTS_DIR="$OUT/sft-seen" bash examples/run.sh -m stronghold -- \
                "${sft[@]}" "$@" 2>&1 | keep "$lines" "$label "; }
            run "imported-padded" "${imported[@]}" --no-sft-packing --train-iters 2 --eval-interval 2
            run "imported-packed" "${imported[@]}" --train-iters 4 --eval-interval 4 --save "$d/trained"
            run "trained-seen" "${imported[@]}" --load "$d/trained" --train-iters 2 --eval-interval 2
            resumed=(); for a in "${imported[@]}"; do [[ "$a" == --finetune ]] || resumed+=("$a"); done
            run "trained-unseen" "${resumed[@]}" --load "$d/trained" --train-iters 6 --eval-interval 6 \
                --override-opt_param-scheduler
            rm -rf "$d" ;;
        sft)
            d=/tmp/sft_round_trip
            rm -rf "$d" && mkdir -p "$d"
            keep() { grep -E "$1" | sed "s/^/${2:-}/" | tee -a "$OUT/sft.txt"; }
            # first: the attention kernels against fp32 attention, and the GPU tests of causal losses
            "$PY" tools/attention_check.py 2>&1 | grep -v -i warn | keep "."
            "$PY" -m pytest -q tests/gpu/test_gpu_training.py -k "causality or attention_kernels" 2>&1 | tail -5 | keep "passed|failed|rror|assert"
            "$PY" tools/sft_round_trip.py make --out "$d" --layers "${SFT_LAYERS:-16}" \
                --hidden "${SFT_HIDDEN:-4096}" 2>&1 | keep "made|wrote|rror"
            "$PY" tools/sft_round_trip.py score --hf "$d/hf" --data "$d/chat.jsonl" 2>&1 | keep "loss|rror" "before fine-tuning: "
            "$PY" tools/sft_round_trip.py timed -- "$PY" tools/convert_hf.py import --hf "$d/hf" --output "$d/ckpt" \
                > "$d/import.log" 2>&1
            keep "timed|rror" < "$d/import.log"
            read -r -a imported < <(grep -E "^--load " "$d/import.log" | tail -1)
            rm -f "$d"/hf/*.safetensors  # the disk holds the imported and the trained checkpoint, not this too
            sft_flags "$d"
            lines="total parameters|^plan|> measuring|host store|start-up|> sft|iteration +[0-9]+/|validation|summary|exited|rror"
            RESULTS_DIR="$OUT/sft" bash examples/run.sh -m stronghold -- "${imported[@]}" "${sft[@]}" \
                --train-iters 4 --eval-interval 4 --save "$d/trained" 2>&1 | keep "$lines" "packed "
            rm -rf "$d/ckpt"
            "$PY" tools/sft_round_trip.py timed -- "$PY" tools/convert_hf.py export --load "$d/trained" \
                --output "$d/export" --dtype bfloat16 --tokenizer-model "$d/hf" > "$d/export.log" 2>&1
            keep "timed|rror" < "$d/export.log"
            "$PY" tools/sft_round_trip.py score --hf "$d/export" --data "$d/chat.jsonl" 2>&1 | keep "loss|rror" "after fine-tuning: "
            # last, for its time (the round trip comes first where a time limit cuts the stage short): each
            # layout's speed from the fine-tuned weights (the imported ones being gone for the disk's sake). Its
            # losses are on the batches those weights were trained on (--finetune restarts the data), so they lie
            # far below the validation loss: memorised, as the sft-seen stage shows
            rm -rf "$d/export"
            from_trained=(--load "$d/trained" --train-iters 3 --eval-interval 3)
            RESULTS_DIR="$OUT/sft" bash examples/run.sh -m stronghold -- "${imported[@]}" "${sft[@]}" \
                "${from_trained[@]}" --no-sft-packing 2>&1 | keep "$lines" "padded "
            RESULTS_DIR="$OUT/sft" bash examples/run.sh -m stronghold -- "${imported[@]}" "${sft[@]}" \
                "${from_trained[@]}" 2>&1 | keep "$lines" "packed-again "
            rm -rf "$d/trained"
            "$PY" tools/sft_round_trip.py rates "$OUT/sft.txt" | tee -a "$OUT/sft.txt" ;;
        *) echo "unknown stage $s" >&2; exit 2 ;;
    esac
done
# The call returns a limited number of files: pack the per-run logs and traces into one archive.
(cd "$OUT" && dirs=$(find . -mindepth 1 -maxdepth 1 -type d | sort) && [[ -n "$dirs" ]] &&
    tar czf runs.tgz $dirs && rm -rf $dirs)
stage done
