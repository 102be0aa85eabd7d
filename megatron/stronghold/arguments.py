"""Command-line flags, named as in Megatron-LM, plus the offloading flags of this project.

Validation lives here too: every mistake a user can make on the command line is reported with a
clear message and exit code 2 before anything large is allocated.
"""

import argparse
import os

from .config import Config
from .errors import ArgumentError
from .methods.registry import METHODS, spec  # the one list of methods (examples/run.sh and the tables read it)
from .tokenizer import TOKENIZER_TYPES, default_tokenizer_type

# Megatron-LM's choices for the precision-aware optimizer's dtypes, and those built here.
PRECISION_DTYPES = ("fp32", "fp16", "bf16", "fp8")
BUILT_DTYPES = {"exp_avg_dtype": ("fp32", "bf16"), "exp_avg_sq_dtype": ("fp32", "bf16"), "main_grads_dtype": ("fp32", "bf16")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_gpt.py",
        description="Train a megatron-core GPT, optionally streaming its layers through host memory "
        "(StrongHold) or with one of the baseline methods.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=16, help="Number of transformer layers.")
    g.add_argument("--hidden-size", type=int, default=2048, help="Transformer hidden size.")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="MLP hidden size (default 4 x hidden; with --swiglu 4 x hidden x 2/3, a multiple of 64).")
    g.add_argument("--num-attention-heads", type=int, default=16, help="Number of attention heads.")
    g.add_argument("--seq-length", type=int, default=1024, help="Tokens per sample.")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="Size of the learned position embedding table (default: --seq-length).")
    g.add_argument("--hidden-dropout", type=float, default=0.1, help="Dropout after attention and MLP.")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="Dropout on attention probabilities.")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="Give the output layer its own weights instead of sharing the input embedding.")
    g.add_argument("--kv-channels", type=int, default=None,
                   help="Width of each attention head (default: --hidden-size / --num-attention-heads).")
    g.add_argument("--group-query-attention", action="store_true",
                   help="Grouped-query attention: --num-query-groups key/value heads shared by the query heads.")
    g.add_argument("--num-query-groups", type=int, default=1,
                   help="With --group-query-attention: number of key/value heads.")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="Normalise each head's queries and keys (with --normalization) before attention.")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm",
                   help="Normalisation of the layers and the final norm (torch's LayerNorm / RMSNorm).")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="Epsilon of every norm.")
    g.add_argument("--swiglu", action="store_true",
                   help="SwiGLU MLP: a gated first projection (2 x --ffn-hidden-size wide) and SiLU; the "
                   "default --ffn-hidden-size becomes 4 x hidden x 2/3, rounded down to a multiple of 64.")
    g.add_argument("--disable-bias-linear", action="store_true",
                   help="No biases in the linear layers (attention and MLP).")
    g.add_argument("--add-qkv-bias", action="store_true",
                   help="A bias on the query/key/value projection even with --disable-bias-linear (Qwen2).")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute",
                   help="learned_absolute: a table of --max-position-embeddings positions. rope: rotary "
                   "embeddings of the queries and keys.")
    g.add_argument("--rotary-base", type=int, default=10000, help="rope: base of the rotary frequencies.")
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="rope: fraction of each head's channels that are rotated, in (0, 1].")
    g.add_argument("--openai-gelu", action="store_true",
                   help="GELU's tanh approximation (OpenAI's GPT-2, transformers' gelu_new) instead of the exact "
                   "erf form.")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Pad the vocabulary to a multiple of this (as Megatron-LM).")
    g.add_argument("--use-cpu-initialization", action="store_true",
                   help="Initialise weights on the CPU. Always the case here, so that every method starts "
                   "from bit-identical weights for a given --seed; accepted for compatibility.")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=4, help="Samples per forward/backward pass.")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Samples per optimizer step; gradients are accumulated over "
                   "global / (micro x data-parallel) micro-batches (default: micro x data-parallel).")
    g.add_argument("--train-iters", type=int, default=20, help="Optimizer steps to run.")
    g.add_argument("--lr", type=float, default=1e-4, help="Peak learning rate.")
    g.add_argument("--min-lr", type=float, default=0.0, help="Learning rate at the end of the decay.")
    g.add_argument("--lr-decay-style", default="linear", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   help="Shape of the learning-rate decay.")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="Iterations of linear warmup.")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="Warmup as a fraction of --lr-decay-iters (overrides --lr-warmup-iters).")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="Iterations to decay over (default: --train-iters).")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay; biases and norm parameters get none, as in Megatron-LM.")
    g.add_argument("--clip-grad", type=float, default=1.0, help="Global gradient-norm clipping (0 disables).")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1.")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2.")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon.")
    g.add_argument("--seed", type=int, default=1234, help="Random seed for weights, dropout and data order.")

    g = p.add_argument_group("precision")
    g.add_argument("--fp16", action="store_true", help="fp16 compute with dynamic loss scaling, fp32 master weights.")
    g.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 master weights (fp32 if neither flag).")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32, help="fp16: starting loss scale.")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="fp16: smallest loss scale.")
    g.add_argument("--loss-scale-window", type=int, default=1000, help="fp16: clean iterations before the scale grows.")
    g.add_argument("--hysteresis", type=int, default=2, help="fp16: overflows tolerated before the scale shrinks.")
    g.add_argument("--no-store-param-remainders", dest="store_param_remainders", action="store_false",
                   help="bf16: keep each streamed layer's fp32 master whole (4 B/param) instead of as its bf16 "
                   "weights plus a 16-bit remainder (2 B/param, the same fp32 value bit for bit; the default).")
    g.add_argument("--use-precision-aware-optimizer", action="store_true",
                   help="Let --exp-avg-dtype, --exp-avg-sq-dtype and --main-grads-dtype take other values than "
                   "fp32 (megatron-lm, stronghold, l2l).")
    for name, what in (("exp-avg", "Adam's first moment"), ("exp-avg-sq", "Adam's second moment"),
                       ("main-grads", "the gradients summed over a step's micro-batches on the GPU")):
        g.add_argument(f"--{name}-dtype", choices=PRECISION_DTYPES, default="fp32",
                       help=f"dtype of {what} (with --use-precision-aware-optimizer). A bf16 moment is updated "
                       "in fp32 from its stored value and stored rounded to nearest, on the CPU and the GPU alike.")

    g = p.add_argument_group("activation recompute")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="full: recompute each checkpointed layer in backward. selective: recompute only "
                   "core attention, which the fused SDPA kernel already does, so it changes nothing here.")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="uniform: checkpoint every layer. block: checkpoint the first --recompute-num-layers "
                   "(stronghold: the first of its resident layers; the streamed ones follow the plan). Not given: "
                   "every layer for megatron-lm; stronghold's plan recomputes only as many of its resident layers "
                   "as the GPU needs (the fewest that fit: recompute is exact, so only speed changes).")
    g.add_argument("--recompute-num-layers", type=int, default=1,
                   help="block: how many layers to checkpoint. uniform: layers per checkpoint (each layer "
                   "is checkpointed on its own here, which saves the same activations per layer).")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=1, help="Iterations between log lines.")
    g.add_argument("--eval-interval", type=int, default=1000, help="Iterations between validation runs.")
    g.add_argument("--eval-iters", type=int, default=0, help="Validation batches per evaluation (0: none).")
    g.add_argument("--manual-gc", action="store_true",
                   help="Turn Python's threshold-based garbage collector off while training and collect between "
                   "steps instead (every --manual-gc-interval iterations and after each evaluation), so its "
                   "pauses do not land inside an iteration.")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="With --manual-gc: iterations between collections (0: none between training steps).")

    g = p.add_argument_group("tensorboard")
    g.add_argument("--tensorboard-dir", default=None, metavar="DIR",
                   help="Write TensorBoard event files to DIR: loss, learning rate, grad norm, loss scale, "
                   "iteration time, throughput, validation loss.")
    g.add_argument("--tensorboard-log-interval", type=int, default=1, metavar="N",
                   help="Iterations between TensorBoard writes.")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000, metavar="N",
                   help="Events kept in memory before they are written to disk.")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="Also the streaming executor's timers and host-device link volume per iteration.")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="Also memory: GPU allocator counters and peak, host peak RSS and pinned bytes.")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="Megatron .bin/.idx prefixes, optionally weighted: '0.7 a 0.3 b'.")
    g.add_argument("--mock-data", action="store_true", help="Synthetic data (also used without --data-path).")
    g.add_argument("--sft", action="store_true",
                   help="Fine-tune on chat data: --data-path names JSONL files of {\"messages\": [...]} conversations, "
                   "rendered with the --tokenizer-model's chat template; only the assistant's tokens carry loss "
                   "(megatron/stronghold/sft.py). Conversations are packed into --seq-length, each attending "
                   "only to itself.")
    g.add_argument("--no-sft-packing", dest="sft_packing", action="store_false",
                   help="--sft: one conversation per sequence, padded, instead of packing them.")
    g.add_argument("--split", default="969,30,1", help="Train/valid/test split of the data, in parts.")
    g.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES,
                   help="megatron-core's tokenizer (default: GPT2BPETokenizer with --vocab-file, HuggingFaceTokenizer "
                   "with --tokenizer-model, else ByteLevelTokenizer). Nothing is downloaded.")
    g.add_argument("--tokenizer-model", default=None,
                   help="HuggingFaceTokenizer: a local tokenizer directory (tokenizer.json, tokenizer_config.json) "
                   "or its tokenizer.json.")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json.")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt.")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: token ids 0..N-1 (eod is N).")
    g.add_argument("--data-cache-path", default=None, help="Where dataset index caches are written.")

    g = p.add_argument_group("parallelism (launch several processes with torchrun)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="Ranks that split each layer (megatron-core's parallel layers); the other factor of "
                   "the world size is data parallel.")

    g = p.add_argument_group("offloading")
    g.add_argument("--offload-method", choices=METHODS, default="megatron-lm",
                   help="megatron-lm: every layer on the GPU. stronghold: layers in host memory, a window "
                   "of them on the GPU with asynchronous prefetch and a per-layer CPU optimizer. l2l, "
                   "zero-offload, zero-infinity: the baselines.")
    g.add_argument("--window-size", type=int, default=None,
                   help="stronghold: GPU slots that streamed layers pass through (default: the planner's "
                   "choice, 4; clamped to the number of streamed layers).")
    g.add_argument("--resident-layers", type=int, default=None,
                   help="stronghold: transformer layers kept on the GPU with a GPU optimizer (default: as many "
                   "as fit in free GPU memory, as planned at start; 0 on a machine without CUDA).")
    g.add_argument("--optimizer-offload-fraction", type=float, default=None,
                   help="megatron-offload: the fraction of the optimizer's parameters stepped on the CPU (Megatron-LM's "
                   "flag; default: the smallest that fits the GPU, from its pre-flight check).")
    g.add_argument("--refresh-machine-rates", action="store_true",
                   help="Measure this machine's copy, CPU AdamW and layer rates again for the plan instead of "
                   "reading them from the cache (planner/machine.py).")
    g.add_argument("--cpu-optimizer-threads", type=int, default=None,
                   help="stronghold: intra-op threads of the CPU optimizer (default, chosen by the planner: this "
                   "rank's share of the node's cores less one for the main thread where the CPU steps bound the "
                   "iteration, half of that where they are a small part of it).")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, metavar="DIR",
                   help="Write checkpoints to DIR/iter_XXXXXXX/ (and DIR/latest_checkpointed_iteration.txt) "
                   "at every --save-interval, at the end, at --exit-interval and on SIGTERM/SIGINT.")
    g.add_argument("--save-interval", type=int, default=None, metavar="N",
                   help="Iterations between checkpoints (needs --save).")
    g.add_argument("--load", default=None, metavar="DIR",
                   help="Resume from the newest checkpoint in DIR: weights, optimizer, schedule, loss "
                   "scale, RNG and data position. Any method's checkpoint loads into any method except "
                   "ZeRO's (those load only into the same ZeRO method; with --finetune into any). DIR must hold a checkpoint, "
                   "unless it is also --save (then an empty DIR starts from scratch).")
    g.add_argument("--finetune", action="store_true",
                   help="With --load: take the weights only and start at iteration 0 with a fresh optimizer, "
                   "learning-rate schedule, loss scale and data position (any method's checkpoint, into any "
                   "method). Assumed for a checkpoint whose tracker file says 'release' (tools/convert_hf.py "
                   "import writes those).")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="With --load: the learning-rate and weight-decay schedule of these flags, not the "
                   "checkpoint's (without this or the next flag, a resume whose schedule flags differ is refused).")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="With --load: the checkpoint's schedule, whatever these flags say.")
    g.add_argument("--ckpt-step", type=int, default=None, metavar="N",
                   help="With --load: resume from iteration N's checkpoint instead of the newest.")
    g.add_argument("--exit-interval", type=int, default=None, metavar="N",
                   help="Stop after an iteration divisible by N (saving first with --save).")
    g.add_argument("--exit-on-nonfinite-iters", type=int, default=None, metavar="K",
                   help="Stop (exit status 3, nothing saved) after K consecutive iterations whose loss is "
                   "not finite, or, without --fp16, whose gradients are not finite (those steps are "
                   "skipped). Default: 3 with --fp16 (whose loss scaler handles gradient overflows on "
                   "its own), 1 otherwise; 0: never stop.")
    return p


