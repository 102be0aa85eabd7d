"""What a placement costs: the bytes it needs on the GPU and the host, and the seconds of its parts.

Byte counts (P parameters per layer as the flags shape it, layer_shape.py; c = bytes of the compute
dtype, k micro-batches per step, a = c s b h, one micro-batch's hidden state; A = what one layer keeps
of one micro-batch without recompute, 17 a for a GPT-2 layer, more for a SwiGLU one):
- resident parameter: c weights + the fp32 master (none in fp32; in bf16 by default a 2-byte remainder,
  else 4) + 8 Adam (4 with bf16 moments) + 4 main grad (the compute-dtype gradient is added into the main
  grad and freed as it arrives): 16 in bf16 (18 without remainders), 12 with bf16 moments;
- streamed layer on the host (executor/host_store.py): pinned weights and gradient, the fp32 master (or
  in bf16 its 2-byte remainder) and the Adam moments, whatever k is: 14 P in bf16 (16 without
  remainders), 16 P in fp32, 18 P in fp16 (whose gradient crosses in fp32); 4 P less with bf16 moments;
  held by one data-parallel rank of N (each holds ceil(S / N) layers); on the GPU a slot of c P per
  window slot, the fp32 sum of the layer in backward (4 P) and at most 2W layers' gradients in flight
  to the host (c P each);
- activations: streamed layers keep (S + 3) k a (their inputs, and the gradients at two boundaries)
  plus one layer's activations of one micro-batch while it runs again (with the inputs in pinned
  host memory, S k a there and 5 k a on the GPU: two layers' inputs, two gradients, the last
  output), or, without recompute,
  S k A (Korthikanti et al. 2022, flash attention); resident layers run one micro-batch at a
  time: a per layer with full recompute, else A; plus the fp32 logits and their gradient,
  3 x 4 s b V, and the output layer's logits in the compute dtype, c s b V (megatron-lm, Qwen2.5-14B's
  vocabulary of 152064 on an H100: 1.25 GiB above the count without them).

Seconds: the GPU's compute, the host-to-device copies and the CPU optimizer's steps of one
iteration, each at the machine's measured rate (machine.py) or, where none was measured, the
constant below; plan.py combines them into the predicted iteration.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from ..layer_shape import LayerShape
from ..optim import STEP_SLICE
from ..precision import gradient_dtype
from .machine import ASSUMED, Rates

GiB = 1024 ** 3
HOST_RESERVE = 6 * GiB       # host bytes a training process holds beyond the counted ones: the interpreter,
                             # the CUDA and torch libraries, the data, allocator slack
GPU_RESERVE = 5 * GiB // 2   # GPU bytes beyond the counted ones: cuBLAS workspaces, NCCL, allocator slack
                             # (the CUDA context is already outside the free figure). A fixed amount, not a
                             # fraction of the free memory: none of these grows with the card, and a fraction
                             # of a large card's memory would stream layers that fit
# Without a GPU both reserves above are too much: no CUDA libraries, workspaces or NCCL; a CPU run's
# process holds about 1 GiB beyond the counted bytes (0.43 GiB measured for a tiny model).
CPU_ONLY_SAVING = HOST_RESERVE + GPU_RESERVE - 1 * GiB
# The resident optimizer rebuilds fp32 masters (from remainders) and widens bf16 moments a slice of at most
# STEP_SLICE elements at a time (optim.py); a slice holds STEP_BYTES per element at once: the master, two
# int32 temporaries of its join or split, both moments in fp32.
STEP_BYTES = 20
ACHIEVED_FLOPS = 450e12      # FLOP/s an H200 sustains on a layer's matrix products and attention in bf16
                             # (Megatron's FLOPs count, the recompute's included)
CPU_ADAM_RATE = 4e9          # parameters/s of the fused CPU AdamW (stronghold_ext) on a 16-core host, today's
                             # layout (fp32 master and moments: CPU_ADAM_BYTES moved per parameter); the
                             # step is bound by host memory, so other layouts scale by their bytes
CPU_ADAM_BYTES = 28
PCIE_RATE = 45e9             # bytes/s each way between host and GPU over the PCIe link of an H100 or H200
                             # host, with both directions busy


@dataclass
class ModelCosts:
    """One rank's share of the model in the numbers the counts need; ModelCosts.of builds it from
    the flags."""
    layers: int
    layer_params: int
    other_params: int
    compute_bytes: int
    hidden_state: int  # bytes of one micro-batch's hidden state (c s b h)
    # The logits of one micro-batch: (3 * 4 + c) B each. The allocated peak holds about 6 (compute dtype and
    # fp32 in the cross entropy); the rest is room the allocator cannot reuse around these large transient
    # tensors. On an H100, Qwen2.5-14B's 48 layers planned with 6 B per logit (7 resident layers) ran out
    # of memory with 9.1 GiB reserved but unallocated; with 14 (5 resident) they trained at a 65.2 GiB peak
    # (results/h100/2026-12-07-qwen14b/).
    act_fixed: int
    tokens: int  # per micro-batch
    recompute: bool  # the user's --recompute-granularity full
    recompute_chosen: bool  # ... without --recompute-method: the plan picks how many resident layers recompute
    recompute_block: Optional[int]  # ... --recompute-method block: the first N (resident) layers recompute
    microbatches: int
    seq_length: int
    hidden: int  # the output layer's input width: whole on every rank
    vocab: int  # this rank's share of the output layer's columns
    data_parallel: int  # ranks: each holds 1/N of the streamed layers and reduces gradients in fp32
    fp16: bool
    remainders: bool  # a streamed bf16 master stored as its weight plus a 2-byte remainder
    moment_bytes: int  # bytes of both Adam moments per parameter: 8, 6 or 4
    main_grad_bytes: int  # a step's gradient summed over its micro-batches on the GPU: 4, or 2 in bf16
    steps_early: bool  # streamed layers may step before the global norm is known (executor/speculative.py)
    layer_activations: int  # A: bytes one layer keeps of one micro-batch without recompute
    layer_forward_flops: int  # one layer's forward over one micro-batch
    rates: Rates = ASSUMED  # the machine's, where measured (machine.py)

    @classmethod
    def of(cls, args, vocab_size: int) -> "ModelCosts":
        shape = LayerShape.of(args)
        h, s, b = shape.hidden, args.seq_length, args.micro_batch_size
        c = 4 if args.params_dtype_name == "fp32" else 2
        tp = shape.tensor_parallel  # each rank holds its shards
        # Per rank: the word embedding and an untied output layer are split over the vocabulary; the
        # position table (learned_absolute only) and the final norm are whole on every rank.
        other = (vocab_size * h * (2 if args.untie_embeddings_and_output_weights else 1)) // tp
        other += shape.norm_params
        if args.position_embedding_type == "learned_absolute":
            other += args.max_position_embeddings * h
        return cls(layers=args.num_layers, layer_params=shape.params(), other_params=other, compute_bytes=c,
                   hidden_state=c * s * b * h // tp, act_fixed=(3 * 4 + c) * s * b * vocab_size // tp, tokens=s * b,
                   recompute=args.recompute_granularity == "full",
                   recompute_chosen=args.recompute_granularity == "full" and args.recompute_method is None,
                   recompute_block=(args.recompute_num_layers if args.recompute_granularity == "full"
                                    and args.recompute_method == "block" else None),
                   microbatches=args.num_microbatches,
                   seq_length=s, hidden=h, vocab=vocab_size // tp,
                   data_parallel=args.data_parallel_size, fp16=bool(args.fp16),
                   remainders=bool(args.store_param_remainders),
                   moment_bytes=sum(d.itemsize for d in args.moment_dtypes),
                   main_grad_bytes=args.main_grads_torch_dtype.itemsize,
                   steps_early=args.may_step_early,
                   layer_activations=shape.activation_bytes(c, s * b),
                   layer_forward_flops=shape.forward_flops(s * b, s) // tp)

    @property
    def params(self) -> int:
        """This rank's parameters: every layer's and the others (embeddings, final norm)."""
        return self.layers * self.layer_params + self.other_params

    @property
    def resident_bytes_per_param(self) -> int:
        return self.compute_bytes + self.master_bytes + self.moment_bytes + self.main_grad_bytes

    @property
    def gradient_bytes(self) -> int:
        compute = torch.float16 if self.fp16 else torch.bfloat16 if self.compute_bytes == 2 else torch.float32
        return gradient_dtype(compute).itemsize

    @property
    def master_bytes(self) -> int:
        """Bytes of a master beside the compute-dtype weights (on the host for a streamed layer, on the
        GPU for a resident one): none in fp32 (they are the master), 2 for a bf16 one's remainder."""
        return 0 if self.compute_bytes == 4 else 2 if self.remainders else 4

    @property
    def host_bytes_per_param(self) -> int:
        return self.compute_bytes + self.master_bytes + self.moment_bytes + self.gradient_bytes

    @property
    def cpu_step_bytes(self) -> int:
        """Host memory bytes the fused CPU step reads and writes per parameter: gradient in, master (or
        weights and remainder) and moments read and written, compute-dtype weights out."""
        if self.compute_bytes != 4 and self.remainders:  # the master is the weights and the remainder
            return self.gradient_bytes + 2 * (2 + 2 + self.moment_bytes)
        weights_out = 0 if self.compute_bytes == 4 else self.compute_bytes
        return self.gradient_bytes + 2 * (4 + self.moment_bytes) + weights_out

    def resident_activations(self, resident: int, recomputed=None) -> int:
        """Activations the resident layers keep for one micro-batch; recomputed: how many of them run
        again in backward (None: as the flags say, recomputed_by_flags)."""
        if recomputed is None:
            recomputed = self.recomputed_by_flags(resident)
        return recomputed * self.hidden_state + (resident - recomputed) * self.layer_activations

    def recomputed_by_flags(self, resident: int) -> int:
        """How many of `resident` layers recompute as the flags say: the first N with --recompute-method
        block, all with --recompute-granularity full, else none."""
        if self.recompute_block is not None:
            return min(self.recompute_block, resident)
        return resident if self.recompute else 0

    def streamed_activations(self, streamed: int, recompute: bool, on_host: bool = False) -> int:
        """GPU bytes of the streamed layers' activations (on_host: the boundaries wait on the host)."""
        if not streamed:
            return 0
        k, a = self.microbatches, self.hidden_state
        if recompute:
            return ((5 if on_host else streamed + 3) * k * a) + self.layer_activations
        return streamed * k * self.layer_activations + 2 * k * a


