"""The placement of stronghold's layers: the fastest plan that fits, by its predicted iteration.

A plan picks
- R resident layers, kept on the GPU with the GPU optimizer, as in megatron-lm: the last R with
  several micro-batches per step (the step runs layer-major through the streamed layers, then
  micro-batch by micro-batch through the resident ones), the first R with one (the streamed layers'
  CPU steps then overlap the resident layers' work; methods/streaming.py streamed_span);
- W window slots through which the other S = L - R layers stream from host memory;
- whether the streamed layers keep their activations from forward to backward or only their
  inputs (one boundary per layer and micro-batch) and run again in backward, and, where no
  placement holds those boundaries on the GPU, that they wait in pinned host memory;
- with --recompute-granularity full and no --recompute-method, how many resident layers run again in
  backward: the fewest that fit;
- the CPU optimizer's threads: all the cores it may have only where its steps bound the iteration.
Of the placements that fit it takes the one with the shortest predicted iteration (costs.py's parts at
the machine's measured rates), on a tie the one with more resident layers: a model that fits on the
GPU runs like megatron-lm, a larger one streams what does not fit. Without a GPU, where nothing is
predicted, the most resident layers that fit.
"""

from dataclasses import dataclass

from .costs import (CPU_ONLY_SAVING, GiB, ModelCosts, boundary_host_bytes, compute_seconds, cpu_adam_rate,
                    cpu_step_seconds, gpu_bytes, host_bytes, host_to_device_rate, link_seconds,
                    overlapped_forward_seconds)


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
    boundary_bytes: int = 0
    boundaries_on_host: bool = False  # the boundaries wait in pinned host memory (boundary_bytes there)
    resident_recompute: int | None = None  # resident layers that run again in backward; None: as the flags say

    def describe(self, costs: ModelCosts) -> str:
        streamed = costs.layers - self.resident
        keeps = ("boundaries" if self.streamed_recompute else "activations") if streamed else "none"
        if self.boundaries_on_host:
            keeps = "boundaries in pinned host memory"
        return (f"plan | resident layers: {self.resident} | streamed layers: {streamed} | "
                f"window: {self.window} | micro batches per step: {costs.microbatches} | "
                f"{'' if self.resident_recompute is None else f'resident layers recompute: {self.resident_recompute} | '}"
                f"streamed layers keep: {keeps} ({self.boundary_bytes / GiB:.2f} GiB) | "
                f"CPU optimizer threads: {self.threads} | host store: {costs.host_bytes_per_param} B/param | "
                f"resident: {costs.resident_bytes_per_param} B/param | {self._memory()} | "
                f"{costs.rates.describe(self.threads)} |")

    def _memory(self) -> str:
        if self.gpu_free is None:  # the device's bytes are host memory too, and the rates are a GPU's
            total = self.gpu_bytes + self.host_bytes - CPU_ONLY_SAVING
            return f"memory: {total / GiB:.1f} GiB (no GPU) | predicted iteration: none without a GPU"
        return (f"GPU: {self.gpu_bytes / GiB:.1f} GiB of {self.gpu_free / GiB:.1f} free | host: "
                f"{self.host_bytes / GiB:.1f} GiB | predicted iteration (ms): {self.predicted_s * 1e3:.0f}")


class DoesNotFit(ValueError):
    """No placement fits the memory available; the message gives the numbers and what to change."""


def predicted_seconds(costs: ModelCosts, resident: int, window: int, streamed_recompute: bool = True,
                      on_host: bool = False, threads=None, resident_recompute=None) -> float:
    """A model, not a measurement. Where layers step as their gradients arrive (costs.steps_early) the
    CPU steps and copies overlap the GPU work: the step takes the largest of compute, link and CPU
    time, plus what cannot overlap (layer 0 steps last and is loaded first). Otherwise no step starts
    before the global norm is known: the CPU work then overlaps only the next forward pass through the
    streamed layers."""
    compute = compute_seconds(costs, resident, streamed_recompute, resident_recompute)
    streamed = costs.layers - resident
    if not streamed:
        return compute
    cpu = cpu_step_seconds(costs, resident, threads)
    one_layer = costs.layer_params * (1 / cpu_adam_rate(costs, threads) + costs.compute_bytes / host_to_device_rate(costs))
    link = link_seconds(costs, resident, window)
    if on_host:  # the boundaries cross the link once each way too
        link += boundary_host_bytes(costs, resident) / host_to_device_rate(costs)
    if not costs.steps_early:
        forward = overlapped_forward_seconds(costs, resident)
        return max(compute + max(0.0, cpu - forward), link) + one_layer
    return max(compute, link, cpu) + one_layer