def parse_args(argv=None) -> Config:
    """The run's frozen Config; ArgumentError for flags that contradict each other. Reads the
    launch's WORLD_SIZE and RANK, and nothing on disk: --save and --load are checked at setup
    (checkpointing.prepare_dirs)."""
    args = build_parser().parse_args(argv)
    validate_args(args)
    return Config.from_namespace(args)


def _positive(args, name):
    value = getattr(args, name)
    if value is None or value < 1:
        raise ArgumentError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def validate_args(args: argparse.Namespace) -> None:
    """Fill derived defaults into the parsed namespace and reject inconsistent flags (raises
    ArgumentError); parse_args freezes the result."""
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
                 "train_iters", "log_interval", "eval_interval"):
        _positive(args, name)
    _validate_layer(args)
    if args.fp16 and args.bf16:
        raise ArgumentError("choose one of --fp16 and --bf16")
    args.params_dtype_name = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    if args.manual_gc_interval < 0:
        raise ArgumentError(f"--manual-gc-interval must be 0 or more, got {args.manual_gc_interval}")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise ArgumentError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                            f"{args.max_position_embeddings}")

    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tp = args.tensor_model_parallel_size
    if tp < 1 or args.world_size % tp:
        raise ArgumentError(f"--tensor-model-parallel-size {tp} does not divide the {args.world_size} processes")
    if args.num_attention_heads % tp or args.ffn_hidden_size % tp:
        raise ArgumentError(f"--num-attention-heads {args.num_attention_heads} and the MLP size "
                            f"{args.ffn_hidden_size} must be divisible by --tensor-model-parallel-size {tp}")
    if args.num_query_groups % tp:
        raise ArgumentError(f"--num-query-groups {args.num_query_groups} must be divisible by "
                            f"--tensor-model-parallel-size {tp}")
    method = spec(args.offload_method)
    if method.needs_cuda:
        import torch

        if not torch.cuda.is_available():
            raise ArgumentError(f"--offload-method {args.offload_method} needs a CUDA GPU (megatron-core allocates its "
                                "gradient buffers and copy streams there) and this machine has none")
    if args.params_dtype_name not in method.precisions:
        raise ArgumentError(f"--offload-method {args.offload_method} trains in {' or '.join(method.precisions)} only "
                            f"(this run: {args.params_dtype_name}); add --{method.precisions[0]}")
    fraction = args.optimizer_offload_fraction
    if fraction is not None and not 0 <= fraction <= 1:
        raise ArgumentError(f"--optimizer-offload-fraction must be between 0 and 1, got {fraction}")
    if args.world_size > 1 and not method.data_parallel:
        raise ArgumentError(f"{args.world_size} processes: data and tensor parallelism are implemented for "
                            f"{', '.join(m for m in METHODS if spec(m).data_parallel)}, not yet for "
                            f"{args.offload_method}; run one process")
    # megatron-core's rank order: tensor-parallel ranks are adjacent, data parallel across them.
    args.data_parallel_size = args.world_size // tp
    args.data_parallel_rank = int(os.environ.get("RANK", "0")) // tp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % per_step:
        raise ArgumentError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                            f"--micro-batch-size x data-parallel size = {per_step}")
    args.num_microbatches = args.global_batch_size // per_step

    if args.window_size is not None and args.window_size < 1:
        raise ArgumentError(f"--window-size must hold at least one layer, got {args.window_size}")
    if args.resident_layers is not None and not 0 <= args.resident_layers <= args.num_layers:
        raise ArgumentError(f"--resident-layers must be between 0 and --num-layers {args.num_layers}, "
                            f"got {args.resident_layers}")
    if args.recompute_num_layers < 1:
        raise ArgumentError("--recompute-num-layers must be at least 1")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_fraction is not None:
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    _validate_schedule(args)
    if args.clip_grad < 0:
        raise ArgumentError("--clip-grad must be >= 0")
    if args.mock_data and args.data_path:
        raise ArgumentError("choose one of --mock-data and --data-path")
    if args.sft and not args.data_path:
        raise ArgumentError("--sft needs --data-path FILE.jsonl (conversations to fine-tune on)")
    if not args.data_path:
        args.mock_data = True
    if args.tokenizer_type is None:
        args.tokenizer_type = default_tokenizer_type(args)
    _validate_optimizer_precision(args)
    from .tensorboard_log import check_args as check_tensorboard_args

    check_tensorboard_args(args)
    _validate_checkpointing(args)


