"""Scheduling decisions of the StrongHold executor that the exactness tests cannot see (they change
when work happens, not what it computes)."""

import concurrent.futures
import threading

import pytest
import torch

from megatron.stronghold import arguments, model as model_lib, training
from megatron.stronghold.executor import StreamingExecutor


@pytest.fixture
def executor():
    args = arguments.parse_args(["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
                                 "--seq-length", "16", "--micro-batch-size", "2", "--mock-data"])
    training.init_distributed(torch.device("cpu"))
    model = model_lib.build_model(args, 128)
    ex = StreamingExecutor(list(model.decoder.layers)[1:], 2, torch.float32, torch.device("cpu"), args,
                           log=lambda *_: None)
    yield ex
    ex.shutdown()


def test_start_forward_does_not_wait_for_unfinished_cpu_steps(executor):
    # Layer 0's CPU step is still running (as after a clipped iteration). Steps finish in forward
    # order, so the loads are queued in that order too.
    step0 = concurrent.futures.Future()
    executor.weight_pending[0] = step0
    starter = threading.Thread(target=executor.start_forward)
    starter.start()
    starter.join(timeout=5)
    blocked = starter.is_alive()
    step0.set_result(None)  # let a blocked start_forward finish before failing
    starter.join()
    assert not blocked, "start_forward waited for a CPU step: the resident layers' forward would wait too"
    assert executor.slot_owner == [-1, -1] and executor.pending_start == [0, 1]
    executor.prefetch_ready()  # a resident layer's forward hook, once the step is done
    assert executor.slot_owner == [0, 1] and executor.pending_start == []


def test_no_guessing_in_the_iteration_after_clipping(executor):
    for group in executor.param_groups:  # what the LR scheduler sets
        group.update(lr=1e-3, weight_decay=0.0)

    def finish(coeff):
        executor.stats = {i: (1.0, True, False) for i in range(executor.num_layers)}
        executor.finish_step(coeff, skip=True)  # skipped: no CPU work queued, only the decision
        return executor.guessing

    assert finish(0.5) is False
    assert finish(1.0) is True
