"""Scheduling decisions of the StrongHold executor that the exactness tests cannot see (they change
when work happens, not what it computes)."""

import concurrent.futures
import threading

import pytest
import torch

from megatron.stronghold import arguments, distributed, model as model_lib
from megatron.stronghold.executor import StreamingExecutor
from megatron.stronghold.executor.cpu_worker import CpuWorker

pytestmark = pytest.mark.unit


def _executor(*flags):
    args = arguments.parse_args(["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
                                 "--seq-length", "16", "--micro-batch-size", "2", "--mock-data", *flags])
    distributed.init_distributed(torch.device("cpu"))
    model = model_lib.build_model(args, 128)
    return StreamingExecutor(list(model.decoder.layers)[1:], 2, torch.float32, torch.device("cpu"), args,
                             log=lambda *_: None)


@pytest.fixture
def executor():
    ex = _executor()
    yield ex
    ex.shutdown()


def test_begin_step_does_not_wait_for_unfinished_cpu_steps(executor):
    # Layer 0's CPU step is still running (as after a clipped iteration): the embeddings must not
    # wait for it. Steps finish in forward order, so the loads are queued in that order too.
    step0 = concurrent.futures.Future()
    executor.weight_pending[0] = step0
    starter = threading.Thread(target=executor.begin_step, args=(1.0,))
    starter.start()
    starter.join(timeout=5)
    blocked = starter.is_alive()
    step0.set_result(None)  # let a blocked begin_step finish before failing
    starter.join()
    assert not blocked, "begin_step waited for a CPU step: the embeddings' forward would wait too"
    assert executor.slot_owner == [-1, -1] and executor.pending_start == [0, 1]
    executor.acquire(0)  # the first streamed layer's forward, once the step is done
    assert executor.slot_owner == [0, -1] and executor.pending_start == [1]
    executor.release(0)  # the rest of the first W, then the prefetch of layer 0 + W
    assert executor.slot_owner == [2, 1] and executor.pending_start == []


def _gradient(executor, norm):
    """A flat gradient for one streamed layer whose norm is `norm`."""
    grad = executor.new_gradient()
    grad.fill_(norm / grad.numel() ** 0.5)
    return grad


def _iteration(executor, norms):
    """One iteration's schedule up to the published coefficient: begin_step, each streamed layer's
    forward, then its gradient (norms[i] for layer i) handed over last to first, as backward does,
    while the CPU worker is held busy; then the worker runs and every layer's CPU work finishes.
    Returns {layer: "guess" | "wait"} as that CPU work decided, whether each layer's weights changed
    before the coefficient was published, and the order the worker ran the layers' CPU work in."""
    ran, cpu_work = [], executor._cpu_work

    def recording(i, *args):
        ran.append(i)
        return cpu_work(i, *args)

    executor._cpu_work = recording
    executor.begin_step(1.0)
    for i in range(executor.num_layers):
        executor.acquire(i)
        executor.release(i)
    before = [h.weights.clone() for h in executor.host]
    gate = threading.Event()
    executor.worker.submit(-1, gate.wait)
    try:
        for i in reversed(range(executor.num_layers)):
            executor.offload(i, _gradient(executor, norms[i]))
    finally:
        gate.set()
    for future in executor.grad_pending:
        future.result(timeout=30)
    del executor._cpu_work
    stepped = [not torch.equal(b, h.weights) for b, h in zip(before, executor.host)]
    return dict(executor.speculation.decided), stepped, ran


def _hyperparameters(executor):
    for group in executor.param_groups:  # what the LR scheduler sets
        group.update(lr=1e-3, weight_decay=0.0)


def test_with_clipping_every_layer_waits_for_the_norm(executor):
    _hyperparameters(executor)
    # Norms far under clip-grad 1.0: still no layer steps before the coefficient is published.
    decided, stepped, _ = _iteration(executor, [0.01] * 3)
    assert decided == {2: "wait", 1: "wait", 0: "wait"} and stepped == [False] * 3
    executor.finish_step(1.0, skip=False)
    executor._wait_all()
    assert executor.speculation.counts == {"kept": 0, "deferred": 3}
    assert all(h.parts[0]["step"] == 1 for h in executor.host)


def _run_in_order(worker, arrivals, ready=None):
    """Hold the worker busy while `arrivals` (layer numbers) are queued; return the order they ran in."""
    gate, ran = threading.Event(), []
    worker.submit(99, gate.wait)
    futures = [worker.submit(layer, ran.append, layer, ready=(ready or {}).get(layer)) for layer in arrivals]
    gate.set()
    for f in futures:
        f.result(timeout=5)
    return ran


def test_cpu_worker_steps_the_lowest_pending_layer_first():
    # Backward hands layers over last-to-first; the next forward needs layer 0 first.
    worker = CpuWorker(1)
    try:
        assert _run_in_order(worker, [3, 2, 1, 0]) == [0, 1, 2, 3]
        # Work whose gradient copy has not landed is passed over for work that can start now.
        assert _run_in_order(worker, [3, 2, 1], ready={1: lambda: False}) == [2, 3, 1]
    finally:
        worker.shutdown()