def _validate_layer(args) -> None:
    """The transformer layer's shape (Megatron-LM's defaults and the combinations megatron-core
    would assert on); fills --kv-channels, --num-query-groups and --ffn-hidden-size."""
    heads = args.num_attention_heads
    if args.kv_channels is None:
        if args.hidden_size % heads:
            raise ArgumentError(f"--hidden-size {args.hidden_size} is not divisible by "
                                f"--num-attention-heads {heads} (or give the head width with --kv-channels)")
        args.kv_channels = args.hidden_size // heads
    _positive(args, "kv_channels")
    if not args.group_query_attention:
        args.num_query_groups = heads
    _positive(args, "num_query_groups")
    if heads % args.num_query_groups:
        raise ArgumentError(f"--num-attention-heads {heads} is not divisible by --num-query-groups "
                            f"{args.num_query_groups}")
    if args.ffn_hidden_size is None:
        # Megatron-LM's SwiGLU default: the two first-layer matrices hold about as many parameters as
        # GELU's one of 4 x hidden, in a multiple of 64.
        args.ffn_hidden_size = int(4 * args.hidden_size * 2 / 3 / 64) * 64 if args.swiglu else 4 * args.hidden_size
        if args.ffn_hidden_size < 1:
            raise ArgumentError(f"--swiglu with --hidden-size {args.hidden_size} gives an MLP of "
                                f"{args.ffn_hidden_size} channels: give --ffn-hidden-size")
    _positive(args, "ffn_hidden_size")
    if args.openai_gelu and args.swiglu:
        raise ArgumentError("--openai-gelu sets GELU's form, --swiglu uses SiLU: choose one")
    if not args.norm_epsilon > 0:
        raise ArgumentError(f"--norm-epsilon must be > 0, got {args.norm_epsilon}")
    if args.position_embedding_type == "rope":
        if not 0 < args.rotary_percent <= 1:
            raise ArgumentError(f"--rotary-percent must be in (0, 1], got {args.rotary_percent}")
        rotary = int(args.kv_channels * args.rotary_percent)
        if rotary < 2 or rotary % 2:
            raise ArgumentError(f"--rotary-percent {args.rotary_percent} of --kv-channels {args.kv_channels} "
                                f"rotates {rotary} channels per head: it must be an even number, at least 2")
        _positive(args, "rotary_base")


