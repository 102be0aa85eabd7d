"""Where each transformer layer lives, decided before anything large is allocated.

The planner counts the bytes every placement needs, compares them with the free GPU memory and the
available host memory, and picks
- R resident layers, kept on the GPU with the GPU optimizer, as in megatron-lm: the last R with
  several micro-batches per step (the step runs layer-major through the streamed layers, then
  micro-batch by micro-batch through the resident ones), the first R with one (the streamed layers'
  CPU steps then overlap the resident layers' work; methods/streaming.py streamed_span);
- W window slots through which the other S = L - R layers stream from host memory;
- whether the streamed layers keep their activations from forward to backward or only their
  inputs (one boundary per layer and micro-batch) and run again in backward, and, where no
  placement holds those boundaries on the GPU, that they wait in pinned host memory;
- the CPU optimizer's threads: all the cores it may have only where its steps bound the iteration.
It keeps as many layers resident as fit, so a model that fits on the GPU runs like megatron-lm and a
larger one streams only what does not fit. A model that fits nowhere is refused with the numbers.

Byte counts (P parameters per layer as the flags shape it, layer_shape.py; c = bytes of the compute
dtype, k micro-batches per step, a = c s b h, one micro-batch's hidden state; A = what one layer keeps
of one micro-batch without recompute, 17 a for a GPT-2 layer, more for a SwiGLU one):
- resident parameter: c weights + 4 fp32 master (not in fp32) + 8 Adam + 4 main grad (the compute-dtype
  gradient is added into the main grad and freed as it arrives; measured on an H100: 18.3 B/param);
- streamed layer on the host: 16 P (fp32 master + Adam, pinned weights and gradient; 18 in fp16, whose
  gradient crosses in fp32) whatever k is,
  held by one data-parallel rank of N (each holds ceil(S / N) layers); on the GPU a slot of c P per
  window slot, the fp32 sum of the layer in backward (4 P) and at most 2W layers' gradients in flight
  to the host (c P each);
- activations: streamed layers keep (S + 3) k a (their inputs, and the gradients at two boundaries)
  plus one layer's activations of one micro-batch while it runs again (with the inputs in pinned
  host memory, S k a there and 5 k a on the GPU: two layers' inputs, two gradients, the last
  output), or, without recompute,
  S k A (Korthikanti et al. 2022, flash attention); resident layers run one micro-batch at a
  time: a per layer with full recompute, else A; plus the fp32 logits and their gradient,
  3 x 4 s b V.
"""

from dataclasses import dataclass

from ..arguments import ZERO_METHODS
from ..layer_shape import LayerShape

GiB = 1024 ** 3
HOST_RESERVE = 6 * GiB       # interpreter, CUDA and torch libraries, data, allocator slack: peak RSS less
                             # the store was 5.0 GiB (H100, 236 layers) and 5.3 GiB (H200, 305 layers);
                             # with 4 the pre-flight admitted 306 layers on the H200 and the kernel killed it
GPU_RESERVE = 5 * GiB // 2   # beyond the counted bytes: cuBLAS workspaces, NCCL, allocator slack. The
                             # count matches the measured peak to 0.1 GiB (H100 and H200, with and without
                             # recompute); the H100's megatron-lm OOM at 89 layers had 1.7 GiB outside
                             # torch's allocator (CUDA context included, which the free figure already
                             # excludes) and 0.3 GiB cached in it. A fixed reserve, not a fraction of the
                             # free memory: 5% of an H200 would stream 8 layers that fit
ACHIEVED_FLOPS = 450e12      # bf16 on an H200: megatron-lm's 32 layers (h2048, micro-batch 4) ran 447 model
                             # TFLOP/s, with full recompute at micro-batch 16 483 counting the recompute
CPU_ADAM_RATE = 4e9          # params/s of fused AdamW on 16 cores (gpu-machine.md)
PCIE_RATE = 45e9             # bytes/s each way with both directions busy (gpu-machine.md)


