"""A failed CPU optimizer step stops the run with the layer and the cause; a dead CPU-optimizer
thread never leaves the main thread waiting (faults injected into the real executor)."""

import concurrent.futures
import threading
import time

import pytest

from megatron.stronghold import training
from megatron.stronghold.executor import cpu_worker, host_store
from megatron.stronghold.executor.cpu_worker import CpuStepError, CpuWorker

pytestmark = pytest.mark.unit

FLAGS = ["--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--mock-data", "--lr", "3e-2", "--train-iters", "6", "--log-interval", "1",
         "--offload-method", "stronghold", "--resident-layers", "0", "--window-size", "2"]


def _fail_on_call(monkeypatch, n):
    """HostLayer.step raises on its n-th call (the host store's AdamW), half way through: the step
    count has moved, as a failure inside the kernel would leave it."""
    calls, step = [0], host_store.HostLayer.step

    def failing(self, hyper, grad_scale, scratch):
        calls[0] += 1
        if calls[0] == n:
            self.parts[0]["step"] += 1
            raise MemoryError("injected: the host store's AdamW failed")
        return step(self, hyper, grad_scale, scratch)
    monkeypatch.setattr(host_store.HostLayer, "step", failing)


# With clipping the layers step after the norm is known (in finish_step's work); without, as their
# gradients arrive: a failure in the first and in a later iteration of each.
@pytest.mark.parametrize("clip,call", [("1.0", 1), ("1.0", 4), ("0", 1), ("0", 4)])
def test_a_failed_cpu_step_stops_the_run_naming_the_layer(monkeypatch, capsys, clip, call):
    _fail_on_call(monkeypatch, call)
    status = training.main([*FLAGS, "--clip-grad", clip])
    out, err = capsys.readouterr()
    assert status == 1
    assert "MemoryError: injected" in err  # the cause's traceback stays
    last = err.strip().splitlines()
    message = next(line for line in last if line.startswith("error: "))
    assert "CPU optimizer step of transformer layer" in message and "injected" in message
    # No iteration is logged after the failed one: nothing trained on the damaged state.
    iterations = [line for line in out.splitlines() if line.lstrip().startswith("iteration ")]
    assert len(iterations) <= 2


def test_a_worker_thread_that_dies_outside_a_step_fails_its_queued_work():
    worker = CpuWorker(1)
    started, gate = threading.Event(), threading.Event()
    held = worker.submit(0, lambda: started.set() or gate.wait())
    started.wait(timeout=5)  # the held work runs: the poll below happens when it ends
    queued = worker.submit(1, lambda: "never runs", ready=lambda: 1 / 0)  # the readiness poll raises
    gate.set()
    assert held.result(timeout=5) is True
    with pytest.raises(ZeroDivisionError):
        queued.result(timeout=5)
    worker._thread.join(timeout=5)
    assert not worker.alive
    with pytest.raises(CpuStepError, match="thread died: ZeroDivisionError"):
        worker.submit(2, lambda: None)


def test_a_thread_that_dies_at_start_ends_the_executor_wait(monkeypatch):
    from megatron.stronghold.executor.streaming import StreamingExecutor

    def broken(_):
        raise OSError("injected: the thread could not start")
    monkeypatch.setattr(cpu_worker, "_name_os_thread", broken)
    ex = StreamingExecutor.__new__(StreamingExecutor)  # only the wait is under test
    ex.worker, ex.layers, ex.timers = CpuWorker(1), [object()], {"waits for cpu": 0.0}
    ex.worker._thread.join(timeout=5)
    never = concurrent.futures.Future()  # work handed over before the thread died, never to run
    start = time.perf_counter()
    with pytest.raises(CpuStepError, match="stopped before streamed layer 0"):
        ex._wait([never], 0)
    assert time.perf_counter() - start < 5
