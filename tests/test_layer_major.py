"""The layer-major step's memory contract: with recompute, a streamed layer's forward keeps only the
boundary tensors (its inputs, with no autograd graph, so no dropout masks), which is what the planner
counts; where they wait in pinned host memory, training is unchanged."""

import dataclasses

import pytest

from megatron.stronghold import arguments, training
from megatron.stronghold.executor import boundaries as boundaries_module
from megatron.stronghold.executor import layer_major

pytestmark = pytest.mark.integration

TINY = ["--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "6",
        "--lr", "1e-3", "--mock-data", "--offload-method", "stronghold", "--resident-layers", "0",
        "--window-size", "2", "--seed", "3"]


def boundaries_of_one_step(monkeypatch, *flags):
    """Every tensor the streamed layers kept for backward during one step: their inputs (from the
    second layer on: the first one's come from the embedding) and the last layer's outputs."""
    seen = []
    forward, put = layer_major._forward, boundaries_module.Boundaries.put

    def recording_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen.extend(out[1])
        return out

    def recording_put(self, layer, inputs):
        if layer > 0:
            seen.extend(inputs)
        return put(self, layer, inputs)

    monkeypatch.setattr(layer_major, "_forward", recording_forward)
    monkeypatch.setattr(boundaries_module.Boundaries, "put", recording_put)
    training.train(arguments.parse_args([*TINY, "--train-iters", "1", *flags]))
    return seen


def test_recomputed_streamed_layers_keep_boundaries_without_graph(monkeypatch):
    # megatron-core runs bias-dropout-add under torch.enable_grad: without a detach each boundary
    # would hold its layer's dropout masks until backward
    seen = boundaries_of_one_step(monkeypatch, "--recompute-granularity", "full")
    assert len(seen) == 3 * 3
    assert all(t.grad_fn is None and not t.requires_grad for t in seen)


def test_without_recompute_the_boundaries_are_leaves_of_kept_graphs(monkeypatch):
    seen = boundaries_of_one_step(monkeypatch)
    assert len(seen) == 3 * 3
    assert all(t.grad_fn is None and t.requires_grad for t in seen)


def train(monkeypatch, on_host, *flags):
    """Stronghold with the boundaries where the test says (on a CPU the plan never spills them)."""
    preflight = training.preflight

    def placing(args, *a):
        plan, line = preflight(args, *a)
        return dataclasses.replace(plan, boundaries_on_host=on_host), line

    monkeypatch.setattr(training, "preflight", placing)
    kept = []
    build = layer_major.train_step

    def recording(model, executor, *a):
        kept.append(executor.boundaries)
        return build(model, executor, *a)

    monkeypatch.setattr(layer_major, "train_step", recording)
    history = training.train(arguments.parse_args([*TINY, "--train-iters", "6", "--recompute-granularity", "full",
                                                   *flags]))
    return history, kept[-1]


@pytest.mark.parametrize("resident", ["0", "1"])
def test_boundaries_in_host_memory_train_exactly_as_on_the_device(monkeypatch, resident):
    """Dropout on, three micro-batches per step: the same losses and norms (fp32) either way; the
    host holds one input per streamed layer and micro-batch, as the planner counts."""
    flags = ("--resident-layers", resident)
    on_device, kept_on_device = train(monkeypatch, False, *flags)
    on_host, kept_on_host = train(monkeypatch, True, *flags)
    assert on_host.losses == on_device.losses and on_host.grad_norms == on_device.grad_norms  # exact copies
    streamed = 3 - int(resident)
    hidden = 16 * 2 * 32 * 4  # s b h fp32
    assert kept_on_device.host_bytes() == 0
    assert kept_on_host.host_bytes() == streamed * 3 * hidden
    moved = on_host.stats["link"]["device-to-host"] - on_device.stats["link"]["device-to-host"]
    assert moved == 6 * streamed * 3 * hidden  # each input goes out once per step (and comes back once)
