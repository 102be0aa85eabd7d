"""The rates the planner's seconds are made of, measured on this machine where a run starts, and cached.

With a GPU, before anything large is allocated (a few seconds, once per machine, card, host-store layout
and layer shape; `--refresh-machine-rates` measures again):
- the pinned copy rate, host to GPU and GPU to host, each alone;
- the host store's CPU AdamW kernel (stronghold_ext) in this run's layout, at each thread count the plan
  may give the CPU optimizer;
- one transformer layer of this run's shape, forward and backward over one micro-batch with the real
  kernels and dtype, each gradient summed into its main grad as the run sums it, and the output layer
  with its loss and the word embedding, both with their weight gradients: the launch-bound time of small
  layers included, which a FLOP count misses;
- the GPU optimizer's step (optim.ResidentOptimizer, the run's precision and layout) over that layer's
  parameters and over the vocabulary-sized weights, as parameters/s each: the resident parameters step on
  the GPU after every backward, a layer's dozen tensors at the rate of their launches, an embedding's one
  large tensor nearer the memory's.
Without a GPU nothing is measured: the plan predicts no iteration there.

The cache is a JSON file (STRONGHOLD_CACHE_DIR, else ~/.cache/stronghold-megatron); an unreadable one is
measured again.
"""

import dataclasses
import json
import os
import socket
import statistics
import time
from typing import Optional, Tuple

from ..layer_shape import LayerShape

CACHE_FILE = "machine-rates.json"
COPY_BYTES = 256 * 2**20
ADAM_NUMEL = 1 << 25
REPEATS = 5


@dataclasses.dataclass(frozen=True)
class Rates:
    """Measured rates; None (or empty) where costs.py's constants stand in."""
    source: str = "not measured: costs.py's constants"
    h2d: Optional[float] = None  # bytes/s, pinned host memory to the GPU
    d2h: Optional[float] = None
    cpu_adam: Tuple[Tuple[int, float], ...] = ()  # (threads, parameters/s) in this run's host-store layout
    layer_forward: Optional[float] = None  # seconds: one layer, one micro-batch
    layer_backward: Optional[float] = None
    head: Optional[float] = None  # seconds: output layer, loss and embedding, forward and backward, one micro-batch
    resident_step: Optional[float] = None  # parameters/s of the GPU optimizer's step over a layer's parameters
    embedding_step: Optional[float] = None  # ... over the embedding and output layer

    def adam_rate(self, threads: Optional[int]) -> Optional[float]:
        """Parameters/s at `threads` (the nearest measured count; None: the most threads measured)."""
        if not self.cpu_adam:
            return None
        if threads is None:
            return max(self.cpu_adam)[1]
        return min(self.cpu_adam, key=lambda tr: abs(tr[0] - threads))[1]

    def describe(self, threads: Optional[int]) -> str:
        if self.layer_forward is None:
            return f"rates: {self.source}"
        return (f"rates ({self.source}): host->GPU {self.h2d / 1e9:.0f} GB/s, GPU->host {self.d2h / 1e9:.0f} GB/s, "
                f"CPU AdamW {self.adam_rate(threads) / 1e9:.2f} G params/s, layer forward "
                f"{self.layer_forward * 1e3:.2f} ms + backward {self.layer_backward * 1e3:.2f} ms per micro-batch, "
                f"output layer and embedding {self.head * 1e3:.2f} ms, GPU optimizer step "
                f"{self.resident_step / 1e9:.1f} (layers) / {self.embedding_step / 1e9:.1f} (embeddings) G params/s")


ASSUMED = Rates()


