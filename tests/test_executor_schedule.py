"""Scheduling decisions of the StrongHold executor that the exactness tests cannot see (they change
when work happens, not what it computes)."""

import concurrent.futures
import threading

import pytest
import torch

from megatron.stronghold import arguments, distributed, model as model_lib, training
from megatron.stronghold.executor import StreamingExecutor
from megatron.stronghold.executor.cpu_worker import CpuWorker


@pytest.fixture
def executor():
    args = arguments.parse_args(["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
                                 "--seq-length", "16", "--micro-batch-size", "2", "--mock-data"])
    distributed.init_distributed(torch.device("cpu"))
    model = model_lib.build_model(args, 128)
    ex = StreamingExecutor(list(model.decoder.layers)[1:], 2, torch.float32, torch.device("cpu"), args,
                           log=lambda *_: None)
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


def test_no_guessing_in_the_iteration_after_clipping(executor):
    for group in executor.param_groups:  # what the LR scheduler sets
        group.update(lr=1e-3, weight_decay=0.0)

    def finish(coeff):
        executor.finish_step(coeff, skip=True)  # skipped: no CPU work queued, only the decision
        return executor.speculation.guessing

    assert finish(0.5) is False
    assert finish(1.0) is True


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


def test_cpu_optimizer_threads_under_torchrun(monkeypatch):
    # torchrun sets OMP_NUM_THREADS=1 in each rank; the CPU optimizer takes its share of the cores
    # instead, leaving one to the main thread.
    import os

    from megatron.stronghold.executor.cpu_worker import default_threads

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_threads() == max(1, cores - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert default_threads() == 1


def test_global_norm_does_not_wait_for_cpu_steps():
    # One micro-batch: each layer's norm is taken as its gradient leaves the compute device, so the
    # main thread has the global norm (and starts the next forward) while the CPU steps still run.
    from megatron.stronghold.data import build_data_iterators
    from megatron.stronghold.tokenizer import build_tokenizer
    from megatron.stronghold.dropout import DropoutSeeds
    from megatron.stronghold.executor import layer_major

    # A clip threshold every layer's norm passes: no layer guesses, whatever the initial weights.
    args = arguments.parse_args(["--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4",
                                 "--seq-length", "16", "--micro-batch-size", "2", "--mock-data",
                                 "--clip-grad", "1e-6"])
    distributed.init_distributed(torch.device("cpu"))
    torch.manual_seed(args.seed)
    model = model_lib.build_model(args, 128)
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
        batch = next(build_data_iterators(args, build_tokenizer(args))[0])
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
    expected = sum(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in (h.grad,)]))) ** 2
                   for h in ex.host)
    assert result[0][0] == pytest.approx(expected, rel=1e-5) and result[0][1]
    ex.finish_step(1.0, skip=False)
    ex.shutdown()
    assert ex.speculation.counts["deferred"] == 3  # stepped by their own CPU work with the published coefficient


def test_guesses_follow_arrival_order_not_the_worker_order(executor):
    # Backward handed over layer 2 (large gradient) before layers 1 and 0. The worker may take layer 0
    # first; it must still count layer 2's norm, or a run's guesses (and their inexact undo/redo)
    # would depend on thread timing.
    for group in executor.param_groups:
        group.update(lr=1e-3, weight_decay=0.0)
    assert executor.speculation.clip_grad == 1.0
    executor.sumsq_host.copy_(torch.tensor([0.01, 0.01, 4.0]))
    executor._update(0, 1.0, executor._hyperparameters(), executor.iteration, True)
    assert executor.speculation.decided[0] == "wait"
    executor.sumsq_host.copy_(torch.tensor([0.01, 0.01, 0.01]))
    executor._update(1, 1.0, executor._hyperparameters(), executor.iteration, True)
    assert executor.speculation.decided[1] == "guess"
