"""Training entry: setup, then a loop that reads top to bottom, logging Megatron-LM's lines.

Every method trains the same megatron-core GPT from the same initial weights; they differ only in
where the transformer layers' model states live (methods/).
"""

import contextlib
import dataclasses
import gc
import math
import resource
import time
from dataclasses import astuple, dataclass, field

import torch

from . import arguments, checkpointing, methods, run_control, tensorboard_log
from .checkpointing import save_dir
from .config import Config
from .distributed import device_name, init_distributed, is_first_rank, leave_process_group, pick_device
from .dropout import DropoutSeeds
from .logs import Progress, iteration_line, summary_line
from .model import build_model, flops_per_iteration, num_parameters
from .optim import LossScaler, lr_scheduler
from .tokenizer import Vocabulary

GiB = 1024 ** 3


def log(msg: str) -> None:
    if is_first_rank():  # one log per run
        print(msg, flush=True)


def preflight(args, vocab_size, device):
    """Check that the model fits, before any large allocation, and settle --resident-layers,
    --window-size and --cpu-optimizer-threads: (the planner.Plan the method follows, the plan line
    for the log); (None, None) for the methods without a plan. ArgumentError when it does not fit."""
    from .executor.cpu_worker import default_threads
    from .planner import DoesNotFit, ModelCosts, available_memory, check

    costs = ModelCosts.of(args, vocab_size)
    kind, cores = methods.spec(args.offload_method), default_threads()
    # One process measures: ranks that measured apart could settle on different plans.
    if device.type == "cuda" and args.world_size == 1 and kind.preflight == "planner":
        from .planner.machine import GpuProbe, rates_or_constants
        from .planner.plan import thread_choices

        rates = rates_or_constants(GpuProbe(args, device, costs.vocab), args, costs.vocab, thread_choices(cores),
                                   refresh=args.refresh_machine_rates, log=log)
        costs = dataclasses.replace(costs, rates=rates)
    gpu_free, host_free = available_memory(device)
    resident = args.resident_layers if args.resident_layers is not None or gpu_free is not None else 0
    try:
        plan = check(costs, gpu_free, host_free, args.offload_method, resident, args.window_size,
                     args.cpu_optimizer_threads, cores=cores, fraction=args.optimizer_offload_fraction)
    except DoesNotFit as exc:
        raise arguments.ArgumentError(str(exc)) from None
    if plan is None:
        return None, None
    line = plan.describe(costs)
    if kind.preflight != "planner":
        return plan, line
    # The user's window stands (the executor clamps it to the streamed layers), unless the method fixes it.
    window = max(plan.window, 1) if args.window_size is None or kind.fixed_placement else args.window_size
    return dataclasses.replace(plan, window=window), line


def with_progress(place, layers: int):
    """The placement, reporting the build's progress (layers initialised, their fp32 bytes)."""
    progress = Progress("building the model", layers, log)

    def placed(index, layer):
        nbytes = sum(p.numel() * 4 for p in layer.parameters())
        if place is not None:
            place(index, layer)
        progress.step(index + 1, nbytes)
    return placed


@dataclass
class History:
    """Per-iteration results, for tests and for the summary."""

    losses: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    loss_scales: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    times: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)  # the method's totals (methods/protocol.py Method.stats)
    valid_losses: list = field(default_factory=list)  # (iteration, validation loss)
    exit_code: int = 0  # process exit status (run_control.py)


def train(args: Config, observer=None) -> History:
    """observer(event, **details), for tools that watch a run (tools/diag_memory.py,
    tools/trace_stronghold.py): "iteration" after every iteration (iteration=N), and the streaming
    executor's events (executor.StreamingExecutor.observer)."""
    found = checkpointing.prepare_dirs(args)  # --save made, --load's checkpoint found; nothing read yet
    tensorboard_log.prepare_dir(args)  # --tensorboard-dir made and writable, before anything is built
    with save_dir.held(args), contextlib.ExitStack() as closing:  # --save: one writer at a time
        checkpointing.refuse_overwriting_newer(args, found)
        return _train(args, found, observer, closing)