def cache_path() -> str:
    root = os.environ.get("STRONGHOLD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "stronghold-megatron")
    return os.path.join(root, CACHE_FILE)


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: str, cache: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # readers see the old file or the new one
    except OSError:
        pass  # a cache that cannot be written is measured again next time


def layout_key(args) -> str:
    """The host store's layout, which sets the bytes the CPU step moves per parameter."""
    moments = "/".join(str(d).removeprefix("torch.") for d in args.moment_dtypes)
    return f"{args.params_dtype_name}|remainders={bool(args.store_param_remainders)}|moments={moments}"


def shape_key(args, vocab: int) -> str:
    return (f"{LayerShape.of(args)}|seq={args.seq_length}|micro={args.micro_batch_size}|{args.params_dtype_name}"
            f"|vocab={vocab}|untied={bool(args.untie_embeddings_and_output_weights)}")


def measured_rates(probe, args, vocab: int, threads: Tuple[int, ...], refresh: bool = False, log=None) -> Rates:
    """The rates of probe's machine (GpuProbe below, or a test's), from the cache where it has them."""
    path = cache_path()
    cache = {} if refresh else _read_cache(path)
    where = f"{socket.gethostname()}|{probe.card}"

    def get(what, key, measure):
        if key not in cache:
            if log is not None:
                log(f"> measuring {what} on this machine for the plan (cached in {path}) ...")
            cache[key] = measure()
        return cache[key]

    h2d, d2h = get("the pinned copy rates", f"{where}|copies", probe.copies)
    adam = tuple((t, get(f"the CPU AdamW rate at {t} threads", f"{socket.gethostname()}|adam|{layout_key(args)}|threads={t}",
                         lambda t=t: probe.cpu_adam(t)))
                 for t in sorted(set(threads)))
    # the key names what is measured: entries of a probe that measured less are measured again
    forward, backward, head, step, embedding_step = get(
        "one layer's forward, backward and optimizer step", f"{where}|layer+steps|{shape_key(args, vocab)}|"
        f"{layout_key(args)}|main-grads={args.main_grads_torch_dtype}", probe.layer)
    _write_cache(path, cache)
    return Rates(f"measured on {probe.card}", h2d, d2h, adam, forward, backward, head, step, embedding_step)


def rates_or_constants(probe, args, vocab: int, threads: Tuple[int, ...], refresh: bool = False, log=None) -> Rates:
    """measured_rates, or the constants where the GPU cannot hold a measurement (a card already in use): the
    run goes on with the plan it would have had before measuring, and the log says so."""
    import torch

    try:
        return measured_rates(probe, args, vocab, threads, refresh, log)
    except torch.OutOfMemoryError:
        pass  # the memory goes back below, once the traceback no longer holds the probe's tensors
    if probe.device.type == "cuda":
        torch.cuda.empty_cache()
    if log is not None:
        log("> measuring this machine ran out of GPU memory: the plan uses costs.py's constants")
    return ASSUMED


def _median_seconds(fn, synchronize=lambda: None, warmup: int = 2, repeats: int = REPEATS) -> float:
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class GpuProbe:
    """The measurements themselves, on this process's GPU (the trainer's device) and host."""

    def __init__(self, args, device, vocab: int):
        import torch

        self.args, self.device, self.vocab = args, device, vocab
        cuda = device.type == "cuda"  # a CPU probe times the same code on the host (tests)
        self.card = torch.cuda.get_device_name(device) if cuda else "cpu"
        self.sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def copies(self) -> list:
        import torch

        host = torch.empty(COPY_BYTES, dtype=torch.uint8).pin_memory()
        gpu = torch.empty(COPY_BYTES, dtype=torch.uint8, device=self.device)
        to_gpu = _median_seconds(lambda: gpu.copy_(host, non_blocking=True), self.sync)
        to_host = _median_seconds(lambda: host.copy_(gpu, non_blocking=True), self.sync)
        del host, gpu
        self._release()
        return [COPY_BYTES / to_gpu, COPY_BYTES / to_host]

    def _release(self) -> None:
        """Give the measurements' memory back to the device: the plan reads the free GPU memory next, and
        torch's allocator would otherwise keep it cached (an H100 run planned with 65 of 78 GiB free)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def cpu_adam(self, threads: int) -> float:
        """Parameters/s of one step of the host store's kernel in this run's layout (executor/host_store.py)."""
        import torch
        from stronghold_ext import adamw_step

        from ..precision import gradient_dtype

        args, n = self.args, ADAM_NUMEL
        dtype = args.params_dtype
        remainders = dtype == torch.bfloat16 and args.store_param_remainders
        weights = torch.zeros(n, dtype=dtype)
        master = None if remainders else weights if dtype == torch.float32 else torch.zeros(n)
        out = None if master is weights else weights
        exp_avg, exp_avg_sq = (torch.zeros(n, dtype=d) for d in args.moment_dtypes)
        grad = torch.full((n,), 1e-3, dtype=gradient_dtype(dtype))
        extra = {"remainder": torch.zeros(n, dtype=torch.int16), "ties": torch.zeros(0, dtype=torch.int64)} \
            if remainders else {}
        scratch = torch.empty(n)
        step = [0]

        def one():
            step[0] += 1
            adamw_step(master, exp_avg, exp_avg_sq, grad, out, 1e-4, 0.9, 0.95, 1e-8, 0.1, step[0], 1.0,
                       scratch=scratch, **extra)

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return n / _median_seconds(one, warmup=1, repeats=3)
        finally:
            torch.set_num_threads(before)

    def layer(self) -> list:
        """Seconds of one layer's forward and of its backward, and of the output layer's and the word
        embedding's forward and backward with the loss, over one micro-batch, every weight gradient summed
        into a main grad as the run does; and the parameters/s of the GPU optimizer's step over the layer
        and over the vocabulary-sized weights."""
        import torch
        import torch.nn.functional as F
        from megatron.core import parallel_state
        from megatron.core.transformer.spec_utils import build_module

        from ..model import LayerInputs, RotaryEmbedding, layer_spec, run_layer, transformer_config
        from ..optim import ResidentOptimizer

        args, device, dtype = self.args, self.device, self.args.params_dtype
        s, b, h = args.seq_length, args.micro_batch_size, args.hidden_size
        config = transformer_config(args)
        layer = build_module(layer_spec(args).layer_specs[0], config=config, layer_number=1).to(device, dtype)
        # the resident layers' optimizer: its hooks sum each gradient into the main grads during backward
        optimizer = ResidentOptimizer(list(layer.named_parameters()), args)
        rotary = None
        if args.position_embedding_type == "rope":
            rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=args.rotary_percent,
                                   rotary_base=args.rotary_base, use_cpu_initialization=True,
                                   cp_group=parallel_state.get_context_parallel_group())
            rotary = rope(s).to(device)
        inputs = LayerInputs(rotary, None)
        x = torch.randn(s, b, h, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(s, b, h, device=device, dtype=dtype)
        held = []

        def forward():
            held.append(run_layer(layer, x, inputs))

        def backward():
            held.pop().backward(grad)

        for _ in range(2):  # warm-up: kernels chosen, memory allocated
            forward()
            backward()
        forward_s = _median_seconds(forward, self.sync, warmup=0)  # holds REPEATS graphs, which backward frees
        backward_s = _median_seconds(backward, self.sync, warmup=0)
        numel = sum(p.numel() for p in optimizer.params)
        step_rate = numel / _median_seconds(lambda: optimizer.step(1.0, skip=False), self.sync, warmup=1, repeats=3)
        del layer, optimizer, held, x, grad

        def weight():
            return (torch.randn(self.vocab, h, device=device, dtype=dtype) * 0.02).requires_grad_()

        output = weight()
        # the output layer's optimizer (its hook sums the gradient into a main grad) gives the embeddings' step
        # rate; an untied word embedding only sums its gradient, which spares the probe its optimizer state
        optimizer = ResidentOptimizer([("output_layer.weight", output)], args)
        table = output
        if args.untie_embeddings_and_output_weights:
            table = weight()
            table.register_post_accumulate_grad_hook(
                ResidentOptimizer.accumulator(torch.zeros_like(table, dtype=args.main_grads_torch_dtype)))
        hidden = torch.randn(s * b, h, device=device, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, self.vocab, (s * b,), device=device)
        embedding_grad = torch.randn(s * b, h, device=device, dtype=dtype)

        def head():
            loss = F.cross_entropy((hidden @ output.t()).float(), labels)
            torch.autograd.backward([loss, F.embedding(labels, table)], [None, embedding_grad])

        head_s = _median_seconds(head, self.sync)
        embedding_rate = output.numel() / _median_seconds(lambda: optimizer.step(1.0, skip=False), self.sync,
                                                          warmup=1, repeats=3)
        del output, table, optimizer, hidden, labels, embedding_grad
        self._release()
        return [forward_s, backward_s, head_s, step_rate, embedding_rate]
