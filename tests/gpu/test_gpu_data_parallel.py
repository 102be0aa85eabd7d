"""Two GPUs (skipped with fewer): data parallelism with streamed layers (each owned by one rank: its
gradient summed onto the owner and its weights broadcast from it over NCCL) trains like one process
at the same global batch."""

import pytest
import torch

from tests.test_data_parallel import run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

# Every layer streamed through a window of one, so every layer's gradient takes the averaging path.
STREAMED = ("--window-size", "1", "--resident-layers", "0")


def test_two_gpus_train_like_one_in_fp32():
    one_loss, one_norm, _ = run(1, "stronghold", *STREAMED)
    two_loss, two_norm, _ = run(2, "stronghold", *STREAMED)
    assert two_loss == pytest.approx(one_loss, rel=1e-5)
    assert two_norm == pytest.approx(one_norm, rel=1e-5)


def test_two_gpus_train_like_one_in_bf16():
    one_loss, _, _ = run(1, "stronghold", "--bf16", *STREAMED)
    two_loss, _, _ = run(2, "stronghold", "--bf16", *STREAMED)
    assert two_loss == pytest.approx(one_loss, rel=2e-2)
    assert two_loss[-1] < two_loss[0]
