"""The StrongHold executor: transformer layers live in host memory and stream through W GPU slots.

The step that drives it (executor/layer_major.py) runs layer-major: a streamed layer, once in its
slot, computes every micro-batch of the step before the next layer, so each layer crosses PCIe
twice (weights in for forward and for backward) and once back (its gradient), and steps on the CPU
once per optimizer step, however many micro-batches the step has. This module holds the slots and
their copies, and the CPU work a finished gradient starts:
- slots: layer i always uses slot i % W, so loads never need a free-slot search. acquire(i) makes
  the compute stream wait for "i loaded" (loading it first if it is not in its slot); release(i),
  after its forward kernels are queued, queues the load of i + W into the same slot behind the
  event "slot free". offload(i, grad), after its backward, sends the step's gradient to the pinned
  host buffer on the D2H stream, queues the layer's CPU step and loads i - W into the slot.
- the CPU step (speculative.py decides when each layer steps): as soon as its gradient arrives where
  the global norm cannot change the step (no clipping, no fp16), else once the norm is known.
- data parallel, each streamed layer has one owner rank (ownership.py).
- the next iteration's load of a layer waits for that layer's CPU work (a host wait on a future,
  the one true dependency); everything on the GPU is ordered by events only.

Without CUDA the same code runs with host-to-host copies and no streams, which is how CI tests it.
"""

import concurrent.futures
import contextlib
import math
import time

import torch

from stronghold_ext import fused_adamw

from ..logs import Progress
from ..optim import counts_in_norm
from ..precision import gradient_dtype
from .boundaries import Boundaries
from .cpu_worker import CpuStepError, CpuWorker, default_threads
from .host_store import HostLayer, LayerLayout, _numel
from .ownership import Ownership
from .speculative import SpeculativeStep