def thread_choices(cores: int) -> tuple:
    """The CPU optimizer's thread counts a plan chooses between (optimizer_threads): all, or half."""
    return cores, max(1, (cores + 1) // 2)


def optimizer_threads(costs: ModelCosts, resident: int, cores: int) -> int:
    """Threads for the CPU optimizer, out of `cores` (this rank's share less the main thread's).

    All of them only where the streamed layers' CPU steps take half the step's compute or more: the
    steps then bound the iteration, and more threads shorten it. Otherwise half: the main thread
    launches the GPU work, and beside an optimizer thread on every other core it slows down. With
    several small micro-batches it launches many short kernels, and the slowdown outweighs faster
    CPU steps even when they all wait for the global norm; with few streamed layers
    their steps hide behind the GPU work with half the cores as well as with all.
    """
    every, half = thread_choices(cores)
    cpu = cpu_step_seconds(costs, resident)
    return every if cpu >= compute_seconds(costs, resident) / 2 else half


def _window(costs, resident, window):
    streamed = costs.layers - resident
    return min(window if window is not None else 4, streamed) if streamed else 0


def _fewest_recomputed(costs: ModelCosts, resident: int, fits):
    """How many resident layers recompute: the fewest that fit where the plan chooses
    (costs.recompute_chosen), since a layer that keeps its activations runs a third faster; the first N
    with --recompute-method block; otherwise None (as the flags say: all or none). False where that
    does not fit."""
    if costs.recompute_block is not None:
        n = costs.recomputed_by_flags(resident)
        return n if fits(n) else False
    if not costs.recompute_chosen:
        return None if fits(None) else False
    if not fits(resident):
        return False
    lo, hi = 0, resident  # fits(hi); the bytes fall as n grows
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo


def make_plan(costs: ModelCosts, gpu_free, host_free: int, resident=None, window=None, threads=None,
              cores: int = 1) -> Plan:
    """The fastest plan that fits by the prediction (on a tie, the one with more resident layers);
    `resident`/`window`/`threads` fix a choice. Without a GPU (gpu_free None: device and host share
    the host memory, and nothing was measured) the plan with the most resident layers that fits.

    cores: the most threads the CPU optimizer may have (see optimizer_threads). DoesNotFit, with the
    numbers, where no placement fits.
    """
    shared = gpu_free is None
    gpu_budget = host_free if shared else gpu_free
    L = costs.layers
    candidates = [min(resident, L)] if resident is not None else range(L, -1, -1)

    def plan_for(r, recompute, on_host):
        """The plan of r resident layers with these streamed-layer options, or None where it does not fit."""
        w = _window(costs, r, window)
        h = host_bytes(costs, r, on_host)

        def fits(n):
            g = gpu_bytes(costs, r, w, recompute, on_host, n)
            return (g + h - CPU_ONLY_SAVING <= host_free) if shared else (g <= gpu_budget and h <= host_free)

        n = _fewest_recomputed(costs, r, fits)
        if n is False:
            return None
        g = gpu_bytes(costs, r, w, recompute, on_host, n)
        kept = boundary_host_bytes(costs, r) if on_host else costs.streamed_activations(L - r, recompute)
        t = threads or optimizer_threads(costs, r, cores)
        return Plan(r, w, t, g, h, predicted_seconds(costs, r, w, recompute, on_host=on_host, threads=t,
                                                     resident_recompute=n),
                    gpu_free, recompute, kept, on_host, n)

    # Streamed layers keep their activations only where the user did not ask for recompute and they
    # fit; running a layer again costs a third more of its compute, not another copy. Their inputs
    # go to pinned host memory only where no placement holds them on the GPU (a large global batch):
    # then they cross the link twice per step.
    keep_options = ((True, False),) if costs.recompute else ((False, False), (True, False))
    for options in (keep_options, ((True, True),)):
        best = None
        for r in candidates:
            for recompute, on_host in options:
                if on_host and (shared or r == L):
                    continue  # without a GPU there is no other memory to go to
                plan = plan_for(r, recompute, on_host)
                if plan is not None and (best is None or plan.predicted_s < best.predicted_s):
                    best = plan
                if best is not None and shared:
                    return best
        if best is not None:
            return best
    r = min(resident, L) if resident is not None else 0
    w = _window(costs, r, window)
    g, h = gpu_bytes(costs, r, w), host_bytes(costs, r)
    if shared:
        raise DoesNotFit(
            f"the model does not fit: it needs {(g + h - CPU_ONLY_SAVING) / GiB:.1f} GiB of host memory and this machine "
            f"has {host_free / GiB:.1f} GiB available (no GPU). Use fewer layers (--num-layers) or a "
            f"smaller hidden size.")
    raise DoesNotFit(
        f"the model does not fit: it needs {h / GiB:.1f} GiB host + {g / GiB:.1f} GiB GPU "
        f"({r} resident layers, window {w}), and this machine has {host_free / GiB:.1f} GiB host and "
        f"{gpu_budget / GiB:.1f} GiB GPU available. Use fewer layers (--num-layers), "
        f"{'full activation recompute (--recompute-granularity full), ' if not costs.recompute else ''}"
        f"a smaller micro-batch or global batch (the streamed layers keep {costs.microbatches} micro-batches' "
        f"inputs: {costs.streamed_activations(L - r, True) / GiB:.1f} GiB), or a machine with more memory.")
