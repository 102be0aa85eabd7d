"""tools/thread_cpu.py: per-thread CPU use of a run's steady iterations (to find host contention)."""

import os
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import thread_cpu  # noqa: E402

linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc")


@pytest.mark.unit
@linux_only
def test_cpu_optimizer_thread_and_its_openmp_team_are_named():
    from megatron.stronghold.executor.cpu_worker import CpuWorker

    worker = CpuWorker(2)
    worker.submit(0, lambda: torch.randn(2_000_000).mul_(2).sum()).result()
    time.sleep(0.05)
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    worker.shutdown()
    assert "stronghold-adam" in names


@pytest.mark.integration
@linux_only
def test_reports_each_busy_thread_over_the_steady_iterations():
    cmd = [sys.executable, os.path.join(ROOT, "tools", "thread_cpu.py"), "--from-iteration", "2", "--",
           "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
           "--micro-batch-size", "2", "--train-iters", "8", "--mock-data"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = re.search(r"threads \| window: ([0-9.]+) s \| process CPU: (\d+)% of one core", proc.stdout)
    main = re.search(r"thread \d+ \(main\) \S+: (\d+)%", proc.stdout)
    assert summary and main, proc.stdout[-2000:]
    assert float(summary.group(1)) > 0 and int(summary.group(2)) >= int(main.group(1)) > 10


@pytest.mark.unit
def test_time_of_threads_that_did_not_live_through_the_window_is_counted_apart():
    """A thread team made per parallel region never appears in both per-thread snapshots; the
    process's own counter keeps its time, and the report shows it."""
    first = {1: ("python3", 10.0), 2: ("pt_autograd_0", 5.0)}
    last = {1: ("python3", 15.0), 2: ("pt_autograd_0", 9.0), 3: ("stronghold-adam", 1.0)}
    lines = thread_cpu.report(first, last, 10.0, 1, process_cpu=20.0)
    assert lines[0].startswith("threads | window: 10.00 s | process CPU: 200% of one core | "
                               "in threads that started or ended within the window: 110% |")
    assert lines[1:] == ["  thread 1 (main) python3: 50%", "  thread 2 pt_autograd_0: 40%"]


@pytest.mark.unit
@linux_only
def test_the_process_counter_keeps_the_time_of_ended_threads():
    import threading

    before = thread_cpu.process_time(os.getpid())
    spin = threading.Thread(target=lambda: sum(i * i for i in range(3_000_000)))
    spin.start()
    spin.join()
    assert thread_cpu.process_time(os.getpid()) - before > 0.05
