"""CPU use of every thread of a training run, over its steady iterations, and the cores' clock.

    python tools/thread_cpu.py [--from-iteration 3] -- --num-layers 88 --bf16 --offload-method stronghold ...

Runs pretrain_gpt.py with the given flags (log interval 1 is added), reads /proc/PID/task/*/stat when
the log prints the iteration named by --from-iteration and again at the last iteration line, and
prints the process's CPU time per second of wall time between the two (/proc/PID/stat, which keeps
the time of threads that have ended), each thread's, busiest first, and the mean "cpu MHz" of the
cores at both moments. A profiler trace shows only the threads and ops it
records; this shows whether threads it does not see (OpenMP teams, CUDA's own) take the cores while
the main thread launches GPU work.
"""

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERATION = re.compile(r"^\s*iteration\s+(\d+)/")
TICKS = os.sysconf("SC_CLK_TCK")


def thread_times(pid: int) -> dict:
    """{thread id: (name, CPU seconds)} of a live process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / TICKS)  # utime + stime
    return out


def process_time(pid: int) -> float:
    """CPU seconds of the whole process, threads that have ended included (the per-thread files lose
    a thread's time when it exits: an OpenMP team made per parallel region would never show there)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def mean_mhz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
    except OSError:
        return float("nan")
    return sum(mhz) / len(mhz) if mhz else float("nan")


def report(first, last, seconds, pid, process_cpu) -> list:
    """Lines: the process's CPU use, then each thread alive at both snapshots, as % of one core,
    busiest first. process_cpu: the process's CPU seconds between the snapshots."""
    rows = []
    for tid, (name, cpu) in last.items():
        if tid in first:
            rows.append(((cpu - first[tid][1]) / seconds * 100, tid, name))
    rows.sort(reverse=True)
    total = process_cpu / seconds * 100
    elsewhere = max(0.0, total - sum(r[0] for r in rows))
    lines = [f"threads | window: {seconds:.2f} s | process CPU: {total:.0f}% of one core | "
             f"in threads that started or ended within the window: {elsewhere:.0f}% | "
             f"threads above 5%: {sum(r[0] > 5 for r in rows)} of {len(rows)} |"]
    for busy, tid, name in rows:
        if busy > 0.5:
            lines.append(f"  thread {tid}{' (main)' if tid == pid else ''} {name}: {busy:.0f}%")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-iteration", type=int, default=3, help="first snapshot at this iteration's log line")
    p.add_argument("flags", nargs="+", help="after --: pretrain_gpt.py flags")
    a = p.parse_args()
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *a.flags, "--log-interval", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    first = last = None
    for line in proc.stdout:
        sys.stdout.write(line)
        m = ITERATION.match(line)
        if m and int(m.group(1)) >= a.from_iteration:
            snapshot = (time.perf_counter(), thread_times(proc.pid), mean_mhz(), process_time(proc.pid))
            first = first or snapshot
            last = snapshot
    code = proc.wait()
    if first is None or last is first:
        print(f"thread_cpu: fewer than two iteration lines from iteration {a.from_iteration}: nothing to report",
              file=sys.stderr)
        return code or 1
    for line in report(first[1], last[1], last[0] - first[0], proc.pid, last[3] - first[3]):
        print(line)
    print(f"threads | cpu MHz, mean over the cores: {first[2]:.0f} at the first snapshot, {last[2]:.0f} at the last |")
    return code


if __name__ == "__main__":
    sys.exit(main())
