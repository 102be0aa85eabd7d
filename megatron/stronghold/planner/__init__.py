"""Where each transformer layer lives, decided before anything large is allocated.

The planner counts the bytes every placement needs, compares them with the free GPU memory and the
available host memory, and picks
- R resident layers (the first R: their CPU steps would otherwise finish last and hold up the
  next forward pass), kept on the GPU with the GPU optimizer, as in megatron-lm;
- W window slots through which the other S = L - R layers stream from host memory;
- the CPU optimizer's threads: all the cores it may have only where its steps bound the iteration.
It keeps as many layers resident as fit, so a model that fits on the GPU runs like megatron-lm and a
larger one streams only what does not fit. A model that fits nowhere is refused with the numbers.

Byte counts (P parameters per layer, c = bytes of the compute dtype):
- resident parameter: c weights + 4 fp32 master (not in fp32) + 8 Adam + 4 main grad (the compute-dtype
  gradient is added into the main grad and freed as it arrives; measured on an H100: 18.3 B/param);
- streamed layer on the host: 16 P (fp32 master + Adam, pinned weights and gradient), +4 P with
  gradient accumulation, held by one data-parallel rank of N (each holds ceil(S / N) layers); on
  the GPU a slot of c P, and at most W layers' gradients in flight (+4 P each with data
  parallelism: the fp32 buffer they are summed in);
- activations kept from forward to backward per layer: the layer input (c s b h) with full
  recompute, else about 17 c s b h with flash attention (Korthikanti et al. 2022, without the
  attention matrix); plus the fp32 logits and their gradient, 3 x 4 s b V.
"""

from dataclasses import dataclass

from ..arguments import ZERO_METHODS

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
ACHIEVED_TFLOPS = 350e12     # bf16 layer forward+backward measured on H200 (see the bench); a model
CPU_ADAM_RATE = 4e9          # params/s of fused AdamW on 16 cores (gpu-machine.md)
PCIE_RATE = 45e9             # bytes/s each way with both directions busy (gpu-machine.md)


@dataclass
class ModelCosts:
    layers: int
    layer_params: int
    other_params: int
    compute_bytes: int
    act_per_layer: int
    act_fixed: int
    accumulate: bool
    tokens: int  # per micro-batch
    recompute: bool
    data_parallel: int = 1  # ranks: each holds 1/N of the streamed layers and reduces gradients in fp32

    @classmethod
    def of(cls, args, vocab_size: int) -> "ModelCosts":
        h, ffn, s, b = args.hidden_size, args.ffn_hidden_size, args.seq_length, args.micro_batch_size
        c = 4 if args.params_dtype_name == "fp32" else 2
        layer = 4 * h * h + 2 * h * ffn + 9 * h + ffn
        other = vocab_size * h + args.max_position_embeddings * h + 2 * h
        if args.untie_embeddings_and_output_weights:
            other += vocab_size * h
        tp = getattr(args, "tensor_model_parallel_size", 1)  # each rank holds its shards
        layer, other = layer // tp, other // tp
        recompute = args.recompute_granularity == "full"
        act = c * s * b * h * (1 if recompute else 17)
        return cls(args.num_layers, layer, other, c, act, 3 * 4 * s * b * vocab_size,
                   args.num_microbatches > 1, s * b, recompute, getattr(args, "data_parallel_size", 1))

    @property
    def resident_bytes_per_param(self) -> int:
        c = self.compute_bytes
        return c + (0 if c == 4 else 4) + 8 + 4

    @property
    def host_bytes_per_param(self) -> int:
        return 16 + (4 if self.accumulate else 0)


