"""The StrongHold executor: transformer layers live in host memory and stream through W GPU slots.

Schedule (layer i always uses slot i % W, so loads never need a free-slot search):
- forward of layer i: the compute stream waits for "i loaded"; once i's kernels are queued, the
  load of i + W into the same slot is queued on the H2D stream behind the event "slot free".
- backward of layer i: an identity autograd node on the layer's output makes the compute stream
  wait for "i loaded" before the layer's backward kernels. When the last parameter gradient of the
  layer has been accumulated, its gradients go to the pinned host buffer on the D2H stream, the
  slot is released, i - W is loaded into it, and the layer's CPU work (accumulate, or step) is
  queued on the optimizer worker, which takes the lowest pending layer first (cpu_worker.py).
- the CPU step is speculative: the global gradient norm is known only once every layer is done, so
  a layer steps as soon as its gradients arrive while the running norm stays under the clip
  threshold; if clipping fires after all, or an overflow skips the iteration, those steps are
  undone exactly and redone from the kept gradients (HostLayer.undo_step). Once the running norm
  passes the threshold the remaining layers step right after backward, in forward order, and the
  next iteration does not guess at all (clipping tends to fire on runs of iterations).
- the next iteration's load of a layer waits for that layer's CPU work (a host wait on a future,
  the one true dependency); everything on the GPU is ordered by events only.

Without CUDA the same code runs with host-to-host copies and no streams, which is how CI tests it.
"""

import contextlib
import math
import threading
import time

import torch

from stronghold_ext import fused_adamw

from megatron.core import parallel_state

from ..optim import counts_in_norm
from .cpu_worker import CpuWorker, default_threads
from .host_store import HostLayer, LayerLayout, _numel


class _WaitForLoad(torch.autograd.Function):
    """Identity whose backward makes the compute stream wait until the layer is back on the GPU."""

    @staticmethod
    def forward(ctx, hidden, executor, index):
        ctx.executor, ctx.index = executor, index
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        ctx.executor.wait_loaded(ctx.index)
        return grad, None, None


def streamed_layer_owners(num_streamed: int) -> list:
    """The data-parallel rank that owns each streamed layer: layer i belongs to rank i mod N."""
    ranks = parallel_state.get_data_parallel_world_size()
    return [i % ranks for i in range(num_streamed)]


def owned_by_this_rank(num_streamed: int) -> list:
    rank = parallel_state.get_data_parallel_rank() if parallel_state.get_data_parallel_world_size() > 1 else 0
    return [owner == rank for owner in streamed_layer_owners(num_streamed)]


