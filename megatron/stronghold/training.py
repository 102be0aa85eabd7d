"""Training entry: setup, then a loop that reads top to bottom, logging Megatron-LM's lines.

Every method trains the same megatron-core GPT from the same initial weights; they differ only in
where the transformer layers' model states live (see `build_method`).
"""

import contextlib
import gc
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from . import arguments, checkpointing
from .dropout import DropoutSeeds
from .executor import layer_major
from .logs import Progress, iteration_line, summary_line
from .model import build_model, flops_per_iteration, lm_loss, num_parameters
from .optim import LossScaler, ResidentOptimizer, clip_coefficient, global_norm, lr_scheduler

GiB = 1024 ** 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # one log per run, from rank 0
        print(msg, flush=True)


def init_distributed(device: torch.device, tensor_parallel: int = 1) -> None:
    """One process group and megatron-core's parallel state (idempotent: tests call train() often)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ:  # torchrun
            dist.init_process_group(backend)
        else:  # one process: an in-memory store, so no port can clash with another run
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_parallel, 1)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu (no CUDA GPU found: training on the CPU)"


@dataclass
class Method:
    """Where the layers live and who steps them. The baselines in `baselines/` provide the same
    interface: train_step, learning_rate, pinned_bytes, shutdown."""

    name: str
    resident: ResidentOptimizer
    executor: object = None  # StreamingExecutor for stronghold and l2l
    head: list = field(default_factory=list)  # resident layers before the streamed ones
    tail: list = field(default_factory=list)  # resident layers after the streamed ones
    seeds: object = None  # the trainer's DropoutSeeds (set after build)

    @property
    def optimizers(self):
        return [self.resident] + ([self.executor] if self.executor else [])

    def learning_rate(self) -> float:
        groups = self.resident.param_groups or self.executor.param_groups
        return groups[0]["lr"]

    def pinned_bytes(self) -> int:
        return self.executor.host_bytes()["pinned"] if self.executor else 0

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()

    def state_dict(self, model) -> dict:
        """{parameter name in the model: {"param": fp32 value, "exp_avg", "exp_avg_sq", "step"}}, the
        same for every method (so checkpoints cross methods); tensors are views of the method's own."""
        state = self.resident.state_dict()
        if self.executor is not None:
            state.update(self.streamed_state_dict(model))
        return state

    def load_state_dict(self, model, state) -> None:
        self.resident.load_state_dict(state)
        if self.executor is not None:
            self.executor.load_state_dict(state, self._layer_prefixes(model))

    def streamed_state_dict(self, model) -> dict:
        """The part of state_dict() that this rank's host store holds (data parallel: its own layers)."""
        return self.executor.state_dict(self._layer_prefixes(model))

    def held_elsewhere(self, model) -> set:
        """Data parallel: names of the streamed parameters that other ranks own (and save)."""
        if self.executor is None:
            return set()
        return {prefix + name for prefix, owned in zip(self._layer_prefixes(model), self.executor.owned)
                if not owned for name in self.executor.layout.names}

    def _layer_prefixes(self, model):
        names = {id(m): n for n, m in model.named_modules()}
        return [names[id(layer)] + "." for layer in self.executor.layers]

    def train_step(self, args, model, scaler, batches, device):
        """One optimizer step over the micro-batches; returns (loss, grad norm, skipped)."""
        n, executor = len(batches), self.executor
        inv_scale = 1.0 / scaler.scale
        if executor is not None:  # layer-major through the streamed layers
            executor.begin_step(inv_scale)
            losses = layer_major.train_step(model, executor, self.head, self.tail,
                                            [to_device(b, device) for b in batches], scaler.scale, self.seeds)
        else:
            losses = []
            for index, batch in enumerate(batches):
                self.seeds.microbatch = index
                loss = lm_loss(model, to_device(batch, device))
                (loss * (scaler.scale / n)).backward()
                losses.append(loss.detach())

        self.resident.average_over_data_parallel()  # streamed layers: by the executor, as each leaves the device
        sumsq, found_inf = self.resident.unscale_and_measure(inv_scale)
        sumsq, found_inf = float(sumsq), bool(found_inf)
        if executor is not None:
            host_sumsq, host_finite = executor.gradient_stats()
            sumsq, found_inf = sumsq + host_sumsq, found_inf or not host_finite
        sumsq = _sum_over_tensor_parallel(sumsq, device)
        found_inf = found_inf or not math.isfinite(sumsq)  # an overflow on any rank skips the step on all
        grad_norm = global_norm(sumsq)
        coeff = 1.0 if found_inf else clip_coefficient(grad_norm, args.clip_grad)
        self.resident.step(coeff, skip=found_inf)
        if executor is not None:
            executor.finish_step(coeff, skip=found_inf)
        scaler.update(found_inf)
        loss = torch.stack(losses).mean()
        if args.data_parallel_size > 1:  # the logged loss is the mean over data-parallel ranks, as Megatron's
            from megatron.core import parallel_state

            torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            loss /= args.data_parallel_size
        return float(loss), grad_norm, found_inf


