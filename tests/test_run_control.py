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
