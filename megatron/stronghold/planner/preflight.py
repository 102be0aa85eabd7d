"""The pre-flight check of every method: refuse, before anything large is allocated, a model that
cannot fit the memory this machine has, with the numbers; and the most layers each check admits
(the largest-model search's start)."""

import math
import os
from dataclasses import dataclass

from ..methods.registry import spec
from .costs import GPU_RESERVE, GiB, ModelCosts, gpu_bytes, offload_bytes, zero_bytes, zero_host_bytes_per_param
from .plan import DoesNotFit, make_plan


def available_memory(device) -> tuple:
    """(free GPU bytes, available host bytes). Without CUDA both are host memory."""
    import psutil
    import torch

    # Ranks on one node share its host memory (torchrun sets LOCAL_WORLD_SIZE).
    host = psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, host
    return None, host


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


def zero_check(costs: ModelCosts, gpu_free, host_free: int, method: str) -> None:
    """Refuse, before DeepSpeed allocates anything, a model whose certain bytes already exceed what
    is available (the rest is left to DeepSpeed, as megatron-lm's edge is left to the allocator)."""
    host, gpu = zero_bytes(costs, method)
    params = costs.params
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
            f"for {params / 1e9:.2f} B parameters (DeepSpeed keeps {zero_host_bytes_per_param(costs, method)} B per "
            f"parameter on the host here), and this machine has {host_free / GiB:.1f} GiB host and {gpu_free / GiB:.1f} GiB GPU "
            f"available. Use fewer layers (--num-layers) or --offload-method stronghold.")


@dataclass
class OffloadPlan:
    """megatron-offload's placement: every layer on the GPU, `fraction` of the optimizer on the CPU."""
    fraction: float
    gpu_bytes: int
    host_bytes: int
    gpu_free: int | None
    # nothing streams: the fields the trainer reads of a stronghold Plan
    window = None
    resident = None
    resident_recompute = None  # recompute as the flags say

    def describe(self, costs: ModelCosts) -> str:
        gpu = "" if self.gpu_free is None else f" of {self.gpu_free / GiB:.1f} free"
        return (f"plan | optimizer offload fraction: {self.fraction:.2f} (megatron-core's HybridDeviceOptimizer) | "
                f"GPU: {self.gpu_bytes / GiB:.1f} GiB{gpu} | host: {self.host_bytes / GiB:.1f} GiB |")


def offload_check(costs: ModelCosts, gpu_free, host_free: int, fraction=None) -> OffloadPlan:
    """megatron-offload's fraction: the user's, or the smallest (in hundredths) whose GPU bytes fit;
    DoesNotFit where the GPU cannot hold even the weights and gradient buffers, or the host its share."""
    if fraction is None:
        fraction = 1.0
        if gpu_free is not None:
            fixed = offload_bytes(costs, 1.0)[1]
            per_fraction = offload_bytes(costs, 0.0)[1] - fixed  # GPU bytes the whole optimizer state takes
            if per_fraction > 0:
                fraction = min(1.0, max(0.0, math.ceil(100 * (1 - (gpu_free - fixed) / per_fraction)) / 100))
    host, gpu = offload_bytes(costs, fraction)
    params = costs.params
    if (gpu_free is not None and gpu > gpu_free) or host > host_free:
        raise DoesNotFit(
            f"the model does not fit: megatron-offload with --optimizer-offload-fraction {fraction:g} needs "
            f"{gpu / GiB:.1f} GiB GPU and {host / GiB:.1f} GiB host for {params / 1e9:.2f} B parameters (every "
            f"layer's weights and fp32 gradients stay on the GPU), and this machine has "
            f"{'no GPU' if gpu_free is None else f'{gpu_free / GiB:.1f} GiB GPU'} and {host_free / GiB:.1f} GiB "
            f"host available. Use --offload-method stronghold, fewer layers or full activation recompute.")
    return OffloadPlan(fraction, gpu, host, gpu_free)


def check(costs: ModelCosts, gpu_free, host_free: int, method: str, resident=None, window=None, threads=None,
          cores: int = 1, fraction=None):
    """The pre-flight check of `method` (raises DoesNotFit), by its MethodSpec.preflight: the planner's
    plan (with the method's fixed placement, if it has one: l2l streams every layer through one
    slot), or None for the methods without a plan."""
    kind = spec(method)
    if kind.preflight == "all-on-gpu":
        megatron_check(costs, gpu_free, host_free)
        return None
    if kind.preflight == "deepspeed":
        zero_check(costs, gpu_free, host_free, method)
        return None
    if kind.preflight == "optimizer-offload":
        return offload_check(costs, gpu_free, host_free, fraction)
    if kind.preflight != "planner":
        raise ValueError(f"{method}: no pre-flight check called {kind.preflight!r}")
    if kind.fixed_placement is not None:
        resident, window = kind.fixed_placement
    return make_plan(costs, gpu_free, host_free, resident, window, threads, cores)


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


def _fits(costs, layers, gpu_free, host_free, method) -> bool:
    try:
        check(ModelCosts(**{**costs.__dict__, "layers": layers}), gpu_free, host_free, method)
        return True
    except DoesNotFit:
        return False