def _sum_over_tensor_parallel(value: float, device) -> float:
    """Each tensor-parallel rank measured its own shards (replicated parameters once): add them up."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    torch.distributed.all_reduce(t, group=parallel_state.get_tensor_model_parallel_group())
    return float(t)


def preflight(args, vocab_size, device):
    """Check that the model fits and settle --resident-layers / --window-size / --cpu-optimizer-threads;
    returns the plan line (None for the methods without a plan)."""
    from .executor.cpu_worker import default_threads
    from .planner import DoesNotFit, ModelCosts, available_memory, check

    if args.offload_method not in arguments.STREAMING_METHODS:
        args.window_size = None  # only the streaming methods have a window: logs and tables show none
    costs = ModelCosts.of(args, vocab_size)
    gpu_free, host_free = available_memory(device)
    resident = args.resident_layers if args.resident_layers is not None or gpu_free is not None else 0
    try:
        plan = check(costs, gpu_free, host_free, args.offload_method, resident, args.window_size,
                     args.cpu_optimizer_threads, cores=default_threads())
    except DoesNotFit as exc:
        raise arguments.ArgumentError(str(exc)) from None
    if plan is None:
        return None
    args.resident_layers = plan.resident
    if args.window_size is None or args.offload_method == "l2l":  # l2l: one slot, whatever -w says
        args.window_size = max(plan.window, 1)
    args.cpu_optimizer_threads = plan.threads
    args.streamed_recompute = plan.streamed_recompute
    return plan.describe(costs)


def layer_placement(args, device, dtype):
    """Where each transformer layer goes the moment it is built (model.build_model's place_layer):
    megatron-lm's and the resident layers to the device in the compute dtype; of the streamed layers,
    those another data-parallel rank owns lose their weights at once (their owner broadcasts them
    at load time), this rank's stay in fp32 on the host until the store takes them. The ZeRO
    baselines hand the whole fp32 model to DeepSpeed: None."""
    if args.offload_method == "megatron-lm":
        return lambda index, layer: layer.to(device=device, dtype=dtype)
    if args.offload_method not in arguments.STREAMING_METHODS:
        return None
    from .executor import owned_by_this_rank

    first, end = streamed_span(args)
    owned = owned_by_this_rank(end - first)

    def place(index, layer):
        if not first <= index < end:
            layer.to(device=device, dtype=dtype)
        elif not owned[index - first]:
            for p in layer.parameters():  # the shape stays (one element's storage) until bound to a slot
                p.data = torch.zeros((), dtype=p.dtype).expand(p.shape)
    return place


def with_progress(place, layers: int):
    """The placement, reporting the build's progress (layers initialised, their fp32 bytes)."""
    progress = Progress("building the model", layers, log)

    def placed(index, layer):
        nbytes = sum(p.numel() * 4 for p in layer.parameters())
        if place is not None:
            place(index, layer)
        progress.step(index + 1, nbytes)
    return placed


def streamed_span(args) -> tuple:
    """(first, end) of the streamed layers. With several micro-batches per step they come first: the
    step runs layer-major through them and then micro-batch by micro-batch through the resident
    layers, which then need only the boundary between the two (executor/layer_major.py). With one
    micro-batch the resident layers come first, so that the streamed layers' CPU steps overlap
    the resident layers' backward and the next forward pass."""
    streamed = args.num_layers - args.resident_layers
    return (0, streamed) if args.num_microbatches > 1 else (args.resident_layers, args.num_layers)


def _move_all_but(model, streamed, device, dtype) -> None:
    """Move every parameter except the streamed layers' to the device, before the store is built,
    so the host holds at most the fp32 weights of the layers not yet in the store."""
    keep = {id(p) for layer in streamed for p in layer.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.data = p.data.to(device=device, dtype=dtype)


def build_method(args, model, device, dtype) -> Method:
    if args.offload_method == "megatron-lm":
        model.to(device=device, dtype=dtype)
        return Method(args.offload_method, ResidentOptimizer(list(model.named_parameters()), args))
    if args.offload_method in arguments.STREAMING_METHODS:
        from .baselines.l2l import build_l2l_executor
        from .executor import StreamingExecutor

        first, end = streamed_span(args)
        every = list(model.decoder.layers)
        head, layers, tail = every[:first], every[first:end], every[end:]
        _move_all_but(model, layers, device, dtype)  # frees host memory for the store
        executor = None
        if args.offload_method == "l2l":
            executor = build_l2l_executor(layers, dtype, device, args, log=log)
        elif layers:
            executor = StreamingExecutor(layers, args.window_size, dtype, device, args, log=log,
                                         recompute=args.streamed_recompute)
        model.to(device=device, dtype=dtype)  # streamed parameters are slot views already: untouched
        streamed = {id(p) for layer in layers for p in layer.parameters()}
        named = [(n, p) for n, p in model.named_parameters() if id(p) not in streamed]
        return Method(args.offload_method, ResidentOptimizer(named, args), executor, head, tail)
    if args.offload_method in arguments.ZERO_METHODS:
        from .baselines.zero import build_zero_method  # imports DeepSpeed: only when asked for

        return build_zero_method(args, model, device, dtype)
    raise arguments.ArgumentError(f"--offload-method {args.offload_method} is not implemented yet")


@dataclass
class History:
    """Per-iteration results, for tests and for the summary."""

    losses: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    loss_scales: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    times: list = field(default_factory=list)
    layer_steps: dict = field(default_factory=dict)  # stronghold: kept / redone / deferred counts
    link: dict = field(default_factory=dict)  # stronghold: bytes moved host-to-device / device-to-host
    valid_losses: list = field(default_factory=list)  # (iteration, validation loss)
    exit_code: int = 0  # process exit status (see checkpointing.RunGuard)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(args, observer=None) -> History:
    """observer(event, **details), for tools that watch a run (tools/diag_memory.py,
    tools/trace_stronghold.py): "iteration" after every iteration (iteration=N), and the streaming
    executor's events (executor.StreamingExecutor.observer)."""
    from .data import build_data_iterators, build_tokenizer, check_data_paths, padded_vocab_size

    try:
        check_data_paths(args)
    except ValueError as exc:
        raise arguments.ArgumentError(str(exc)) from None
    device = pick_device()
    dtype = DTYPES[args.params_dtype_name]
    init_distributed(device, args.tensor_model_parallel_size)
    if device.type == "cpu" and args.cpu_optimizer_threads:
        torch.set_num_threads(args.cpu_optimizer_threads)

    tokenizer = build_tokenizer(args)
    vocab_size = padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                                   args.tensor_model_parallel_size)
    resume = checkpointing.open_checkpoint(args, vocab_size, log)  # read and checked, tensors not loaded
    plan = preflight(args, vocab_size, device)  # before any large allocation
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(args.seed)
    start = time.perf_counter()
    streamed = range(*streamed_span(args)) if args.offload_method in arguments.STREAMING_METHODS else ()
    model = build_model(args, vocab_size, with_progress(layer_placement(args, device, dtype), args.num_layers),
                        streamed)
    built = time.perf_counter() - start
    total = num_parameters(model)
    log(f"total parameters: {total} ({total / 1e9:.3f} B)")
    log(f"config | method: {args.offload_method} | precision: {args.params_dtype_name} | "
        f"device: {device_name(device)} | layers: {args.num_layers} | hidden: {args.hidden_size} | "
        f"heads: {args.num_attention_heads} | seq: {args.seq_length} | "
        f"micro batch: {args.micro_batch_size} | global batch: {args.global_batch_size} | "
        f"micro batches per step: {args.num_microbatches} | window: {args.window_size} | "
        f"resident layers: {args.resident_layers} | recompute: {args.recompute_granularity or 'none'} | "
        f"data: {'mock' if args.mock_data else ' '.join(args.data_path)} |")
    if plan is not None:
        log(plan)

    seeds = DropoutSeeds(args.seed, getattr(args, "data_parallel_rank", 0) or 0, args.data_parallel_size)
    seeds.install(model)
    t0 = time.perf_counter()
    method = build_method(args, model, device, dtype)
    method.seeds = seeds
    if method.executor is not None:
        method.executor.observer = observer
    model.train()
    if method.executor is not None:
        host, owned = method.executor.host_bytes(), sum(method.executor.owned)
        streamed = owned * method.executor.layout.numel
        log(f"host store: {owned} of {method.executor.num_layers} streamed layers on this rank, {streamed} "
            f"parameters, pinned {host['pinned'] / GiB:.3f} GiB + pageable "
            f"{host['pageable'] / GiB:.3f} GiB = {(host['pinned'] + host['pageable']) / max(streamed, 1):.2f} B/param; "
            f"GPU window {method.executor.window} layers = {method.executor.gpu_bytes() / GiB:.3f} GiB; "
            f"setup {time.perf_counter() - t0:.1f} s")

    scheduler = lr_scheduler(args, method.optimizers)
    scaler = LossScaler(args)
    train_iter, valid_iter = build_data_iterators(args, tokenizer)
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
        checkpointing.save_checkpoint(args, iteration, model, method, scheduler, scaler, progress,
                                      vocab_size, log)

    with checkpointing.RunGuard(args, save, log) as guard, manual_gc(args):
        history = train_loop(args, model, method, scheduler, scaler, train_iter, device, flops, valid_iter,
                             guard, observer)
    history.exit_code = guard.exit_code
    method.shutdown()
    if method.executor is not None:
        history.layer_steps = dict(method.executor.counts)
        history.link = dict(method.executor.link)
    if history.times:
        log_summary(args, method, history, device)
    return history


def evaluate(args, model, method, valid_iter, device) -> float:
    """Mean validation loss over --eval-iters global batches (forward only)."""
    model.eval()
    losses = []
    with torch.no_grad():
        for _ in range(args.eval_iters):
            batches = [to_device(next(valid_iter), device) for _ in range(args.num_microbatches)]
            if method.executor is not None:
                method.executor.begin_step(1.0)
                losses += layer_major.evaluate_losses(model, method.executor, method.head, method.tail, batches,
                                                      method.seeds)
            else:
                losses += [float(lm_loss(model, batch)) for batch in batches]
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


def train_loop(args, model, method, scheduler, scaler, train_iter, device, flops, valid_iter=None,
               guard=None, observer=None) -> History:
    history = History()
    interval = {"loss": 0.0, "time": 0.0, "iters": 0, "skipped": 0}
    for it in range(getattr(args, "iteration", 0) + 1, args.train_iters + 1):  # resumes after --load
        batches = [next(train_iter) for _ in range(args.num_microbatches)]
        start = time.perf_counter()
        method.seeds.iteration = it
        loss, grad_norm, skipped = method.train_step(args, model, scaler, batches, device)
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
                "number of nan iterations": int(not math.isfinite(loss)),
                "samples per second": f"{args.global_batch_size / per_iter:.3f}",
                "TFLOP/s per GPU": f"{flops / per_iter / 1e12 / args.world_size:.3f}",
            }))
            interval = {"loss": 0.0, "time": 0.0, "iters": 0, "skipped": 0}
        if valid_iter is not None and args.eval_iters > 0 and (it % args.eval_interval == 0 or it == args.train_iters):
            loss = evaluate(args, model, method, valid_iter, device)
            history.valid_losses.append((it, loss))
            if args.manual_gc:
                gc.collect()
            log(f" validation loss at iteration {it} | lm loss value: {loss:.6E} | "
                f"lm loss PPL: {math.exp(min(loss, 20)):.6E} |")
        if guard is not None and guard.after_iteration(it, history.losses[-1], skipped):
            break  # saves at --save-interval; stops on a signal or non-finite losses
    return history