def gpu_bytes(costs: ModelCosts, resident: int, window: int, recompute: bool = True, on_host: bool = False,
              resident_recompute=None) -> int:
    streamed = costs.layers - resident
    c, P = costs.compute_bytes, costs.layer_params
    # W slots of weights, the sum of the layer's gradient in backward (main grads), up to 2W gradients on their way to the
    # host (the executor waits for the copy of layer i + 2W before it lets go of layer i's)
    slots = (window * (c + 2 * costs.gradient_bytes) + costs.main_grad_bytes) * P if streamed else 0
    activations = (costs.resident_activations(resident, resident_recompute)
                   + costs.streamed_activations(streamed, recompute, on_host) + costs.act_fixed)
    # The resident step runs after backward, when the activations are gone: its slice uses their room.
    rebuilt = costs.master_bytes == 2 or costs.moment_bytes < 8 or costs.main_grad_bytes < 4
    slice_bytes = STEP_BYTES + (4 if costs.main_grad_bytes < 4 else 0)  # + the slice's gradient widened to fp32
    step = slice_bytes * min(STEP_SLICE, costs.other_params + resident * P) if rebuilt else 0
    return ((costs.other_params + resident * P) * costs.resident_bytes_per_param + slots
            + max(activations, step) + GPU_RESERVE)


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
    # + the executor's fp32 scratch of one layer (a gradient)
    scratch = 4 * costs.layer_params
    store = owned * costs.layer_params * costs.host_bytes_per_param + scratch
    return max(built, store + (boundary_host_bytes(costs, resident) if on_host else 0)) + HOST_RESERVE