class StreamingExecutor:
    def __init__(self, layers, window: int, dtype: torch.dtype, device: torch.device, args, log=print,
                 overlap: bool = True):
        """overlap=False gives L2L's schedule on the same store: each layer is copied in when it is
        needed (no prefetch) and every CPU step runs after backward, before the next iteration."""
        self.overlap = overlap
        self.layers = list(layers)
        self.num_layers = len(self.layers)
        if window > self.num_layers:
            log(f"window size {window} > {self.num_layers} layers: clamped to {self.num_layers}")
        self.window = min(window, self.num_layers)
        self.device = device
        self.cuda = device.type == "cuda"
        self.num_microbatches = args.num_microbatches
        # Data parallel: streamed layer i belongs to data-parallel rank i mod N, whose host store alone
        # holds it and whose CPU steps it (host memory and CPU work per rank fall as 1/N). Its gradient is
        # summed onto the owner on the device (NCCL between GPUs; through host memory over gloo it was
        # 3.8x slower than one rank at 26 streamed layers on 2 H200s), and its weights are broadcast from
        # the owner's slot when it is loaded. Loads and gradients go in one fixed order (forward, then
        # backward), the same on every rank, so every rank issues the same collectives.
        self.data_parallel = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group() if self.data_parallel > 1 else None
        self.owned = owned_by_this_rank(len(self.layers))
        self.owner = [torch.distributed.get_global_rank(self.dp_group, owner) if self.dp_group is not None else 0
                      for owner in streamed_layer_owners(len(self.layers))]
        self.layout = LayerLayout.of(self.layers[0])

        self.slots = [torch.empty(self.layout.numel, dtype=dtype, device=device) for _ in range(self.window)]
        self.host, self.grad_targets = [], []
        for i, layer in enumerate(self.layers):
            if LayerLayout.of(layer) != self.layout:
                raise ValueError("streamed layers must all have the same parameter layout")
            host = None
            if self.owned[i]:
                host = HostLayer(layer, self.layout, dtype, pin=self.cuda,
                                 accumulate=self.num_microbatches > 1, args=args)
                host.init_optimizer_state()
            self.host.append(host)
            self._bind(i)  # frees the layer's fp32 initial weights before the next layer's store
        self.params_per_layer = len(self.layout.names)
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
        self.grads_seen = [0] * self.num_layers
        self.pending_start = []  # of the first W layers, those whose load start_forward left for later
        self.microbatch = 0
        self.inv_scale = 1.0
        self.scratch = torch.empty(self.layout.numel, dtype=torch.float32)
        fused_adamw()  # compile (or load) the fused CPU kernel now, not in the middle of a step
        threads = args.cpu_optimizer_threads or default_threads()
        # Lowest layer first only where each layer's norm is known on arrival (device_norm, set
        # below): the guesses then depend on arrival order, never on which layer the thread took first.
        self.device_norm = self.num_microbatches == 1
        self.worker = CpuWorker(threads, lowest_layer_first=self.device_norm)
        # Seconds, for the log: CPU work (its own thread) and the main thread's waits for it.
        self.timers = {"cpu work": 0.0, "waits for cpu": 0.0, "copy waits": 0.0}
        # Layer steps: guessed during backward and kept, guessed and redone, deferred to finish_step.
        self.counts = {"kept": 0, "redone": 0, "deferred": 0}
        self.schedule_groups = [{"wd_mult": 1.0}, {"wd_mult": 0.0}]
        self.clip_grad = args.clip_grad
        self.seen_sumsq, self.guessing = 0.0, True  # see _update
        # device_norm: with one micro-batch, each layer's gradient norm (after the data-parallel
        # average) is taken on the compute device as the gradient leaves it: the global norm is then known as soon
        # as backward ends, without waiting for the CPU work (see gradient_stats).
        self.sumsq_device = torch.zeros(self.num_layers, dtype=torch.float32, device=device)
        self.sumsq_host = torch.zeros(self.num_layers, dtype=torch.float32, pin_memory=self.cuda)
        self.stats = {}  # layer -> (sum of squares, finite) of this iteration's gradient, from the CPU work
        # How each layer's step of this iteration was decided, guarded by decision_lock: "guess" (stepped
        # before the norm was known), "wait" (left to finish_step); a layer whose CPU work has not
        # decided when finish_step publishes the iteration's coefficient (final) steps with it directly.
        self.decision_lock = threading.Lock()
        self.decided = {}
        self.iteration = 0
        self.norm_taken = [-1] * self.num_layers  # iteration whose gradient norm sumsq_host[i] holds
        self.final = None  # (iteration, clip coefficient, skip) once finish_step knows them

    # ----- setup -----

    def _bind(self, i: int) -> None:
        """Point layer i's parameters at its slot, and hook its forward and backward."""
        layer = self.layers[i]
        views = dict(zip(self.layout.names, self.layout.views(self.slots[i % self.window])))
        host_grads = dict(zip(self.layout.names, self.layout.views(self.host[i].grad))) if self.owned[i] else {}
        self.grad_targets.append([])  # (parameter, its host grad view, whether it counts in the norm)
        for name, p in layer.named_parameters():
            p.data = views[name]
            p.register_post_accumulate_grad_hook(lambda p, i=i: self._on_param_grad(i))
            self.grad_targets[i].append((p, host_grads.get(name), counts_in_norm(p)))
        layer.register_forward_pre_hook(lambda m, a, i=i: self._before_forward(i))
        layer.register_forward_hook(lambda m, a, out, i=i: self._after_forward(i, out))

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
                self._broadcast(i, dst)
                self.loaded[i] = self.h2d.record_event()
        else:
            if self.owned[i]:
                dst.copy_(self.host[i].weights)
            self._broadcast(i, dst)
        self.slot_owner[slot] = i

    def _broadcast(self, i: int, slot: torch.Tensor) -> None:
        """Data parallel: layer i's weights from its owner's slot to every rank's (on the current stream)."""
        if self.dp_group is None:
            return
        work = torch.distributed.broadcast(slot, src=self.owner[i], group=self.dp_group, async_op=self.cuda)
        if work is not None:
            work.wait()  # orders the copy stream after the collective; does not block the host

    def wait_loaded(self, i: int) -> None:
        if self.slot_owner[i % self.window] != i:  # not prefetched (first use): load it now
            self.load(i)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.loaded[i])

    def _wait(self, futures, i: int) -> None:
        fut, futures[i] = futures[i], None
        if fut is None:
            return
        start = time.perf_counter()
        try:
            fut.result()
            self.timers["waits for cpu"] += time.perf_counter() - start
        except Exception as exc:
            raise RuntimeError(f"CPU optimizer work on transformer layer {i} failed: {exc}") from exc

    def _wait_all(self) -> None:
        for i in range(self.num_layers):
            self._wait(self.grad_pending, i)
            self._wait(self.weight_pending, i)

    # ----- hooks -----

    def start_forward(self) -> None:
        """Called before each forward pass: queue the loads of the first W layers whose CPU step is done.

        A load waits on the host for its layer's step, and after a clipped iteration the steps are
        still running when the next forward starts: waiting here would hold up the resident layers'
        forward (and the embedding) behind W CPU steps. Loads not ready now are queued by
        prefetch_ready (resident layers' forward hooks, see watch) or, at the latest, by the first
        streamed layer's forward.
        """
        self.pending_start = list(range(self.window if self.overlap else 0))
        self.prefetch_ready()

    def watch(self, modules) -> None:
        """Modules that run before the streamed layers (the resident layers): each one's forward
        queues the first loads whose steps have finished meanwhile."""
        for module in modules:
            module.register_forward_pre_hook(lambda m, a: self.prefetch_ready())

    def prefetch_ready(self) -> None:
        while self.pending_start and self._step_done(self.pending_start[0]):
            self.load(self.pending_start.pop(0))

    def _step_done(self, i: int) -> bool:
        return self.weight_pending[i] is None or self.weight_pending[i].done()

    def _before_forward(self, i: int) -> None:
        self.wait_loaded(i)

    def _after_forward(self, i: int, output):
        hidden, context = output
        if torch.is_grad_enabled():
            hidden = _WaitForLoad.apply(hidden, self, i)
        self.slot_free[i % self.window] = self._record()
        while self.pending_start:  # the first W loads, in order, before i + W's (steps finish in order)
            self.load(self.pending_start.pop(0))
        if self.overlap and i + self.window < self.num_layers:
            self.load(i + self.window)
        return hidden, context

    def _on_param_grad(self, i: int) -> None:
        self.grads_seen[i] += 1
        if self.grads_seen[i] < self.params_per_layer:
            return
        self.grads_seen[i] = 0
        self._offload_grads(i)
        if self.overlap and i - self.window >= 0:
            self.load(i - self.window)

    def _offload_grads(self, i: int) -> None:
        """Layer i's backward is complete: send its grads to the host and queue its CPU work."""
        self._wait(self.grad_pending, i)  # the previous micro-batch's accumulation reads the buffer
        last = self.microbatch == self.num_microbatches - 1
        first = self.microbatch == 0
        grads = [p.grad for p, _, _ in self.grad_targets[i]]
        reduce = self._start_reduce(i, grads) if self.dp_group is not None else None
        if self.device_norm and reduce is None:
            self._take_norm(i, grads)
        done = self._record()
        self.slot_free[i % self.window] = done
        if not self.owned[i]:  # its owner steps it: nothing of it leaves this device
            self.sumsq_host[i] = 0.0
            self.norm_taken[i] = self.iteration
            for p, _, _ in self.grad_targets[i]:
                p.grad = None
            return
        copied = None
        if self.cuda:
            self.d2h.wait_event(done)
            with torch.cuda.stream(self.d2h):
                if reduce is not None:  # the copy stream, not the compute stream, waits for the sum
                    grads = self._finish_reduce(i, grads, *reduce)
                for (_, host_grad, _), g in zip(self.grad_targets[i], grads):
                    host_grad.copy_(g, non_blocking=True)
                    g.record_stream(self.d2h)
                if self.device_norm:
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
                grads = self._finish_reduce(i, grads, *reduce)
            for (_, host_grad, _), g in zip(self.grad_targets[i], grads):
                host_grad.copy_(g)
            self.sumsq_host[i] = self.sumsq_device[i]
        for p, _, _ in self.grad_targets[i]:
            p.grad = None
        future = self.worker.submit(i, self._cpu_work, i, copied, first, last, self.inv_scale,
                                    self._hyperparameters() if last else None, self.iteration, self.guessing,
                                    ready=copied.query if copied is not None else None)
        self.grad_pending[i] = future
        if last:
            self.weight_pending[i] = future

    def _take_norm(self, i: int, grads) -> None:
        """Layer i's gradient sum of squares, on the device (microseconds there, tens of ms on the CPU)."""
        norms = torch._foreach_norm([g for g, (_, _, counted) in zip(grads, self.grad_targets[i]) if counted],
                                    2, dtype=torch.float32)
        self.sumsq_device[i] = torch.stack(norms).square().sum()
        self.norm_taken[i] = self.iteration

    def _start_reduce(self, i, grads):
        """Start summing layer i's gradient over the data-parallel ranks onto its owner, in fp32 as
        Megatron reduces its main grads."""
        flat = torch.cat([g.reshape(-1) for g in grads]).float()
        work = torch.distributed.reduce(flat, dst=self.owner[i], group=self.dp_group, async_op=self.cuda)
        return flat, work

    def _finish_reduce(self, i, grads, flat, work):
        """On the owner: the mean gradient in the compute dtype (views of one buffer), on the current stream."""
        if work is not None:
            work.wait()  # orders the current stream after the collective; does not block the host
        if self.cuda:
            flat.record_stream(torch.cuda.current_stream())  # allocated on the compute stream
        mean = flat.div_(self.data_parallel).to(grads[0].dtype)
        out, offset = [], 0
        for g in grads:
            out.append(mean[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        if self.device_norm:
            self._take_norm(i, out)
        return out

    @contextlib.contextmanager
    def _timed(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timers[name] += time.perf_counter() - start

    def _cpu_work(self, i, copied, first, last, inv_scale, hyper, iteration, may_guess):
        if copied is not None:
            with self._timed("copy waits"):
                copied.synchronize()
        with self._timed("cpu work"):
            self._update(i, first, last, inv_scale, hyper, iteration, may_guess)

    def _update(self, i, first, last, inv_scale, hyper, iteration, may_guess):
        """Accumulate; on the last micro-batch measure the grad and step if the coefficient is known
        or it is safe to guess.

        A step taken before the global norm is known is a guess that clipping will not fire. The sum
        over the layers that arrived up to this one (backward order) is a lower bound of the global
        norm: a layer guesses only while it is under the clip threshold and the previous iteration
        did not clip. The rule depends on arrival order alone, so a run makes the same guesses (and
        the same inexact undo/redo) whatever the thread timing; where the coefficient is already
        published, a layer that the rule says guesses repeats exactly what finish_step would do.
        """
        host = self.host[i]
        if host.grad_accum is not None:
            host.accumulate(first)
        if not last:
            return
        if self.device_norm:
            # Layers i..L-1 arrived up to now; their norms landed before i's (one copy stream, in order).
            arrived = float(self.sumsq_host[i:].sum()) * inv_scale * inv_scale  # the scale is a power of two
        else:  # arrival order is processing order here
            grad = host.final_grad(self.scratch, inv_scale)
            if len(self.counted_spans) == len(self.layout.names):
                sumsq = float(torch.linalg.vector_norm(grad)) ** 2
            else:
                sumsq = sum(float(torch.linalg.vector_norm(grad[a:b])) ** 2 for a, b in self.counted_spans)
            self.stats[i] = (sumsq, math.isfinite(sumsq))
            self.seen_sumsq += sumsq
            arrived = self.seen_sumsq
        guess = (may_guess and self.overlap and math.isfinite(arrived)
                 and not (self.clip_grad > 0 and math.sqrt(arrived) + 1.0e-6 > self.clip_grad))
        with self.decision_lock:
            final = self.final if self.final is not None and self.final[0] == iteration else None
            if final is None:
                self.decided[i] = "guess" if guess else "wait"
            else:
                self._count(guess, *final[1:])
        if guess:
            host.step(hyper, inv_scale, self.scratch)
        if final is not None and self._needs_final_step(guess, *final[1:]):
            self._make_final(i, guess, *final[1:], hyper, inv_scale)

    # ----- the step -----

    def begin_microbatch(self, index: int, inv_scale: float) -> None:
        self.microbatch, self.inv_scale = index, inv_scale

    def gradient_stats(self):
        """(sum of squares, all finite) over the streamed layers' gradients of this iteration.

        With norms taken on the compute device this waits only for their copies: the CPU steps go on
        while the main thread takes the global norm and starts the next forward pass. Otherwise the
        norms come from the CPU work (after accumulation)."""
        if self.device_norm:
            missing = [i for i in range(self.num_layers) if self.norm_taken[i] != self.iteration]
            if self.cuda and not missing:
                for i in range(self.num_layers):
                    if self.owned[i]:
                        self.offloaded[i].synchronize()
            sumsq = [float(self.sumsq_host[i]) * self.inv_scale * self.inv_scale for i in range(self.num_layers)]
        else:
            self._wait_all()
            missing = [i for i in range(self.num_layers) if self.owned[i] and i not in self.stats]
            sumsq = [s for s, _ in self.stats.values()]
        if missing:
            raise RuntimeError(f"no gradients reached the host for layers {missing}")
        total = sum(sumsq)
        if self.dp_group is not None:  # each rank measured the layers it owns
            summed = torch.tensor([total], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(summed, group=self.dp_group)
            total = float(summed)
        return total, math.isfinite(total)

    def finish_step(self, clip_coeff: float, skip: bool) -> None:
        """Make the step final: redo guessed steps that were wrong, take the deferred ones. Layers
        whose CPU work has not decided yet step with the published coefficient when it runs."""
        hyper, inv_scale = self._hyperparameters(), self.inv_scale
        with self.decision_lock:
            self.final = (self.iteration, clip_coeff, skip)
            decided, self.decided = self.decided, {}
            # Guess next iteration only if this one needed no clipping: norms change slowly, and a wrong
            # guess costs an undo and a redo (three times a step) where deferring costs nothing extra.
            self.seen_sumsq, self.guessing = 0.0, clip_coeff == 1.0
            for d in decided.values():  # the others count themselves when they run (_update)
                self._count(d == "guess", clip_coeff, skip)
        self.stats = {}
        for i in range(self.num_layers):  # forward order: layer 0 is needed first
            guessed = decided.get(i) == "guess"
            if i in decided and self._needs_final_step(guessed, clip_coeff, skip):
                # The one worker thread runs it after the layer's own CPU work, which has started.
                self.weight_pending[i] = self.grad_pending[i] = self.worker.submit(
                    i, self._finish_layer, i, guessed, clip_coeff, skip, hyper, inv_scale)
        self.iteration += 1
        if not self.overlap:
            self._wait_all()
        # The new weights must be reloaded before the next forward pass.
        self.slot_owner = [-1] * self.window

    def _count(self, guessed: bool, clip_coeff: float, skip: bool) -> None:
        self.counts[("redone" if skip or clip_coeff != 1.0 else "kept") if guessed else "deferred"] += 1

    @staticmethod
    def _needs_final_step(guessed: bool, clip_coeff: float, skip: bool) -> bool:
        """A wrong guess is undone and redone; a layer that waited steps unless the iteration is skipped."""
        return skip or clip_coeff != 1.0 if guessed else not skip

    def _finish_layer(self, *args):
        with self._timed("cpu work"):
            self._make_final(*args)

    def _make_final(self, i, guessed, clip_coeff, skip, hyper, inv_scale):
        host = self.host[i]
        if guessed:
            host.undo_step(host.final_grad(self.scratch, inv_scale), hyper)
        if not skip:
            # inv_scale is a power of two: (g * inv_scale) * clip == g * (inv_scale * clip)
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