def test_cpu_worker_hands_errors_to_the_waiter():
    worker = CpuWorker(1)
    try:
        with pytest.raises(ZeroDivisionError):
            worker.submit(0, lambda: 1 / 0).result(timeout=5)
        assert worker.submit(1, lambda: "still running").result(timeout=5) == "still running"
    finally:
        worker.shutdown()


def test_cpu_optimizer_threads_are_the_ranks_share_of_its_cores_less_one(monkeypatch):
    # The cores this process may run on, divided among torchrun's LOCAL_WORLD_SIZE ranks, less one
    # for each rank's main thread. OMP_NUM_THREADS (torchrun sets 1 in every rank) is not read: it
    # would leave the CPU optimizer a single core.
    import os

    from megatron.stronghold.executor.cpu_worker import default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    for omp in (None, "1", "4"):
        if omp is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", omp)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert default_threads() == 15, omp
        for ranks, threads in (("1", 15), ("2", 7), ("4", 3), ("8", 1), ("16", 1), ("64", 1)):
            monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
            assert default_threads() == threads, (omp, ranks)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})  # a taskset or cgroup mask
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_threads() == 2


def test_global_norm_does_not_wait_for_cpu_steps():
    # One micro-batch: each layer's norm is taken as its gradient leaves the compute device, so the
    # main thread has the global norm (and starts the next forward) while the CPU steps still run.
    from megatron.stronghold.data import build_data_iterators
    from megatron.stronghold.tokenizer import build_tokenizer
    from megatron.stronghold.dropout import DropoutSeeds
    from megatron.stronghold.executor import layer_major

    # A clip threshold every layer's norm passes: no layer guesses, whatever the initial weights.
    # No dropout, so that plain autograd on a copy of the model gives the reference gradients.
    args = arguments.parse_args(["--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4",
                                 "--seq-length", "16", "--micro-batch-size", "2", "--mock-data",
                                 "--clip-grad", "1e-6", "--hidden-dropout", "0", "--attention-dropout", "0"])
    distributed.init_distributed(torch.device("cpu"))
    torch.manual_seed(args.seed)
    model = model_lib.build_model(args, 128)
    batch = next(build_data_iterators(args, build_tokenizer(args))[0])
    reference = model_lib.build_model(args, 128)
    reference.load_state_dict(model.state_dict())
    model_lib.lm_loss(reference, batch).backward()
    expected = sum(float(p.grad.double().square().sum())
                   for layer in reference.decoder.layers for p in layer.parameters())
    streamed = list(model.decoder.layers)
    ex = StreamingExecutor(streamed, 2, torch.float32, torch.device("cpu"), args, log=lambda *_: None)
    for group in ex.param_groups:
        group.update(lr=1e-3, weight_decay=0.0)
    gate = threading.Event()
    try:
        ex.worker.submit(-1, gate.wait)  # the CPU optimizer is busy
        seeds = DropoutSeeds(args.seed)
        seeds.install(model)
        ex.begin_step(1.0)
        layer_major.train_step(model, ex, [], [], [batch], 1.0, seeds)
        result = []
        reader = threading.Thread(target=lambda: result.append(ex.gradient_stats()))
        reader.start()
        reader.join(timeout=10)
        steps_pending = [f.done() for f in ex.grad_pending]
    finally:
        gate.set()
        reader.join()
    assert result, "the global norm waited for the CPU steps"
    assert steps_pending == [False] * 3
    # The sum of squares of the streamed layers' gradients, as plain autograd has them.
    assert expected > 0 and result[0][0] == pytest.approx(expected, rel=1e-5) and result[0][1]
    ex.finish_step(1.0, skip=False)
    ex.shutdown()
    assert ex.speculation.counts["deferred"] == 3  # stepped by their own CPU work with the published coefficient


def test_guesses_follow_arrival_order_not_the_worker_order():
    # Backward hands layers over 2, 1, 0; the worker, held busy meanwhile, then takes layer 0 first.
    # Each layer's guess must count the norms of the layers handed over before it and its own, never
    # those the worker happened to run first nor those that arrived after it, or a run's guesses would
    # depend on thread timing. Without clipping a layer waits only behind a non-finite norm.
    executor = _executor("--clip-grad", "0")
    try:
        _hyperparameters(executor)
        decided, stepped, ran = _iteration(executor, [0.01, float("inf"), 0.01])
        assert ran == [0, 1, 2]  # lowest layer first: not the order the norms arrived in
        assert decided == {2: "guess", 1: "wait", 0: "wait"} and stepped == [False, False, True]
        executor.finish_step(1.0, skip=True)
        assert executor.speculation.counts == {"kept": 1, "deferred": 2}
    finally:
        executor.shutdown()