# What DeepSpeed allocates per parameter in the ZeRO baselines (one rank), read from its sources (deepspeed
# 0.19.8, runtime/zero/) with our configs (methods/zero_configs.py: pinned buffers, fp32 gradient accumulation):
# - ZeRO-Offload (stage_1_and_2.py): on the host the fp32 master, both Adam moments and the fp32 gradient of its
#   CPU optimizer (16 B), a pinned compute-dtype copy of the parameters (param_buffer_of_bit16_for_cpu_offload),
#   and with gradient accumulation a compute-dtype buffer of the accumulated gradients (accumulated_grads_in_cpu,
#   allocated at the first backward: a 6.7 B model admitted at 16 B/param was killed for host memory at its
#   first iteration on a 125 GiB host); on the GPU the compute-dtype parameters and their gradients (2 c).
# - ZeRO-Infinity (stage3.py): on the host the fp32 master, moments and the optimizer's fp32 gradient (16 B),
#   the fp32 gradient partitions (grad_partitions_flat_buffer, 4 B) and the offloaded compute-dtype parameters.
# Measured beyond that (results/h100/2026-12-07-zerobytes/: bf16, one micro-batch, 0.81 B and 2.42 B parameters,
# peak host RSS and GPU memory): the host's peak grows by 28.1 B per parameter with ZeRO-Offload and by 30.3 with
# ZeRO-Infinity, 10 and 9 more (rounded up) than the sources' count (of the measured bytes, 10.0 per parameter are pinned;
# the rest of the excess includes the trainer's fp32 model, built on the host before DeepSpeed takes it). Those
# extras are counted as measured; the counts then sit 1 to 4 GiB above the measured peaks, leaving no other reserve.
# On the GPU ZeRO-Offload's peak grows by 6 B per parameter beyond the activations, 3 c where the sources
# explain 2 c: counted as 3 c.
ZERO_HOST_MEASURED_EXTRA = {"zero-offload": 10, "zero-infinity": 9}
ZERO_OFFLOAD_GPU_COPIES = 3