@dataclass
class ModelCosts:
    layers: int
    layer_params: int
    other_params: int
    compute_bytes: int
    hidden_state: int  # bytes of one micro-batch's hidden state (c s b h)
    act_fixed: int
    tokens: int  # per micro-batch
    recompute: bool  # the user's --recompute-granularity full
    microbatches: int = 1
    seq_length: int = 1024
    hidden: int = 2048
    vocab: int = 50304
    data_parallel: int = 1  # ranks: each holds 1/N of the streamed layers and reduces gradients in fp32
    fp16: bool = False
    layer_activations: int = 0  # A: bytes one layer keeps of one micro-batch without recompute (0: 17 a)
    layer_forward_flops: int = 0  # one layer's forward over one micro-batch (0: a GPT-2 layer's)

    def __post_init__(self):
        if not self.layer_activations:
            self.layer_activations = 17 * self.hidden_state
        if not self.layer_forward_flops:
            self.layer_forward_flops = 2 * self.tokens * self.layer_params + 4 * self.tokens * self.seq_length * self.hidden

    @classmethod
    def of(cls, args, vocab_size: int) -> "ModelCosts":
        h, s, b = args.hidden_size, args.seq_length, args.micro_batch_size
        c = 4 if args.params_dtype_name == "fp32" else 2
        tp = getattr(args, "tensor_model_parallel_size", 1)  # each rank holds its shards
        shape = LayerShape.of(args)
        # Per rank: the word embedding and an untied output layer are split over the vocabulary; the
        # position table (learned_absolute only) and the final norm are whole on every rank.
        other = (vocab_size * h * (2 if args.untie_embeddings_and_output_weights else 1)) // tp
        other += h * (2 if shape.norm_bias else 1)
        if args.position_embedding_type == "learned_absolute":
            other += args.max_position_embeddings * h
        return cls(args.num_layers, shape.params(), other, c, c * s * b * h // tp, 3 * 4 * s * b * vocab_size // tp,
                   s * b, args.recompute_granularity == "full", args.num_microbatches, s, h // tp,
                   vocab_size // tp, getattr(args, "data_parallel_size", 1), bool(args.fp16),
                   shape.activation_bytes(c, s * b), shape.forward_flops(s * b, s) // tp)

    @property
    def act_per_layer(self) -> int:
        """Activations one resident layer keeps for one micro-batch."""
        return self.hidden_state if self.recompute else self.layer_activations

    @property
    def resident_bytes_per_param(self) -> int:
        c = self.compute_bytes
        return c + (0 if c == 4 else 4) + 8 + 4

    @property
    def gradient_bytes(self) -> int:
        """A streamed gradient crosses PCIe in bf16, or in fp32 with fp16 (executor/host_store.py)."""
        return 2 if self.compute_bytes == 2 and not self.fp16 else 4

    @property
    def host_bytes_per_param(self) -> int:
        return 12 + (0 if self.compute_bytes == 4 else self.compute_bytes) + self.gradient_bytes

    def streamed_activations(self, streamed: int, recompute: bool, on_host: bool = False) -> int:
        """GPU bytes of the streamed layers' activations (on_host: the boundaries wait on the host)."""
        if not streamed:
            return 0
        k, a = self.microbatches, self.hidden_state
        if recompute:
            return ((5 if on_host else streamed + 3) * k * a) + self.layer_activations
        return streamed * k * self.layer_activations + 2 * k * a


@dataclass
class Plan:
    resident: int
    window: int
    threads: int  # of the CPU optimizer
    gpu_bytes: int
    host_bytes: int
    predicted_s: float
    gpu_free: int | None = None  # bytes the plan was made for; None without a GPU
    streamed_recompute: bool = True  # streamed layers keep only their inputs and run again in backward
    predicted_deferred_s: float = 0.0  # the iteration when clipping fires and the CPU steps wait for the norm
    boundary_bytes: int = 0
    boundaries_on_host: bool = False  # the boundaries wait in pinned host memory (boundary_bytes there)

    def describe(self, costs: ModelCosts) -> str:
        streamed = costs.layers - self.resident
        keeps = ("boundaries" if self.streamed_recompute else "activations") if streamed else "none"
        if self.boundaries_on_host:
            keeps = "boundaries in pinned host memory"
        return (f"plan | resident layers: {self.resident} | streamed layers: {streamed} | "
                f"window: {self.window} | micro batches per step: {costs.microbatches} | "
                f"streamed layers keep: {keeps} ({self.boundary_bytes / GiB:.2f} GiB) | "
                f"CPU optimizer threads: {self.threads} | GPU: {self.gpu_bytes / GiB:.1f} GiB"
                f"{'' if self.gpu_free is None else f' of {self.gpu_free / GiB:.1f} free'} | host: {self.host_bytes / GiB:.1f} GiB | "
                f"predicted iteration (ms): {self.predicted_s * 1e3:.0f} | "
                f"predicted iteration when clipping defers the CPU steps (ms): {self.predicted_deferred_s * 1e3:.0f} |")


def gpu_bytes(costs: ModelCosts, resident: int, window: int, recompute: bool = True, on_host: bool = False) -> int:
    streamed = costs.layers - resident
    c, P = costs.compute_bytes, costs.layer_params
    # W slots of weights, the fp32 sum of the layer in backward, up to 2W gradients on their way to the
    # host (the executor waits for the copy of layer i + 2W before it lets go of layer i's)
    slots = (window * (c + 2 * costs.gradient_bytes) + 4) * P if streamed else 0
    return (costs.other_params * costs.resident_bytes_per_param
            + resident * P * costs.resident_bytes_per_param
            + slots + resident * costs.act_per_layer + costs.streamed_activations(streamed, recompute, on_host)
            + costs.act_fixed + GPU_RESERVE)


def boundary_host_bytes(costs: ModelCosts, resident: int) -> int:
    """Pinned host bytes of the streamed layers' inputs when they wait on the host."""
    return (costs.layers - resident) * costs.microbatches * costs.hidden_state


def host_bytes(costs: ModelCosts, resident: int, on_host: bool = False) -> int:
    """Peak host bytes: the larger of the fp32 weights on the host once the model is built and the
    store of the streamed layers. Each layer is placed as soon as it is initialised (resident ones go
    to the GPU, another rank's are dropped), so the build leaves the embeddings and this rank's
    streamed layers in fp32 on the host; each streamed layer's fp32 weights are freed as its store
    is built."""
    owned = -(-(costs.layers - resident) // costs.data_parallel)  # this rank's share of the streamed layers
    built = 4 * ((owned + 1) * costs.layer_params + costs.other_params)  # + 1: the layer being built
    store = owned * costs.layer_params * costs.host_bytes_per_param + 4 * costs.layer_params
    return max(built, store + (boundary_host_bytes(costs, resident) if on_host else 0)) + HOST_RESERVE


def layer_forward_seconds(costs: ModelCosts) -> float:
    """One layer's forward over one micro-batch: its matmuls and attention (Megatron's FLOPs count)."""
    return costs.layer_forward_flops / ACHIEVED_FLOPS


def compute_seconds(costs: ModelCosts, resident: int, streamed_recompute: bool = True) -> float:
    """GPU time of one step: forward + backward (2x forward) of every layer and micro-batch, a third
    forward where it runs again, and the output layer."""
    streamed = costs.layers - resident
    k, f = costs.microbatches, layer_forward_seconds(costs)
    resident_time = resident * k * f * (4 if costs.recompute else 3)
    streamed_time = streamed * k * f * (4 if streamed_recompute else 3)
    head = k * 3 * 2 * costs.tokens * costs.hidden * costs.vocab / ACHIEVED_FLOPS
    return resident_time + streamed_time + head


def cpu_step_seconds(costs: ModelCosts, resident: int) -> float:
    return -(-(costs.layers - resident) // costs.data_parallel) * costs.layer_params / CPU_ADAM_RATE


def link_seconds(costs: ModelCosts, resident: int, window: int) -> float:
    """Host-to-device bytes of a step: each streamed layer loaded for forward and again for backward,
    except the W still in their slots when backward starts (the gradients go the other way)."""
    streamed = costs.layers - resident
    loads = 0 if not streamed else (streamed if window >= streamed else 2 * streamed - window)
    return loads * costs.layer_params * costs.compute_bytes / PCIE_RATE


def overlapped_forward_seconds(costs: ModelCosts, resident: int) -> float:
    """The forward work the next step does before it needs each streamed layer's new weights in turn
    (what steps deferred to the end of backward overlap): with several micro-batches the streamed
    layers come first; with one, the resident layers run before them."""
    layers = costs.layers if costs.microbatches == 1 else costs.layers - resident
    return layers * costs.microbatches * layer_forward_seconds(costs)


def predicted_seconds(costs: ModelCosts, resident: int, window: int, streamed_recompute: bool = True,
                      deferred: bool = False, on_host: bool = False) -> float:
    """A model, not a measurement. The CPU steps and copies overlap the GPU work: the step takes the
    largest of compute, link and CPU time, plus what cannot overlap (layer 0 steps last and is loaded
    first). When clipping fires, no step starts before the global norm is known: the CPU work then
    overlaps only the next forward pass through the streamed layers."""
    compute = compute_seconds(costs, resident, streamed_recompute)
    streamed = costs.layers - resident
    if not streamed:
        return compute
    cpu = cpu_step_seconds(costs, resident)
    one_layer = costs.layer_params * (1 / CPU_ADAM_RATE + costs.compute_bytes / PCIE_RATE)
    link = link_seconds(costs, resident, window)
    if on_host:  # the boundaries cross the link once each way too
        link += boundary_host_bytes(costs, resident) / PCIE_RATE
    if deferred:
        forward = overlapped_forward_seconds(costs, resident)
        return max(compute + max(0.0, cpu - forward), link) + one_layer
    return max(compute, link, cpu) + one_layer


def optimizer_threads(costs: ModelCosts, resident: int, cores: int) -> int:
    """Threads for the CPU optimizer, out of `cores` (this rank's share less the main thread's).

    All of them only where the streamed layers' CPU steps take half the step's compute or more: 64
    layers all streamed on a 16-core H100 host ran 15% faster with 15 threads than with 8. Otherwise
    half: the main thread launches the GPU work, and beside 15 optimizer threads it slows down. With
    several small micro-batches it launches many short kernels, and the slowdown outweighs faster
    CPU steps even when clipping defers them all to the end of backward: 32 layers all streamed,
    global batch 64, micro-batch 4 on an H200 ran 2286 ms per iteration with 8 threads and 2936 ms
    with 15, in one call (tools/bench_real_batch.py case 5). At 88 layers with 5 streamed the steps
    hid behind the GPU with 8 threads as well as with 15.
    """
    cpu = cpu_step_seconds(costs, resident)
    if cpu >= compute_seconds(costs, resident) / 2:
        return cores
    return max(1, (cores + 1) // 2)


class DoesNotFit(ValueError):
    pass


def _window(costs, resident, window):
    streamed = costs.layers - resident
    return min(window if window is not None else 4, streamed) if streamed else 0


def make_plan(costs: ModelCosts, gpu_free, host_free: int, resident=None, window=None, threads=None,
              cores: int = 1) -> Plan:
    """The plan with the most resident layers that fits; `resident`/`window`/`threads` fix a choice.

    gpu_free None means there is no GPU: device and host share the host memory. cores: the most
    threads the CPU optimizer may have (see optimizer_threads).
    """
    shared = gpu_free is None
    gpu_budget = host_free if shared else gpu_free
    L = costs.layers
    candidates = [min(resident, L)] if resident is not None else range(L, -1, -1)
    # Streamed layers keep their activations only where the user did not ask for recompute and they
    # fit; running a layer again costs a third more of its compute, not another copy. Their inputs
    # go to pinned host memory only where no placement holds them on the GPU (a large global batch):
    # then they cross the link twice per step.
    keep_options = ((True, False),) if costs.recompute else ((False, False), (True, False))
    for options in (keep_options, ((True, True),)):
        for r in candidates:
            w = _window(costs, r, window)
            for recompute, on_host in options:
                if on_host and (shared or r == L):
                    continue  # without a GPU there is no other memory to go to
                g, h = gpu_bytes(costs, r, w, recompute, on_host), host_bytes(costs, r, on_host)
                if (g + h <= host_free) if shared else (g <= gpu_budget and h <= host_free):
                    kept = boundary_host_bytes(costs, r) if on_host else costs.streamed_activations(L - r, recompute)
                    return Plan(r, w, threads or optimizer_threads(costs, r, cores), g, h,
                                predicted_seconds(costs, r, w, recompute, on_host=on_host), gpu_free, recompute,
                                predicted_seconds(costs, r, w, recompute, deferred=True, on_host=on_host),
                                kept, on_host)
    r = min(resident, L) if resident is not None else 0
    w = _window(costs, r, window)
    g, h = gpu_bytes(costs, r, w), host_bytes(costs, r)
    if shared:
        raise DoesNotFit(
            f"the model does not fit: it needs {(g + h) / GiB:.1f} GiB of host memory and this machine "
            f"has {host_free / GiB:.1f} GiB available (no GPU). Use fewer layers (--num-layers) or a "
            f"smaller hidden size.")
    raise DoesNotFit(
        f"the model does not fit: it needs {h / GiB:.1f} GiB host + {g / GiB:.1f} GiB GPU "
        f"({r} resident layers, window {w}), and this machine has {host_free / GiB:.1f} GiB host and "
        f"{gpu_budget / GiB:.1f} GiB GPU available. Use fewer layers (--num-layers), "
        f"{'full activation recompute (--recompute-granularity full), ' if not costs.recompute else ''}"
        f"a smaller micro-batch or global batch (the streamed layers keep {costs.microbatches} micro-batches' "
        f"inputs: {costs.streamed_activations(L - r, True) / GiB:.1f} GiB), or a machine with more memory.")


def megatron_check(costs: ModelCosts, gpu_free, host_free: int) -> None:
    """megatron-lm keeps everything on the GPU: refuse before allocating what cannot fit.

    Unlike stronghold's plan, which has other placements to choose from and keeps a margin, this
    refuses only a model whose counted bytes exceed the free GPU memory: one at the edge is tried,
    as Megatron-LM would, and an out-of-memory error is reported (pretrain_gpt.main).
    """
    need = gpu_bytes(costs, costs.layers, 0) - GPU_RESERVE
    if gpu_free is None:
        make_plan(costs, None, host_free, resident=costs.layers)
        return
    if need > gpu_free:
        raise DoesNotFit(
            f"megatron-lm needs {need / GiB:.1f} GiB GPU for {costs.layers} layers and "
            f"{gpu_free / GiB:.1f} GiB are free: use --offload-method stronghold, "
            f"fewer layers or full activation recompute.")


# What DeepSpeed surely keeps per parameter in the ZeRO baselines (one rank): on the host the fp32
# master, both Adam moments and the fp32 gradient partition of its CPU optimizer (16 B), plus the
# compute-dtype parameters for ZeRO-Infinity, which offloads them too; on the GPU the compute-dtype
# parameters for ZeRO-Offload. Lower bounds: DeepSpeed's buffers come on top.
def zero_bytes(costs: ModelCosts, method: str) -> tuple:
    """(host bytes, GPU bytes) that a ZeRO baseline certainly needs."""
    params = costs.layers * costs.layer_params + costs.other_params
    offloads_params = method == "zero-infinity"
    host = params * (16 + (costs.compute_bytes if offloads_params else 0))
    gpu = (0 if offloads_params else params * costs.compute_bytes) + costs.layers * costs.act_per_layer + costs.act_fixed
    return host, gpu


def zero_check(costs: ModelCosts, gpu_free, host_free: int, method: str) -> None:
    """Refuse, before DeepSpeed allocates anything, a model whose certain bytes already exceed what
    is available (the rest is left to DeepSpeed, as megatron-lm's edge is left to the allocator)."""
    host, gpu = zero_bytes(costs, method)
    params = costs.layers * costs.layer_params + costs.other_params
    if gpu_free is None:  # no GPU: one memory
        if host + gpu > host_free:
            raise DoesNotFit(
                f"the model does not fit: {method} needs at least {(host + gpu) / GiB:.1f} GiB of host memory "
                f"for {params / 1e9:.2f} B parameters and this machine has {host_free / GiB:.1f} GiB available "
                f"(no GPU). Use fewer layers (--num-layers) or a smaller hidden size.")
        return
    if host > host_free or gpu > gpu_free:
        raise DoesNotFit(
            f"the model does not fit: {method} needs at least {host / GiB:.1f} GiB host + {gpu / GiB:.1f} GiB GPU "
            f"for {params / 1e9:.2f} B parameters (DeepSpeed's CPU optimizer alone keeps 16 B per parameter "
            f"on the host), and this machine has {host_free / GiB:.1f} GiB host and {gpu_free / GiB:.1f} GiB GPU "
            f"available. Use fewer layers (--num-layers) or --offload-method stronghold.")


def available_memory(device) -> tuple:
    """(free GPU bytes, available host bytes). Without CUDA both are host memory."""
    import psutil
    import torch

    import os

    # Ranks on one node share its host memory (torchrun sets LOCAL_WORLD_SIZE).
    host = psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, host
    return None, host


def layers_that_fit(costs: ModelCosts, gpu_free: int, host_free: int, method: str = "stronghold") -> int:
    """Most layers the method's pre-flight check admits (for the largest-model search): stronghold
    with any plan, l2l with every layer streamed through one slot, megatron-lm all on the GPU, the
    ZeRO baselines their certain bytes."""
    lo, hi = 0, 1
    while _fits(costs, hi, gpu_free, host_free, method):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(costs, mid, gpu_free, host_free, method) else (lo, mid)
    return lo


def check(costs: ModelCosts, gpu_free, host_free: int, method: str, resident=None, window=None, threads=None,
          cores: int = 1):
    """The pre-flight check of `method` (raises DoesNotFit): stronghold's and l2l's plan (l2l streams
    every layer through one slot), None for the methods without one."""
    if method == "megatron-lm":
        megatron_check(costs, gpu_free, host_free)
        return None
    if method in ZERO_METHODS:
        zero_check(costs, gpu_free, host_free, method)
        return None
    if method == "l2l":
        resident, window = 0, 1
    return make_plan(costs, gpu_free, host_free, resident, window, threads, cores)


def _fits(costs, layers, gpu_free, host_free, method) -> bool:
    try:
        check(ModelCosts(**{**costs.__dict__, "layers": layers}), gpu_free, host_free, method)
        return True
    except DoesNotFit:
        return False


__all__ = ["ModelCosts", "Plan", "DoesNotFit", "make_plan", "check", "megatron_check", "zero_check",
           "available_memory", "layers_that_fit"]