def log_summary(args, method, history, device) -> None:
    steady = history.times[1:] or history.times  # the first iteration pays for warm-up
    mean = sum(steady) / len(steady)
    peak_gpu = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else 0.0
    pinned = method.pinned_bytes() / GiB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    extra = {}
    if method.executor is not None:
        n = len(history.times)
        extra = {f"{k} (ms/iter)": v * 1000 / n for k, v in method.executor.timers.items()}
        # What crossed the link per iteration (evaluation included), in MiB: 2 loads and 1 gradient per
        # streamed layer and step, whatever the number of micro-batches.
        extra.update({f"{k} (MiB/iter)": float(v) / n / 2 ** 20 for k, v in method.executor.link.items()})
        # How the CPU steps went: guessed during backward and kept / redone, or deferred (clipping fired).
        extra.update({f"layer steps {k}": v for k, v in method.executor.counts.items()})
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
        return train(args).exit_code
    except arguments.ArgumentError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except torch.OutOfMemoryError as exc:  # a model at the edge of what the pre-flight check admits
        first = str(exc).splitlines()[0] if str(exc) else "out of memory"
        print(f"error: out of memory during training: {first}\nUse fewer layers, full activation recompute "
              f"(--recompute-granularity full), a smaller micro-batch, or --offload-method stronghold.",
              file=sys.stderr, flush=True)
        return 1