def _train(args: Config, found, observer, closing: contextlib.ExitStack) -> History:
    from .data import build_data_iterators, check_data, check_data_paths
    from .tokenizer import build_tokenizer

    try:
        check_data_paths(args)
        log(f"> building {args.tokenizer_type} tokenizer ...")
        tokenizer = build_tokenizer(args)
        check_data(args, tokenizer, log)  # the data matches its index and the vocabulary: before the model is built
        sft_datasets = None
        if args.sft:  # conversations read, checked and tokenized once, before the model is built
            from . import sft
            sft_datasets = sft.build_datasets(args, tokenizer, log)
    except ValueError as exc:
        raise arguments.ArgumentError(str(exc)) from None
    vocab = Vocabulary.of(tokenizer, args)
    vocab_size = vocab.padded_size
    log(f" > padded vocab (size: {vocab.size}) with {vocab_size - vocab.size} dummy tokens "
        f"(new size: {vocab_size})")
    device = pick_device()
    dtype = args.params_dtype
    init_distributed(device, args.tensor_model_parallel_size)
    if device.type == "cpu" and args.cpu_optimizer_threads:
        torch.set_num_threads(args.cpu_optimizer_threads)

    resume = checkpointing.open_checkpoint(args, found, vocab_size, log)  # read and checked, tensors not loaded
    start_iteration = resume.iteration if resume is not None else 0
    plan, plan_line = preflight(args, vocab_size, device)  # before any large allocation
    tensorboard = closing.enter_context(tensorboard_log.opened(args, start_iteration))

    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(args.seed)
    start = time.perf_counter()
    place = with_progress(methods.placement(args, plan, device, dtype), args.num_layers)
    streamed = methods.streamed_layers(args, plan)
    recomputed = None  # as the flags say, unless the plan chose how many resident layers run again
    if plan is not None and plan.resident_recompute is not None:
        recomputed = [i for i in range(args.num_layers) if i not in streamed][:plan.resident_recompute]
    model = build_model(args, vocab_size, place, streamed, recomputed)
    if resume is not None and resume.finetune and methods.spec(args.offload_method).deepspeed:
        checkpointing.load_weights_into_model(resume, model)  # before DeepSpeed partitions it
    built = time.perf_counter() - start
    total = num_parameters(model)
    log(f"total parameters: {total} ({total / 1e9:.3f} B)")
    log(f"config | method: {args.offload_method} | precision: {args.params_dtype_name} | "
        f"device: {device_name(device)} | layers: {args.num_layers} | hidden: {args.hidden_size} | "
        f"heads: {args.num_attention_heads} | seq: {args.seq_length} | "
        f"micro batch: {args.micro_batch_size} | global batch: {args.global_batch_size} | "
        f"micro batches per step: {args.num_microbatches} | window: {plan.window if plan else None} | "
        f"resident layers: {plan.resident if plan else args.resident_layers} | "
        f"recompute: {args.recompute_granularity or 'none'} | "
        f"data: {'mock' if args.mock_data else ' '.join(args.data_path)} |")
    if plan_line is not None:
        log(plan_line)

    seeds = DropoutSeeds(args.seed, args.data_parallel_rank, args.data_parallel_size)
    seeds.install(model)
    t0 = time.perf_counter()
    method = methods.build(args, plan, model, device, dtype, seeds, log)
    method.watch(observer)
    model.train()
    setup = method.setup_line()
    if setup is not None:
        log(f"{setup}; setup {time.perf_counter() - t0:.1f} s")

    scheduler = lr_scheduler(args, method.optimizers)
    scaler = LossScaler(args)
    consumed = (resume.consumed_train_samples, resume.consumed_valid_samples) if resume is not None else (0, 0)
    train_iter, valid_iter = build_data_iterators(args, tokenizer, *consumed, datasets=sft_datasets)
    flops = flops_per_iteration(args, vocab_size)
    if device.type == "cuda":
        log(f"GPU memory after setup: {torch.cuda.memory_allocated(device) / GiB:.3f} GiB allocated, "
            f"peak {torch.cuda.max_memory_allocated(device) / GiB:.3f} GiB")
        torch.cuda.reset_peak_memory_stats(device)  # the summary reports the training peak
    if resume is not None:  # last: the RNG state it restores is the next iteration's
        checkpointing.load_checkpoint(resume, args, model, method, scheduler, scaler, log)
        del resume
    log(f"start-up: {time.perf_counter() - start:.1f} s (model built and initialised in {built:.1f} s, "
        f"host store and optimizers in {time.perf_counter() - t0:.1f} s)")

    def save(iteration):
        progress = {"train": train_iter.consumed_samples,
                    "valid": getattr(valid_iter, "consumed_samples", 0)}
        checkpointing.save_checkpoint(args, iteration, model, method, scheduler, scaler, progress, vocab, log)

    with run_control.RunGuard(args, save, log) as guard, manual_gc(args):
        history = train_loop(args, model, method, scheduler, scaler, train_iter, device, flops, start_iteration,
                             valid_iter, guard, observer, tensorboard)
    history.exit_code = guard.exit_code
    method.shutdown()
    history.stats = method.stats()
    if history.times:
        log_summary(args, method, history, device)
    return history


def evaluate(args, model, method, valid_iter) -> float:
    """Mean validation loss over --eval-iters global batches (forward only)."""
    model.eval()
    losses = []
    with torch.no_grad():
        for _ in range(args.eval_iters):
            losses += method.eval_losses([next(valid_iter) for _ in range(args.num_microbatches)])
    model.train()
    return sum(losses) / len(losses)


@contextlib.contextmanager
def manual_gc(args):
    """Megatron-LM's --manual-gc: Python's threshold-based collector is off while training, and
    train_loop collects between steps instead, where a pause holds up no GPU work."""
    if not args.manual_gc:
        yield
        return
    gc.disable()
    gc.collect()
    try:
        yield
    finally:
        gc.enable()