@dataclass
class Plan:
    resident: int
    window: int
    threads: int  # of the CPU optimizer
    gpu_bytes: int
    host_bytes: int
    predicted_s: float
    gpu_free: int | None = None  # bytes the plan was made for; None without a GPU

    def describe(self, costs: ModelCosts) -> str:
        return (f"plan | resident layers: {self.resident} | streamed layers: {costs.layers - self.resident} | "
                f"window: {self.window} | CPU optimizer threads: {self.threads} | GPU: {self.gpu_bytes / GiB:.1f} GiB"
                f"{'' if self.gpu_free is None else f' of {self.gpu_free / GiB:.1f} free'} | host: {self.host_bytes / GiB:.1f} GiB | "
                f"predicted iteration (ms): {self.predicted_s * 1e3:.0f} |")


def gpu_bytes(costs: ModelCosts, resident: int, window: int) -> int:
    streamed = costs.layers - resident
    # W slots of weights, W layers' gradients in flight (with data parallelism an fp32 copy for the
    # average and the average in the compute dtype)
    grad_bytes = costs.compute_bytes + (4 if costs.data_parallel > 1 else 0)
    slots = window * costs.layer_params * (costs.compute_bytes + grad_bytes) if streamed else 0
    return (costs.other_params * costs.resident_bytes_per_param
            + resident * costs.layer_params * costs.resident_bytes_per_param
            + slots + costs.layers * costs.act_per_layer + costs.act_fixed + GPU_RESERVE)


def host_bytes(costs: ModelCosts, resident: int) -> int:
    """Peak host bytes: the larger of the fp32 weights on the host once the model is built and the
    store of the streamed layers. Each layer is placed as soon as it is initialised (resident ones go
    to the GPU, another rank's are dropped), so the build leaves the embeddings and this rank's
    streamed layers in fp32 on the host; each streamed layer's fp32 weights are freed as its store
    is built."""
    owned = -(-(costs.layers - resident) // costs.data_parallel)  # this rank's share of the streamed layers
    built = 4 * ((owned + 1) * costs.layer_params + costs.other_params)  # + 1: the layer being built
    store = owned * costs.layer_params * costs.host_bytes_per_param + 4 * costs.layer_params
    return max(built, store) + HOST_RESERVE


def compute_seconds(costs: ModelCosts) -> float:
    flops = 6 * costs.layer_params * costs.tokens * (4 / 3 if costs.recompute else 1)
    return costs.layers * flops / ACHIEVED_TFLOPS


def cpu_step_seconds(costs: ModelCosts, resident: int) -> float:
    return (costs.layers - resident) * costs.layer_params / CPU_ADAM_RATE


def predicted_seconds(costs: ModelCosts, resident: int, window: int) -> float:
    """A model, not a measurement: the largest of compute, PCIe and CPU optimizer time."""
    compute = compute_seconds(costs)
    streamed = costs.layers - resident
    loads = 0 if not streamed else (streamed if window >= streamed else 2 * streamed - window)
    pcie = (loads + streamed) * costs.layer_params * costs.compute_bytes / PCIE_RATE
    return max(compute, pcie, cpu_step_seconds(costs, resident))


def optimizer_threads(costs: ModelCosts, resident: int, cores: int) -> int:
    """Threads for the CPU optimizer, out of `cores` (this rank's share less the main thread's).

    Where the streamed layers' CPU steps bound the iteration, all of them: 64 layers all streamed
    on a 16-core H100 host ran 15% faster with 15 threads than with 8. Where the steps are a small
    part of the iteration, half: the main thread launches the GPU work, and next to 15 optimizer
    threads its host ops ran 1.7x slower (88 layers, 5 streamed, profiler trace) while the steps
    hid behind the GPU with 8 threads as well as with 15 (CPU work 74 vs 69 ms per iteration).
    """
    if cpu_step_seconds(costs, resident) >= compute_seconds(costs) / 2:
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
    for r in candidates:
        w = _window(costs, r, window)
        g, h = gpu_bytes(costs, r, w), host_bytes(costs, r)
        if (g + h <= host_free) if shared else (g <= gpu_budget and h <= host_free):
            return Plan(r, w, threads or optimizer_threads(costs, r, cores), g, h, predicted_seconds(costs, r, w),
                        gpu_free)
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
        f"a smaller micro-batch, or a machine with more memory.")


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
