"""One training step over k micro-batches, layer-major through the streamed layers (L2L's order,
with StrongHold's window, prefetch and overlapped CPU step).

The model is [embedding] [resident layers before] [streamed layers 0..S-1] [resident layers after]
[final norm, output layer, loss]. With several micro-batches the resident layers all come after the
streamed ones (nothing before them but the embedding keeps a graph per micro-batch); with one, they
come first, so that the CPU steps of the streamed layers overlap their forward and backward.
1. Embeddings (and the resident layers before the streamed ones) of every micro-batch, graphs kept.
2. Forward, layer by layer: streamed layer l, once in its slot, runs all k micro-batches; only each
   micro-batch's input to the layer (a boundary, s x b x h) is kept, on the GPU or in pinned host
   memory (boundaries.py), unless the plan keeps the layer's whole graph (no recompute).
3. The resident layers and the head run micro-batch by micro-batch, forward and backward, exactly as
   megatron-lm runs them; each gives the gradient at its boundary.
4. Backward, last streamed layer first: layer l, once in its slot, recomputes (or reuses) its forward
   and runs its backward for all k micro-batches, summing its weight gradient in fp32 on the device;
   the sum leaves for the host once and the layer steps on the CPU once (executor.offload).
5. The backward of the embeddings (and of the resident layers before the streamed ones).

Every (layer, micro-batch) draws its dropout masks from a generator seeded by (seed, iteration,
micro-batch, layer) (dropout.py), so the order changes no mask and the losses equal megatron-lm's.
"""

import torch

from ..model import embed, head_loss, run_layer


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def _forward(model, executor, head, batches, seeds, keep_graph: bool, boundaries=None):
    """Phases 1 and 2: (embedded outputs with their graphs, the last streamed layer's outputs,
    graphs[l][m] = layer l's output with its graph when kept, each micro-batch's LayerInputs). Each
    streamed layer's inputs go to `boundaries` (executor/boundaries.py) for backward; evaluation keeps none."""
    embedded, contexts = [], []
    for m, batch in enumerate(batches):
        seeds.microbatch = m
        hidden, context = embed(model, batch)
        for layer in head:
            hidden = run_layer(layer, hidden, context)
        embedded.append(hidden)
        contexts.append(context)
    inputs = [_leaf(h) if keep_graph else h.detach() for h in embedded]
    graphs = []
    for l, layer in enumerate(executor.layers):
        if boundaries is not None:
            boundaries.put(l, inputs)
        executor.acquire(l)
        outputs = []
        with torch.set_grad_enabled(keep_graph):
            for m, x in enumerate(inputs):
                seeds.microbatch = m
                outputs.append(run_layer(layer, x, contexts[m]))
        executor.release(l)
        graphs.append(outputs if keep_graph else None)
        # detach even without grad: megatron-core runs bias-dropout-add under enable_grad, so each
        # output would keep its two dropout masks (s b h bytes each) alive through the step
        inputs = [_leaf(y) if keep_graph else y.detach() for y in outputs]
    return embedded, inputs, graphs, contexts


def train_step(model, executor, head, tail, batches, loss_scale: float, seeds) -> list:
    """Forward and backward of one optimizer step; returns the micro-batches' losses (detached).
    head / tail: the resident layers before / after the streamed ones. Gradients end in the resident
    optimizer's main grads and, for the streamed layers, in the executor's host store with their
    CPU steps queued."""
    k = len(batches)
    keep_graph = not executor.recompute
    boundaries = executor.boundaries
    embedded, last, graphs, contexts = _forward(model, executor, head, batches, seeds, keep_graph, boundaries)

    losses, grads = [], []
    for m, batch in enumerate(batches):  # phase 3: megatron-lm's order for the resident part
        seeds.microbatch = m
        x = last[m] if keep_graph else _leaf(last[m])
        loss = head_loss(model, tail, x, batch, contexts[m])
        (loss * (loss_scale / k)).backward()
        losses.append(loss.detach())
        grads.append(x.grad)
        last[m] = x = None

    for l in reversed(range(executor.num_layers)):  # phase 4
        layer, params = executor.layers[l], executor.params[l]
        executor.acquire(l)
        boundaries.prefetch(l)
        boundaries.prefetch(l - 1)  # spilled: the next layer's inputs come back while this one runs
        summed = executor.new_gradient()
        views = executor.gradient_views(summed)
        for m in range(k):
            seeds.microbatch = m
            x = boundaries.take(l, m)
            if keep_graph:
                y = graphs[l][m]
                graphs[l][m] = None
            else:
                x = _leaf(x)
                y = run_layer(layer, x, contexts[m])
            grad_input, *grad_params = torch.autograd.grad(y, [x, *params], grads[m])
            torch._foreach_add_(views, grad_params)
            grads[m] = grad_input
            x = y = None
        executor.offload(l, summed)
        del summed, views  # before the next layer's sum is allocated: one fp32 sum on the device at a time

    for m in range(k):  # phase 5
        seeds.microbatch = m  # the head's recompute (torch.utils.checkpoint) restores its own RNG state
        torch.autograd.backward(embedded[m], grads[m])
    return losses


def evaluate_losses(model, executor, head, tail, batches, seeds) -> list:
    """Forward only (the caller holds no_grad): the micro-batches' losses, layer-major."""
    _, last, _, contexts = _forward(model, executor, head, batches, seeds, keep_graph=False)
    return [float(head_loss(model, tail, x, batch, context)) for x, batch, context in zip(last, batches, contexts)]
