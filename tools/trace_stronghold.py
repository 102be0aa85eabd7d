"""Chrome trace of steady-state StrongHold iterations (torch profiler), to see the overlap.

    python tools/trace_stronghold.py --out results/trace -- --num-layers 32 --bf16 --resident-layers 0
Open OUT/trace.json in chrome://tracing or https://ui.perfetto.dev: the H2D and D2H copy streams
and the "stronghold-cpu-adam" thread's `adamw_step` ranges should run under the compute stream's
kernels. Also prints how much of the copy and CPU-step time falls inside GPU compute.
"""

import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.stronghold import arguments, training  # noqa: E402
from megatron.stronghold.executor import host_store  # noqa: E402


def _label_cpu_steps():
    """Name each CPU step in the trace (the profiler sees its torch ops, not what they are for)."""
    step = host_store.HostLayer.step

    def labelled(self, *a, **kw):
        with record_function("stronghold.cpu_step"):
            return step(self, *a, **kw)

    host_store.HostLayer.step = labelled


def overlap_report(path):
    with open(path) as f:
        events = [e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel")

    def covered(start, end):
        total = 0.0
        for ks, ke in kernels:
            if ke <= start or ks >= end:
                continue
            total += min(end, ke) - max(start, ks)
        return total

    # Where the GPU sat idle: gaps between kernels, and the longest ones with the host ops under them.
    busy, gaps = [], []
    for ks, ke in kernels:
        if busy and ks <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], ke)
        else:
            if busy:
                gaps.append((ks - busy[-1][1], busy[-1][1], ks))
            busy.append([ks, ke])
    if busy:
        span = busy[-1][1] - busy[0][0]
        idle = sum(g for g, _, _ in gaps)
        print(f"GPU kernels: {span / 1e3:.1f} ms from first to last, idle {idle / 1e3:.1f} ms "
              f"({idle / span:.0%}) in {len(gaps)} gaps")
        host = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
        for g, a, b in sorted(gaps, reverse=True)[:8]:
            under = sorted({e["name"] for e in host if e["ts"] <= b and e["ts"] + e["dur"] >= a
                            and e["dur"] >= 0.5 * g}, key=len)[:4]
            print(f"  gap {g / 1e3:.2f} ms at +{(a - busy[0][0]) / 1e3:.1f} ms; long host ops: {', '.join(under) or '-'}")
    for name, pick in (("copies", lambda e: e.get("cat") == "gpu_memcpy"),
                       ("CPU steps", lambda e: e.get("name") == "stronghold.cpu_step")):
        spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if pick(e)]
        busy = sum(b - a for a, b in spans)
        inside = sum(covered(a, b) for a, b in spans)
        share = f"{inside / busy:.0%}" if busy else "-"
        print(f"{name}: {len(spans)} ranges, {busy / 1e3:.1f} ms, {share} of it during GPU kernels")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "results", "trace"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--active", type=int, default=2)
    p.add_argument("flags", nargs="*", help="after --: pretrain_gpt.py flags")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    _label_cpu_steps()
    args = arguments.parse_args(["--offload-method", "stronghold", "--mock-data", "--log-interval", "1",
                                 "--train-iters", str(a.warmup + a.active), *a.flags])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    path = os.path.join(a.out, "trace.json")
    try:  # the CPU steps run on the optimizer thread, which the profiler skips by default
        config = {"experimental_config": torch._C._profiler._ExperimentalConfig(profile_all_threads=True)}
    except (AttributeError, TypeError):
        config = {}
    with profile(activities=activities, schedule=schedule(wait=0, warmup=a.warmup, active=a.active),
                 on_trace_ready=lambda prof: prof.export_chrome_trace(path), **config) as prof:
        # one profiler step per iteration
        training.train(args, observer=lambda event, **_: prof.step() if event == "iteration" else None)
    print(f"trace: {path}")
    overlap_report(path)


if __name__ == "__main__":
    main()