def _validate_schedule(args) -> None:
    """What megatron-core's OptimizerParamScheduler would assert on, said in the flags' words."""
    for flag, value in (("--lr", args.lr), ("--min-lr", args.min_lr)):
        if not value >= 0:  # NaN too
            raise ArgumentError(f"{flag} must be >= 0, got {value}")
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.lr_decay_iters < 1:
        raise ArgumentError(f"--lr-decay-iters must be at least 1, got {args.lr_decay_iters}")
    if not 0 <= args.lr_warmup_iters < args.lr_decay_iters:
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} must be >= 0 and below --lr-decay-iters "
                            f"{args.lr_decay_iters} (which defaults to --train-iters)")
    if args.weight_decay < 0:
        raise ArgumentError(f"--weight-decay must be >= 0, got {args.weight_decay}")


def _validate_optimizer_precision(args) -> None:
    """Megatron-LM's precision-aware optimizer flags; fills store_param_remainders with what the run
    does (remainders exist only beside bf16 weights)."""
    args.store_param_remainders = bool(args.store_param_remainders and args.bf16)
    chosen = {name: getattr(args, name) for name in BUILT_DTYPES}
    lowered = [f"--{n.replace('_', '-')} {v}" for n, v in chosen.items() if v != "fp32"]
    if lowered and not args.use_precision_aware_optimizer:
        raise ArgumentError(f"{' '.join(lowered)} needs --use-precision-aware-optimizer (as in Megatron-LM)")
    for name, value in chosen.items():
        if value not in BUILT_DTYPES[name]:
            raise ArgumentError(f"--{name.replace('_', '-')} {value} is not implemented here; choose one of "
                                f"{', '.join(BUILT_DTYPES[name])}")
    if args.main_grads_dtype == "bf16" and not args.bf16:
        raise ArgumentError("--main-grads-dtype bf16 needs --bf16 (the gradients it sums are the bf16 ones)")
    method = spec(args.offload_method)
    if lowered and not method.precision_aware:
        whose = "DeepSpeed's" if method.deepspeed else "megatron-core's"
        raise ArgumentError(f"{' '.join(lowered)}: {args.offload_method} keeps {whose} own optimizer states; the "
                            f"precision-aware optimizer is built for "
                            f"{', '.join(m for m in METHODS if spec(m).precision_aware)}")


def _validate_checkpointing(args) -> None:
    if (args.save or args.load) and args.tensor_model_parallel_size > 1:
        raise ArgumentError("--save/--load with --tensor-model-parallel-size > 1 is not implemented yet "
                            "(checkpoints hold whole, unsharded parameters)")
    if args.save_interval is not None:
        _positive(args, "save_interval")
        if not args.save:
            raise ArgumentError("--save-interval needs --save DIR")
    if args.finetune and not args.load:
        raise ArgumentError("--finetune needs --load DIR (the checkpoint whose weights it starts from)")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ArgumentError("choose one of --override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler")
    if args.ckpt_step is not None and not args.load:
        raise ArgumentError("--ckpt-step needs --load DIR")
    if args.exit_interval is not None:
        _positive(args, "exit_interval")
    if args.exit_on_nonfinite_iters is None:
        args.exit_on_nonfinite_iters = 3 if args.fp16 else 1
    elif args.exit_on_nonfinite_iters < 0:
        raise ArgumentError("--exit-on-nonfinite-iters must be >= 0")