def zero_host_bytes_per_param(costs: ModelCosts, method: str) -> int:
    c = costs.compute_bytes
    if method == "zero-infinity":
        return 16 + 4 + c + ZERO_HOST_MEASURED_EXTRA[method]
    return 16 + c + (c if costs.microbatches > 1 else 0) + ZERO_HOST_MEASURED_EXTRA[method]


def zero_bytes(costs: ModelCosts, method: str) -> tuple:
    """(host bytes, GPU bytes) that a ZeRO baseline needs."""
    params = costs.params
    host = params * zero_host_bytes_per_param(costs, method)
    gpu = ((0 if method == "zero-infinity" else ZERO_OFFLOAD_GPU_COPIES * params * costs.compute_bytes)
           + costs.resident_activations(costs.layers) + costs.act_fixed)
    return host, gpu


# megatron-offload (megatron-core's DistributedDataParallel and distributed optimizer with its
# HybridDeviceOptimizer, precision-aware, from its sources at 0.16.1): on the GPU the bf16 weights and the
# fp32 gradient buffer (grad_reduce_in_fp32) of every parameter, and the fp32 master and both fp32 moments of
# the fraction 1 - F it steps there; on the host, for the fraction F, the fp32 master and moments, a pinned
# fp32 gradient and a pinned bf16 copy of the weights.
OFFLOAD_GPU_BYTES = 2 + 4
OFFLOAD_STATE_BYTES = 4 + 8
OFFLOAD_HOST_BYTES = OFFLOAD_STATE_BYTES + 4 + 2


