"""stronghold and l2l: the transformer layers that do not fit on the GPU live in host memory and
stream through GPU slots (executor/), in two configurations of the same executor:

    stronghold  W slots with prefetch, each layer's CPU step overlapped with GPU work, and as many
                resident layers as the planner fits on the GPU (trained as megatron-lm trains them);
    l2l         L2L (Pudipeddi et al. 2020, "Training Large Neural Networks with Constant Memory
                using a New Execution Algorithm"): every layer streamed through one slot, copied in
                when needed (no prefetch), every CPU step after backward, before the next iteration.
                It shares StrongHold's host store (same bytes per parameter, same fused CPU AdamW,
                biases and norms included, unlike the paper's L2L, which never updated them).

With several micro-batches per step the streamed layers run layer-major (executor/layer_major.py):
each crosses PCIe and the CPU once per step, whatever the number of micro-batches.
"""

import torch

from ..executor import StreamingExecutor, layer_major, owned_by_this_rank
from .megatron_lm import MegatronLM, to_device
from .registry import spec

GiB = 1024 ** 3


def streamed_span(args, plan) -> tuple:
    """(first, end) of the streamed layers. With several micro-batches per step they come first: the
    step runs layer-major through them and then micro-batch by micro-batch through the resident
    layers, which then need only the boundary between the two. With one micro-batch the resident
    layers come first, so that the streamed layers' CPU steps overlap the resident layers' backward
    and the next forward pass."""
    streamed = args.num_layers - plan.resident
    return (0, streamed) if args.num_microbatches > 1 else (plan.resident, args.num_layers)


def streamed_layers(args, plan) -> range:
    return range(*streamed_span(args, plan))


def placement(args, plan, device, dtype):
    """The resident layers go to the device in the compute dtype; of the streamed layers, those
    another data-parallel rank owns lose their weights at once (their owner broadcasts them at load
    time), this rank's stay in fp32 on the host until the store takes them."""
    first, end = streamed_span(args, plan)
    owned = owned_by_this_rank(end - first)

    def place(index, layer):
        if not first <= index < end:
            layer.to(device=device, dtype=dtype)
        elif not owned[index - first]:
            for p in layer.parameters():  # the shape stays (one element's storage) until bound to a slot
                p.data = torch.zeros((), dtype=p.dtype).expand(p.shape)
    return place


def _move_all_but(model, streamed, device, dtype) -> None:
    """Move every parameter except the streamed layers' to the device, before the store is built,
    so the host holds at most the fp32 weights of the layers not yet in the store."""
    keep = {id(p) for layer in streamed for p in layer.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.data = p.data.to(device=device, dtype=dtype)


def build(args, plan, model, device, dtype, seeds, log):
    first, end = streamed_span(args, plan)
    every = list(model.decoder.layers)
    head, layers, tail = every[:first], every[first:end], every[end:]
    if not layers:  # everything fits on the GPU: megatron-lm's step
        model.to(device=device, dtype=dtype)
        return MegatronLM(args, model, device, seeds, list(model.named_parameters()))
    _move_all_but(model, layers, device, dtype)  # frees host memory for the store
    if not spec(args.offload_method).overlap:  # L2L: one slot, nothing overlapped, every layer recomputed
        executor = StreamingExecutor(layers, 1, dtype, device, args, log=log, overlap=False,
                                     spill_boundaries=plan.boundaries_on_host, threads=plan.threads)
    else:
        executor = StreamingExecutor(layers, plan.window, dtype, device, args, log=log,
                                     recompute=plan.streamed_recompute, spill_boundaries=plan.boundaries_on_host,
                                     threads=plan.threads)
    model.to(device=device, dtype=dtype)  # streamed parameters are slot views already: untouched
    streamed = {id(p) for layer in layers for p in layer.parameters()}
    resident = [(n, p) for n, p in model.named_parameters() if id(p) not in streamed]
    return StreamingMethod(args, model, device, seeds, resident, executor, head, tail)


class StreamingMethod(MegatronLM):
    """megatron-lm's step for the resident layers, the executor's for the streamed ones."""

    def __init__(self, args, model, device, seeds, resident_params, executor, head, tail):
        super().__init__(args, model, device, seeds, resident_params)
        self.executor = executor
        self.head, self.tail = head, tail  # resident layers before / after the streamed ones
        names = {id(m): n for n, m in model.named_modules()}
        self.prefixes = [names[id(layer)] + "." for layer in executor.layers]

    @property
    def optimizers(self) -> list:
        return [self.resident, self.executor]

    def setup_line(self) -> str:
        ex = self.executor
        host, owned = ex.host_bytes(), sum(ex.owned)
        params = owned * ex.layout.numel
        return (f"host store: {owned} of {ex.num_layers} streamed layers on this rank, {params} parameters, "
                f"pinned {host['pinned'] / GiB:.3f} GiB + pageable {host['pageable'] / GiB:.3f} GiB = "
                f"{(host['pinned'] + host['pageable']) / max(params, 1):.2f} B/param; "
                f"GPU window {ex.window} layers = {ex.gpu_bytes() / GiB:.3f} GiB")

    # ----- the step -----

    def forward_backward(self, batches, loss_scale: float) -> list:
        self.executor.begin_step(1.0 / loss_scale)
        return layer_major.train_step(self.model, self.executor, self.head, self.tail, batches, loss_scale,
                                      self.seeds)

    def gradient_stats(self, inv_scale: float):
        sumsq, found_inf = super().gradient_stats(inv_scale)  # the streamed layers: averaged as they left
        host_sumsq, host_finite = self.executor.gradient_stats()
        return sumsq + host_sumsq, found_inf or not host_finite

    def optimizer_step(self, coeff: float, skip: bool) -> None:
        super().optimizer_step(coeff, skip)
        self.executor.finish_step(coeff, skip=skip)

    def eval_losses(self, batches) -> list:
        self.executor.begin_step(1.0)
        return layer_major.evaluate_losses(self.model, self.executor, self.head, self.tail,
                                           [to_device(b, self.device) for b in batches], self.seeds)

    # ----- checkpoints -----

    def state_dict(self) -> dict:
        return {**super().state_dict(), **self.part_state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.executor.load_state_dict(state, self.prefixes)

    def part_state_dict(self) -> dict:
        return self.executor.state_dict(self.prefixes)

    def held_elsewhere(self) -> set:
        ex = self.executor
        return {prefix + name for prefix, owned in zip(self.prefixes, ex.owned) if not owned
                for name in ex.layout.names}

    def part_owners(self) -> list:
        return sorted(set(self.executor.owner))

    # ----- the rest -----

    def watch(self, observer) -> None:
        self.executor.observer = observer

    def stats(self) -> dict:
        ex = self.executor
        return {"pinned bytes": ex.host_bytes()["pinned"], "timers": dict(ex.timers), "link": dict(ex.link),
                "layer steps": dict(ex.speculation.counts)}

    def shutdown(self) -> None:
        self.executor.shutdown()