def train_loop(args, model, method, scheduler, scaler, train_iter, device, flops, start_iteration=0,
               valid_iter=None, guard=None, observer=None, tensorboard=None) -> History:
    """Iterations start_iteration + 1 .. --train-iters (a resumed run continues after its checkpoint)."""
    history = History()
    interval = {"loss": 0.0, "time": 0.0, "iters": 0, "skipped": 0, "nan": 0}
    for it in range(start_iteration + 1, args.train_iters + 1):
        batches = [next(train_iter) for _ in range(args.num_microbatches)]
        start = time.perf_counter()
        method.seeds.iteration = it
        loss, grad_norm, skipped = astuple(method.train_step(batches, scaler))
        if not skipped:
            scheduler.step(increment=args.global_batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if observer is not None:
            observer("iteration", iteration=it)
        if args.manual_gc and args.manual_gc_interval and it % args.manual_gc_interval == 0:
            gc.collect()

        lr = method.learning_rate()
        history.losses.append(loss)
        history.grad_norms.append(grad_norm)
        history.skipped.append(skipped)
        history.loss_scales.append(scaler.scale)
        history.lrs.append(lr)
        history.times.append(elapsed)
        interval["loss"] += loss
        interval["time"] += elapsed
        interval["iters"] += 1
        interval["skipped"] += int(skipped)
        interval["nan"] += int(not math.isfinite(loss))
        if tensorboard is not None:
            tensorboard.iteration(it, it * args.global_batch_size, lm_loss=loss, learning_rate=lr, grad_norm=grad_norm,
                                  loss_scale=scaler.scale, seconds=elapsed,
                                  samples_per_second=args.global_batch_size / elapsed,
                                  tflops=flops / elapsed / 1e12 / args.world_size)
        if it % args.log_interval == 0 or it == args.train_iters:
            per_iter = interval["time"] / interval["iters"]
            log(iteration_line(it, args.train_iters, {
                "consumed samples": it * args.global_batch_size,
                "elapsed time per iteration (ms)": f"{per_iter * 1000:.1f}",
                "learning rate": f"{lr:.6E}",
                "global batch size": args.global_batch_size,
                "lm loss": f"{interval['loss'] / interval['iters']:.6E}",
                "loss scale": f"{scaler.scale:.1f}",
                "grad norm": f"{grad_norm:.6f}",
                "number of skipped iterations": interval["skipped"],
                "number of nan iterations": interval["nan"],
                "samples per second": f"{args.global_batch_size / per_iter:.3f}",
                "TFLOP/s per GPU": f"{flops / per_iter / 1e12 / args.world_size:.3f}",
            }))
            interval = {"loss": 0.0, "time": 0.0, "iters": 0, "skipped": 0, "nan": 0}
        if valid_iter is not None and args.eval_iters > 0 and (it % args.eval_interval == 0 or it == args.train_iters):
            loss = evaluate(args, model, method, valid_iter)
            history.valid_losses.append((it, loss))
            if args.manual_gc:
                gc.collect()
            log(f" validation loss at iteration {it} | lm loss value: {loss:.6E} | "
                f"lm loss PPL: {math.exp(min(loss, 20)):.6E} |")
            if tensorboard is not None:
                tensorboard.validation(it, it * args.global_batch_size, loss)
        if tensorboard is not None:
            tensorboard.counters(it, method, device)
        if guard is not None and guard.after_iteration(it, history.losses[-1], skipped):
            break  # saves at --save-interval; stops on a signal or non-finite losses
    return history


def log_summary(args, method, history, device) -> None:
    steady = history.times[1:] or history.times  # the first iteration pays for warm-up
    mean = sum(steady) / len(steady)
    peak_gpu = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else 0.0
    stats, n = history.stats, len(history.times)
    pinned = stats.get("pinned bytes", 0) / GiB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    extra = {f"{k} (ms/iter)": v * 1000 / n for k, v in stats.get("timers", {}).items()}
    # What crossed the link per iteration (evaluation included), in MiB: 2 loads and 1 gradient per
    # streamed layer and step, whatever the number of micro-batches.
    extra.update({f"{k} (MiB/iter)": float(v) / n / 2 ** 20 for k, v in stats.get("link", {}).items()})
    # How the CPU steps went: taken as gradients arrived (kept), or after the global norm (deferred).
    extra.update({f"layer steps {k}": v for k, v in stats.get("layer steps", {}).items()})
    if device.type == "cuda":
        # Each retry frees the allocator's cached blocks and synchronises the device: a model at the
        # edge of GPU memory that retries every iteration runs much slower than its kernels.
        extra["allocator retries"] = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
    log(summary_line({
        "method": args.offload_method,
        "iterations": len(history.times),
        "mean iteration time (ms)": mean * 1000,
        "samples per second": args.global_batch_size / mean,
        "peak GPU memory (GiB)": peak_gpu,
        "peak host RSS (GiB)": rss,
        "pinned host memory (GiB)": pinned,
        **extra,
    }))


def main(argv=None) -> int:
    try:
        args = arguments.parse_args(argv)
        exit_code = train(args).exit_code
    except run_control.REPORTED as exc:  # the user's to act on: one message, no traceback
        return run_control.report(exc)
    leave_process_group()
    return exit_code