def offload_bytes(costs: ModelCosts, fraction: float) -> tuple:
    """(host bytes, GPU bytes) of megatron-offload with `fraction` of the optimizer on the CPU."""
    params = costs.params
    gpu = (params * (OFFLOAD_GPU_BYTES + (1 - fraction) * OFFLOAD_STATE_BYTES)
           + costs.resident_activations(costs.layers) + costs.act_fixed + GPU_RESERVE)
    return int(params * fraction * OFFLOAD_HOST_BYTES + HOST_RESERVE), int(gpu)


def layer_forward_seconds(costs: ModelCosts) -> float:
    """One layer's forward over one micro-batch: measured, or its matmuls and attention (Megatron's
    FLOPs count) at ACHIEVED_FLOPS."""
    if costs.rates.layer_forward is not None:
        return costs.rates.layer_forward
    return costs.layer_forward_flops / ACHIEVED_FLOPS


def layer_backward_seconds(costs: ModelCosts) -> float:
    if costs.rates.layer_backward is not None:
        return costs.rates.layer_backward
    return 2 * layer_forward_seconds(costs)


def compute_seconds(costs: ModelCosts, resident: int, streamed_recompute: bool = True, resident_recompute=None) -> float:
    """GPU time of one step: forward and backward of every layer and micro-batch, a second forward
    where it runs again (resident_recompute of the resident layers: None, all with recompute), the
    output layer with its loss and the embedding, and the GPU optimizer's step over the resident
    parameters (where measured: the constants leave it out)."""
    streamed = costs.layers - resident
    k, f, b = costs.microbatches, layer_forward_seconds(costs), layer_backward_seconds(costs)
    if resident_recompute is None:
        resident_recompute = costs.recomputed_by_flags(resident)
    resident_time = k * (resident * (f + b) + resident_recompute * f)
    streamed_time = streamed * k * (f * (2 if streamed_recompute else 1) + b)
    if costs.rates.head is not None:
        head = k * costs.rates.head
    else:
        head = k * 3 * 2 * costs.tokens * costs.hidden * costs.vocab / ACHIEVED_FLOPS
    return resident_time + streamed_time + head + resident_step_seconds(costs, resident)


def resident_step_seconds(costs: ModelCosts, resident: int) -> float:
    """The GPU optimizer's step over the parameters that live on the GPU, after every backward: the
    embeddings' and the resident layers', each at its measured rate."""
    if costs.rates.resident_step is None:
        return 0.0
    return costs.other_params / costs.rates.embedding_step + resident * costs.layer_params / costs.rates.resident_step


def cpu_adam_rate(costs: ModelCosts, threads=None) -> float:
    """Parameters/s of the CPU step in this run's host-store layout: measured at `threads` (None: the
    most measured), or CPU_ADAM_RATE scaled by the bytes the layout moves."""
    measured = costs.rates.adam_rate(threads)
    return measured if measured is not None else CPU_ADAM_RATE * CPU_ADAM_BYTES / costs.cpu_step_bytes


def cpu_step_seconds(costs: ModelCosts, resident: int, threads=None) -> float:
    owned = -(-(costs.layers - resident) // costs.data_parallel)
    return owned * costs.layer_params / cpu_adam_rate(costs, threads)


def host_to_device_rate(costs: ModelCosts) -> float:
    return costs.rates.h2d or PCIE_RATE


def link_seconds(costs: ModelCosts, resident: int, window: int) -> float:
    """Host-to-device bytes of a step: each streamed layer loaded for forward and again for backward,
    except the W still in their slots when backward starts (the gradients go the other way)."""
    streamed = costs.layers - resident
    loads = 0 if not streamed else (streamed if window >= streamed else 2 * streamed - window)
    return loads * costs.layer_params * costs.compute_bytes / host_to_device_rate(costs)


def overlapped_forward_seconds(costs: ModelCosts, resident: int) -> float:
    """The forward work the next step does before it needs each streamed layer's new weights in turn
    (what steps deferred to the end of backward overlap): with several micro-batches the streamed
    layers come first; with one, the resident layers run before them."""
    layers = costs.layers if costs.microbatches == 1 else costs.layers - resident
    return layers * costs.microbatches * layer_forward_seconds(costs)