class StreamingExecutor:
    def __init__(self, layers, window: int, dtype: torch.dtype, device: torch.device, args, log=print,
                 overlap: bool = True, recompute: bool = True, spill_boundaries: bool = False,
                 threads: int | None = None):
        """overlap=False gives L2L's schedule on the same store: each layer is copied in when it is
        needed (no prefetch) and every CPU step runs after backward, before the next iteration.
        recompute: keep only each layer's input between forward and backward and run the layer
        again in backward (the plan decides; see planner.Plan.streamed_recompute); spill_boundaries: those
        inputs wait in pinned host memory (boundaries.py; the plan's fallback when they do not fit).
        threads: the CPU optimizer's (the plan's; default cpu_worker.default_threads). args: the
        run's Config, for the optimizer's hyperparameters and clipping."""
        self.recompute = recompute
        self.overlap = overlap
        self.layers = list(layers)
        self.num_layers = len(self.layers)
        if window > self.num_layers:
            log(f"window size {window} > {self.num_layers} layers: clamped to {self.num_layers}")
        self.window = min(window, self.num_layers)
        self.device = device
        self.cuda = device.type == "cuda"
        self.ownership = Ownership(self.num_layers, asynchronous=self.cuda)
        self.owned, self.owner = self.ownership.owned, self.ownership.owner
        self.layout = LayerLayout.of(self.layers[0])

        self.slots = [torch.empty(self.layout.numel, dtype=dtype, device=device) for _ in range(self.window)]
        self.host, self.params = [], []
        progress = Progress("filling the host store" + (" and pinning it" if self.cuda else ""),
                            len(self.layers), log)
        for i, layer in enumerate(self.layers):
            if LayerLayout.of(layer) != self.layout:
                raise ValueError("streamed layers must all have the same parameter layout")
            host = None
            if self.owned[i]:
                host = HostLayer(layer, self.layout, dtype, pin=self.cuda, args=args)
            self.host.append(host)
            progress.step(i + 1, sum(host.nbytes().values()) if host is not None else 0)
            self._bind(i)  # frees the layer's fp32 initial weights before the next layer's store
        # Spans of the flat gradient that count in the global norm (tensor-parallel duplicates only on rank 0).
        counted = {n for n, p in self.layers[0].named_parameters() if counts_in_norm(p)}
        self.counted_spans = [(o, o + _numel(shape)) for name, o, shape in
                              zip(self.layout.names, self.layout.offsets, self.layout.shapes) if name in counted]

        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.d2h = torch.cuda.Stream(device) if self.cuda else None
        self.slot_owner = [-1] * self.window   # layer whose current weights are (being) loaded
        self.slot_free = [None] * self.window  # event: last kernels reading the slot are queued before it
        self.loaded = [None] * self.num_layers  # event: layer i's weights are in its slot
        self.offloaded = [None] * self.num_layers  # event: layer i's gradients are on the host
        self.grad_pending = [None] * self.num_layers  # future: CPU work reading layer i's grad buffer
        self.weight_pending = [None] * self.num_layers  # future: CPU step writing layer i's weights
        self.pending_start = []  # of the first W layers, those whose load begin_step left for later
        self.inv_scale = 1.0
        self.grad_dtype = gradient_dtype(dtype)
        # Bytes the executor moved between host and device (on CPU: between host tensors), for the log.
        self.link = {"host-to-device": 0, "device-to-host": 0}
        self.boundaries = Boundaries(self.num_layers, spill_boundaries, device, self.h2d, self.d2h, self.link)
        self.scratch = torch.empty(self.layout.numel, dtype=torch.float32)  # a gradient in fp32
        self.main_grads_dtype = args.main_grads_torch_dtype
        fused_adamw()  # compile (or load) the fused CPU kernel now, not in the middle of a step
        threads = threads or default_threads()
        # Lowest layer first: each layer's norm is known on arrival (taken on the device), so the
        # guesses depend on arrival order, never on which layer the thread took first.
        self.worker = CpuWorker(threads)
        # Seconds, for the log: CPU work (its own thread) and the main thread's waits for it.
        self.timers = {"cpu work": 0.0, "waits for cpu": 0.0, "copy waits": 0.0}
        self.schedule_groups = [{"wd_mult": 1.0}, {"wd_mult": 0.0}]
        self.speculation = SpeculativeStep(may_guess=overlap and args.may_step_early)
        # Each layer's gradient norm (after the data-parallel average) is taken on the compute device
        # as the gradient leaves it: the global norm is then known as soon as backward ends, without
        # waiting for the CPU work (see gradient_stats).
        self.sumsq_device = torch.zeros(self.num_layers, dtype=torch.float32, device=device)
        self.sumsq_host = torch.zeros(self.num_layers, dtype=torch.float32, pin_memory=self.cuda)
        self.iteration = 0
        self.norm_taken = [-1] * self.num_layers  # iteration whose gradient norm sumsq_host[i] holds
        # observer(event, **details) if set (training.train's observer): "begin step" and
        # "offload" (layer=i), on the main thread, as the schedule reaches them.
        self.observer = None

    def _observe(self, event: str, **details) -> None:
        if self.observer is not None:
            self.observer(event, **details)

    # ----- setup -----

    def _bind(self, i: int) -> None:
        """Point layer i's parameters at its slot; params[i] lists them in the layout's order."""
        views = dict(zip(self.layout.names, self.layout.views(self.slots[i % self.window])))
        named = dict(self.layers[i].named_parameters())
        for name, p in named.items():
            p.data = views[name]
        self.params.append([named[n] for n in self.layout.names])

    @property
    def param_groups(self):
        """What the LR scheduler writes; CPU work reads a snapshot taken when it is queued."""
        return self.schedule_groups

    def _hyperparameters(self) -> dict:
        return {g["wd_mult"]: (g["lr"], g["weight_decay"]) for g in self.schedule_groups}

    def host_bytes(self) -> dict:
        total = {"pinned": 0, "pageable": 0}
        for h in filter(None, self.host):
            for k, v in h.nbytes().items():
                total[k] += v
        total["pinned" if self.cuda else "pageable"] += self.boundaries.host_bytes()
        return total

    def gpu_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.slots)

    # ----- copies -----

    def _record(self):
        return torch.cuda.current_stream(self.device).record_event() if self.cuda else None

    def load(self, i: int) -> None:
        slot = i % self.window
        if self.slot_owner[slot] == i:
            return
        self._wait(self.weight_pending, i)
        dst = self.slots[slot]
        if self.cuda:
            if self.slot_free[slot] is not None:
                self.h2d.wait_event(self.slot_free[slot])
            with torch.cuda.stream(self.h2d):
                if self.owned[i]:
                    dst.copy_(self.host[i].weights, non_blocking=True)
                self.ownership.broadcast(i, dst)
                self.loaded[i] = self.h2d.record_event()
        else:
            if self.owned[i]:
                dst.copy_(self.host[i].weights)
            self.ownership.broadcast(i, dst)
        if self.owned[i]:
            self.link["host-to-device"] += dst.numel() * dst.element_size()
        self.slot_owner[slot] = i

    def acquire(self, i: int) -> None:
        """Layer i's weights in its slot before the compute stream's next kernels."""
        while self.pending_start and self.pending_start[0] <= i:  # the first W loads, in order
            self.load(self.pending_start.pop(0))
        if self.slot_owner[i % self.window] != i:  # not prefetched (first use, or L2L): load it now
            self.load(i)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.loaded[i])

    def _wait(self, futures, i: int) -> None:
        """Wait for layer i's CPU work; its failure (or the worker thread's death) stops the run."""
        fut, futures[i] = futures[i], None
        if fut is None:
            return
        start = time.perf_counter()
        while True:
            try:
                fut.result(timeout=1.0)
                break
            except concurrent.futures.TimeoutError as exc:
                if fut.done():  # the work itself raised a TimeoutError
                    futures[i] = fut
                    raise CpuStepError(f"the CPU optimizer step of {self._name(i)} failed: TimeoutError: {exc}") from exc
                if not self.worker.alive:  # nothing will ever complete it
                    raise CpuStepError(f"the CPU optimizer thread stopped before {self._name(i)}'s step ran")
            except Exception as exc:
                futures[i] = fut  # every later wait on this layer fails the same way
                raise CpuStepError(f"the CPU optimizer step of {self._name(i)} failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
        self.timers["waits for cpu"] += time.perf_counter() - start

    def _name(self, i: int) -> str:
        number = getattr(self.layers[i], "layer_number", None)  # megatron-core's, from 1
        return f"transformer layer {number}" if number is not None else f"streamed layer {i}"

    def _wait_all(self) -> None:
        for i in range(self.num_layers):
            self._wait(self.grad_pending, i)
            self._wait(self.weight_pending, i)

    # ----- the schedule's calls -----

    def begin_step(self, inv_scale: float) -> None:
        """Before a step's (or an evaluation's) forward: queue the loads of the first W layers whose
        CPU step is done. A load waits on the host for its layer's step, and after a clipped
        iteration the steps are still running: the embeddings need not wait for them. The loads
        not ready now are queued by acquire or release, in order."""
        self._observe("begin step")
        self.inv_scale = inv_scale
        self.pending_start = list(range(self.window if self.overlap else 0))
        while self.pending_start and self._step_done(self.pending_start[0]):
            self.load(self.pending_start.pop(0))

    def _step_done(self, i: int) -> bool:
        return self.weight_pending[i] is None or self.weight_pending[i].done()

    def release(self, i: int) -> None:
        """Layer i's forward kernels are queued: its slot may take layer i + W after them."""
        self.slot_free[i % self.window] = self._record()
        while self.pending_start:  # the first W loads, in order, before i + W's (steps finish in order)
            self.load(self.pending_start.pop(0))
        if self.overlap and i + self.window < self.num_layers:
            self.load(i + self.window)

    def new_gradient(self) -> torch.Tensor:
        """A zeroed buffer (the layer's flat layout) that a layer's gradient is summed in over the
        step's micro-batches on the device, as Megatron sums its main grads (fp32; bf16 with
        --main-grads-dtype bf16)."""
        return torch.zeros(self.layout.numel, dtype=self.main_grads_dtype, device=self.device)

    def gradient_views(self, flat: torch.Tensor):
        return self.layout.views(flat)

    def offload(self, i: int, grad: torch.Tensor) -> None:
        """Layer i's backward over every micro-batch is complete (grad: its fp32 sum, flat): send the
        gradient to its owner's host store and queue the layer's CPU step; load i - W into the slot."""
        self._observe("offload", layer=i)
        self._offload(i, grad)
        if self.overlap and i - self.window >= 0:
            self.load(i - self.window)

    def _offload(self, i: int, grad: torch.Tensor) -> None:
        self._wait(self.grad_pending, i)  # CPU work still reading the buffer (done by now: the load waited for it)
        reduce = self.ownership.start_reduce(i, grad) if self.ownership.parallel else None
        if reduce is None:
            grad = self._to_gradient_dtype(grad)
            self._take_norm(i, grad)
        done = self._record()
        self.slot_free[i % self.window] = done
        if not self.owned[i]:  # its owner steps it: nothing of it leaves this device
            self.sumsq_host[i] = 0.0
            self.norm_taken[i] = self.iteration
            return
        copied = None
        host_grad = self.host[i].grad
        if self.cuda:
            self.d2h.wait_event(done)
            with torch.cuda.stream(self.d2h):
                if reduce is not None:  # the copy stream, not the compute stream, waits for the sum
                    grad = self._finish_reduce(i, *reduce)
                host_grad.copy_(grad, non_blocking=True)
                grad.record_stream(self.d2h)
                self.sumsq_host[i].copy_(self.sumsq_device[i], non_blocking=True)
                copied = self.d2h.record_event()
            self.offloaded[i] = copied
            # Bound the gradients waiting for PCIe to 2W layers. The caching allocator frees a
            # gradient only once it sees its copy finished; a host running far ahead of the GPU
            # would otherwise hold every layer's gradients. When compute outpaces PCIe this
            # waits; in the steady state of a real model the copy finished long ago.
            ahead = i + 2 * self.window
            if ahead < self.num_layers and self.offloaded[ahead] is not None:
                self.offloaded[ahead].synchronize()
        else:
            if reduce is not None:
                grad = self._finish_reduce(i, *reduce)
            host_grad.copy_(grad)
            self.sumsq_host[i] = self.sumsq_device[i]
        self.link["device-to-host"] += host_grad.numel() * host_grad.element_size()
        future = self.worker.submit(i, self._cpu_work, i, copied, self.inv_scale, self._hyperparameters(),
                                    self.iteration,
                                    ready=copied.query if copied is not None else None)
        self.grad_pending[i] = self.weight_pending[i] = future

    def _to_gradient_dtype(self, grad: torch.Tensor) -> torch.Tensor:
        """What crosses PCIe and the CPU step reads: the gradient rounded once from the fp32 sum to
        bf16 (2 B/param), in fp32 otherwise (precision.gradient_dtype)."""
        return grad if grad.dtype == self.grad_dtype else grad.to(self.grad_dtype)

    def _take_norm(self, i: int, grad: torch.Tensor) -> None:
        """Layer i's gradient sum of squares, on the device (microseconds there, tens of ms on the CPU)."""
        norms = torch._foreach_norm([grad[a:b] for a, b in self.counted_spans], 2, dtype=torch.float32)
        self.sumsq_device[i] = torch.stack(norms).square().sum()
        self.norm_taken[i] = self.iteration

    def _finish_reduce(self, i, flat, work):
        """On the owner: the mean gradient in the compute dtype, on the current stream."""
        mean = self.ownership.finish_reduce(flat, work)
        if self.cuda:
            flat.record_stream(torch.cuda.current_stream())  # allocated on the compute stream
        mean = self._to_gradient_dtype(mean)
        self._take_norm(i, mean)
        return mean

    @contextlib.contextmanager
    def _timed(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timers[name] += time.perf_counter() - start

    def _cpu_work(self, i, copied, inv_scale, hyper, iteration):
        if copied is not None:
            with self._timed("copy waits"):
                copied.synchronize()
        with self._timed("cpu work"):
            self._update(i, inv_scale, hyper, iteration)

    def _update(self, i, inv_scale, hyper, iteration):
        """Step layer i now if speculative.py says it may, or with the published coefficient."""
        host = self.host[i]
        # Layers i..L-1 arrived up to now; their norms landed before i's (one copy stream, in order).
        arrived = float(self.sumsq_host[i:].sum()) * inv_scale * inv_scale  # the scale is a power of two
        guess, final = self.speculation.decide(i, arrived, iteration)
        if guess:
            host.step(hyper, inv_scale, self.scratch)
        if final is not None and self.speculation.needs_final_step(guess, final[1]):
            self._make_final(i, *final, hyper, inv_scale)

    # ----- the step -----

    def gradient_stats(self):
        """(sum of squares, all finite) over the streamed layers' gradients of this iteration.

        The norms were taken on the compute device, so this waits only for their copies: the CPU
        steps go on while the main thread takes the global norm and starts the next forward pass."""
        missing = [i for i in range(self.num_layers) if self.norm_taken[i] != self.iteration]
        if self.cuda and not missing:
            for i in range(self.num_layers):
                if self.owned[i]:
                    self.offloaded[i].synchronize()
        sumsq = [float(self.sumsq_host[i]) * self.inv_scale * self.inv_scale for i in range(self.num_layers)]
        if missing:
            raise RuntimeError(f"no gradients reached the host for layers {missing}")
        total = self.ownership.sum(sum(sumsq), self.device)  # each rank measured the layers it owns
        return total, math.isfinite(total)

    def finish_step(self, clip_coeff: float, skip: bool) -> None:
        """Make the step final: the deferred layers step. Layers whose CPU work has not decided yet
        step with the published coefficient when it runs."""
        hyper, inv_scale = self._hyperparameters(), self.inv_scale
        decided = self.speculation.publish(self.iteration, clip_coeff, skip)
        for i in range(self.num_layers):  # forward order: layer 0 is needed first
            if i in decided and self.speculation.needs_final_step(decided[i] == "guess", skip):
                # The one worker thread runs it after the layer's own CPU work, which has started;
                # it looks at that work's outcome first, so a failure there is never built upon.
                self.weight_pending[i] = self.grad_pending[i] = self.worker.submit(
                    i, self._finish_layer, i, self.weight_pending[i], clip_coeff, skip, hyper, inv_scale)
        self.iteration += 1
        if not self.overlap:
            self._wait_all()
        # The new weights must be reloaded before the next forward pass.
        self.slot_owner = [-1] * self.window

    def _finish_layer(self, i, before, *args):
        if before is not None:
            before.result()  # done (same thread, queued earlier); re-raises its failure, undoing nothing
        with self._timed("cpu work"):
            self._make_final(i, *args)

    def _make_final(self, i, clip_coeff, skip, hyper, inv_scale):
        # inv_scale is a power of two: (g * inv_scale) * clip == g * (inv_scale * clip)
        host = self.host[i]
        if not skip:
            host.step(hyper, inv_scale * clip_coeff, self.scratch)

    # ----- checkpoints -----

    def state_dict(self, prefixes) -> dict:
        """{prefix + parameter name: fp32 value and Adam state} of every streamed layer, read from
        the host store (views, nothing staged on the GPU); prefixes[i]: layer i's name in the model."""
        self._wait_all()  # the last step's CPU work must have landed
        out = {}
        for prefix, host in zip(prefixes, self.host):
            if host is not None:  # data parallel: the layers this rank owns
                out.update({prefix + name: entry for name, entry in host.state_dict().items()})
        return out

    def load_state_dict(self, state: dict, prefixes) -> None:
        """Load the streamed layers' masters and Adam state, refresh their pinned compute-dtype
        weights, and forget what the GPU slots hold so the next forward pass reloads them."""
        self._wait_all()
        if self.cuda:
            torch.cuda.synchronize(self.device)  # no copy may still read the host weights
        for prefix, host in zip(prefixes, self.host):
            if host is None:
                continue
            missing = [prefix + n for n in self.layout.names if prefix + n not in state]
            if missing:
                raise ValueError(f"{missing[0]} is missing from the checkpoint")
            host.load_state_dict({n: state[prefix + n] for n in self.layout.names})
        self.slot_owner = [-1] * self.window

    def shutdown(self) -> None:
        self._wait_all()
        self.worker.shutdown()
