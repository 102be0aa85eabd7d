"""How a run ends on signals (megatron/stronghold/run_control.py)."""

import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

TWO_SIGNALS = """
import os, signal, types
from megatron.stronghold.run_control import RunGuard
args = types.SimpleNamespace()
with RunGuard(args, save=None, log=print) as guard:
    os.kill(os.getpid(), signal.SIGINT)
    assert guard.received == signal.SIGINT  # the first: noted, the run goes on to save
    print("first noted", flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    print("still running after the second")
"""


def test_a_second_signal_stops_at_once_though_sigint_was_inherited_ignored():
    """A launcher's `setsid CMD &` starts the run with SIGINT ignored: the second Ctrl-C must still end it."""
    result = subprocess.run([sys.executable, "-c", TWO_SIGNALS], capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert "first noted" in result.stdout, result.stderr[-2000:]
    assert result.returncode == -signal.SIGINT, result.stdout + result.stderr[-2000:]
    assert "still running" not in result.stdout


def _failure(tmp_path, rank, exitcode, message=None):
    import json

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / f"error_{rank}.json"
    if message is not None:  # what run_control.report leaves there on a rank other than 0
        error_file.write_text(json.dumps({"message": message, "timestamp": 0}))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))


def test_torchrun_ends_with_the_workers_status_and_one_line(tmp_path, capsys):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from megatron.stronghold.torchrun import status_of

    # every rank refused the same input: rank 0 printed it, nothing more is said
    both = {0: _failure(tmp_path, 0, 2), 1: _failure(tmp_path, 1, 2, "the same message")}
    assert status_of(ChildFailedError("pretrain_gpt.py", both)) == 2 and capsys.readouterr().err == ""
    # rank 1 alone refused (its GPU's free memory): its message, from its error file
    alone = {1: _failure(tmp_path, 1, 2, "the model does not fit: 80.1 GiB needed")}
    assert status_of(ChildFailedError("pretrain_gpt.py", alone)) == 2
    assert capsys.readouterr().err.strip() == "error: rank 1: the model does not fit: 80.1 GiB needed"
    # a worker killed by the kernel: 128 + 9, named
    killed = {0: _failure(tmp_path, 0, -signal.SIGKILL)}
    assert status_of(ChildFailedError("pretrain_gpt.py", killed)) == 137
    assert "rank 0 ended with signal SIGKILL" in capsys.readouterr().err
    # rank 0 refused its input and torchrun stopped rank 1 with SIGTERM, stamped earlier: the refusal counts
    stopped = {0: _failure(tmp_path, 0, 2), 1: _failure(tmp_path, 1, -signal.SIGTERM)}
    stopped[1].timestamp = stopped[0].timestamp - 1
    assert status_of(ChildFailedError("pretrain_gpt.py", stopped)) == 2 and capsys.readouterr().err == ""
