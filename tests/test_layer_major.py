"""The layer-major step's memory contract: with recompute, a streamed layer's forward keeps only the
boundary tensors (no autograd graph, so no dropout masks), which is what the planner counts."""

from megatron.stronghold import arguments, training
from megatron.stronghold.executor import layer_major

TINY = ["--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--offload-method", "stronghold",
        "--resident-layers", "0", "--window-size", "2"]


def boundaries_of_one_step(monkeypatch, *flags):
    seen = []
    forward = layer_major._forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.extend(t for layer in out[1][1:] for t in layer)  # the streamed layers' outputs
        return out

    monkeypatch.setattr(layer_major, "_forward", recording)
    training.train(arguments.parse_args([*TINY, *flags]))
    return seen


def test_recomputed_streamed_layers_keep_boundaries_without_graph(monkeypatch):
    # megatron-core runs bias-dropout-add under torch.enable_grad: without a detach each boundary
    # would hold its layer's dropout masks until backward
    seen = boundaries_of_one_step(monkeypatch, "--recompute-granularity", "full")
    assert len(seen) == 3 * 2
    assert all(t.grad_fn is None and not t.requires_grad for t in seen)


def test_without_recompute_the_boundaries_are_leaves_of_kept_graphs(monkeypatch):
    seen = boundaries_of_one_step(monkeypatch)
    assert all(t.grad_fn is None and t.requires_grad for t in seen)
