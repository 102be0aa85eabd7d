"""CI's skip gate (.ci/skips.py): only a missing CUDA GPU may skip a test."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

GATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ci", "skips.py")
GPU_SKIPS = """
======================== short test summary info ========================
SKIPPED [7] tests/gpu/test_gpu_training.py: needs a CUDA GPU
SKIPPED [1] tests/test_zero_baselines.py:119: without a CUDA GPU only: DeepSpeed supports fp16 on CUDA
"""


def gate(tmp_path, output):
    path = tmp_path / "pytest.txt"
    path.write_text(output)
    return subprocess.run([sys.executable, GATE, str(path)], capture_output=True, text=True)


def test_gpu_skips_pass_the_gate(tmp_path):
    assert gate(tmp_path, GPU_SKIPS + "123 passed, 8 skipped\n").returncode == 0


@pytest.mark.parametrize("reason", ["could not import 'deepspeed': No module named 'deepspeed'",
                                    "stronghold_ext kernel unavailable: g++ not found"])
def test_any_other_skip_fails_the_gate(tmp_path, reason):
    result = gate(tmp_path, GPU_SKIPS + f"SKIPPED [1] tests/test_x.py:3: {reason}\n")
    assert result.returncode == 1 and reason in result.stderr
