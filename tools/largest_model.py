"""Largest trainable model per method, by bisection over the number of layers.

Trainable means: at least --iters iterations finish with a finite loss. Every trial runs in its own
process (an out-of-memory kill cannot take the search down, and memory is clean for the next one),
and the planner's pre-flight check turns most too-large trials into a refusal within seconds.

The search gallops from a first size (up by 1, 2, 4, ... while trials succeed, down by 1, 2, 4, ...
while they fail) and then bisects. `--start planner` seeds it with the capacity that the method's pre-flight
check admits on this machine (for the ZeRO baselines, the bytes DeepSpeed certainly keeps), so an
accurate check costs two trials (capacity, then capacity + 1) instead of a dozen;
a trial above the plan is still tried, and refused by the same pre-flight check if it cannot fit.

    python tools/largest_model.py --method stronghold --hidden 2048 --heads 16 --seq 1024 --batch 4 \
        --out results/case1

Writes OUT/largest_<method>.csv (columns: method, largest layers, params (B), peak GPU (GiB),
peak host (GiB), card) and one log per trial.
"""

import argparse
import csv
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.stronghold.logs import parse_log  # noqa: E402


def trained(log, iters) -> bool:
    """At least `iters` iterations with a finite loss, and the run's summary line (it ended normally)."""
    losses = [row.get("lm loss") for row in log.iterations]
    return (bool(log.summary) and len(losses) >= iters
            and all(isinstance(x, float) and math.isfinite(x) for x in losses))


def trial(a, layers, log_dir):
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--num-layers", str(layers),
           "--hidden-size", str(a.hidden), "--num-attention-heads", str(a.heads), "--seq-length", str(a.seq),
           "--micro-batch-size", str(a.batch), "--train-iters", str(a.iters), "--log-interval", "1",
           "--mock-data", "--offload-method", a.method, *a.extra]
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=a.timeout)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out, code = out + "\ntimed out", None
    with open(os.path.join(log_dir, f"log_{a.method}_l-{layers}_hs-{a.hidden}_bs-{a.batch}.txt"), "w") as f:
        f.write(out)
    log = parse_log(out)
    ok, why = outcome(log, out, code, a)
    print(f"{a.method}: {layers} layers -> {why} ({time.time() - start:.0f} s)", flush=True)
    if code is None and not ok:
        raise TimedOut(layers)
    return ok, log


def outcome(log, out, code, a):
    """(trained?, why) of one trial; `code` is None for a trial stopped at --timeout. A trial that printed
    its summary has trained even if its exit ran past the timeout (zero-infinity at 85 layers on an H100
    trained in 200 s and was still tearing down its 100 GiB of host memory at the 240 s timeout)."""
    if trained(log, a.iters) and code in (0, None):
        return True, "ok" if code == 0 else f"ok (trained; its exit ran past the {a.timeout} s timeout)"
    return False, ("refused: does not fit" if "does not fit" in out else
                   "out of memory" if "out of memory" in out.lower() else
                   f"timed out after {a.timeout} s" if code is None else f"failed (exit {code})")


def from_logs(a):
    """The search's answer from the trial logs already in --out (a search cut short by the caller, or
    trials from several calls): (largest that trained, its log, the next size when that was not shown
    to fail, else None)."""
    pattern = re.compile(rf"log_{re.escape(a.method)}_l-(\d+)_hs-{a.hidden}_bs-{a.batch}\.txt$")
    outcomes = {}
    for name in os.listdir(a.out):
        m = pattern.match(name)
        if m:
            with open(os.path.join(a.out, name), errors="replace") as f:
                log = parse_log(f.read())
            outcomes[int(m.group(1))] = (trained(log, a.iters), log)
    if not outcomes:
        raise SystemExit(f"largest_model: no trial log of {a.method} (log_{a.method}_l-N_hs-{a.hidden}_bs-"
                         f"{a.batch}.txt) in {a.out}")
    best = max((n for n, (ok, _) in outcomes.items() if ok), default=0)
    failed_above = min((n for n, (ok, _) in outcomes.items() if not ok and n > best), default=None)
    return best, outcomes[best][1] if best else None, None if failed_above == best + 1 else best + 1


class TimedOut(Exception):
    """A trial ran past --timeout, or the next one would end past --budget: the size neither fits nor
    fails, so the search stops there."""


def planned_capacity(a) -> int:
    """Most layers the method's pre-flight check (the planner's, for stronghold) admits on this machine."""
    import torch

    from megatron.stronghold import arguments
    from megatron.stronghold.planner import ModelCosts, available_memory, layers_that_fit

    args = arguments.parse_args(["--num-layers", "1", "--hidden-size", str(a.hidden), "--num-attention-heads",
                                 str(a.heads), "--seq-length", str(a.seq), "--micro-batch-size", str(a.batch),
                                 *a.extra])
    costs = ModelCosts.of(args, 50304)  # GPT-2's padded vocabulary, as the mock data uses
    gpu, host = available_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return max(1, layers_that_fit(costs, gpu, host, a.method))


def search(a, start):
    """Gallop from `start` to the first change of outcome, then bisect. Returns (largest layer count that
    trained, its log, None), or, if time ran out (TimedOut), what was found up to then and the layer count
    it stopped at."""
    found = {"layers": 0, "log": None}
    began, longest = time.time(), [0.0]

    def fits(layers):
        elapsed = time.time() - began
        if a.budget and elapsed + longest[0] > a.budget:  # the next trial would not finish in time
            raise TimedOut(layers)
        t0 = time.time()
        ok, log = trial(a, layers, a.out)
        longest[0] = max(longest[0], time.time() - t0)
        if ok and layers > found["layers"]:
            found.update(layers=layers, log=log)
        return ok

    try:
        lo, hi = 0, None
        if fits(start):  # gallop up: start + 1, + 2, + 4, ... until the first failure
            lo, step = start, 1
            while hi is None and lo + step <= a.max_layers:
                if fits(lo + step):
                    lo, step = lo + step, step * 2
                else:
                    hi = lo + step
        else:  # gallop down: start - 1, - 2, - 4, ... until the first success (a seed from the
            # pre-flight check is close above the edge: the trial process sees a little less memory)
            hi, step = start, 1
            while start - step > 0:
                if fits(start - step):
                    lo = start - step
                    break
                hi, step = start - step, step * 2
        hi = hi or a.max_layers + 1
        while hi - lo > 1:  # then bisect
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    except TimedOut as exc:
        return found["layers"], found["log"], exc.args[0]
    return found["layers"], found["log"], None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--start", default="8", help="first size tried, or 'planner': the most layers the method's "
                   "pre-flight check admits on this machine (every method; for ZeRO, the bytes DeepSpeed surely keeps)")
    p.add_argument("--max-layers", default="4096", help="largest size tried, or 'planner': the pre-flight "
                   "check's capacity (with --start planner: one trial there, and smaller ones only if it fails)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per trial; a trial past it before its "
                   "summary ends the search, whose result is then a lower bound (the CSV's search column); one "
                   "that printed its summary has trained, however long its exit takes")
    p.add_argument("--budget", type=int, default=0, help="seconds for the whole search (0: no limit): it stops "
                   "before a trial that would not finish in time (judged by the longest trial so far), with a "
                   "lower bound, as after --timeout")
    p.add_argument("--from-logs", action="store_true", help="run no trial: write the CSV from the trial logs "
                   "already in --out (a search that was cut short, or one spread over several calls)")
    p.add_argument("--out", default=os.path.join(ROOT, "results"))
    p.add_argument("extra", nargs="*", help="after --: more pretrain_gpt.py flags for every trial "
                   "(default: --bf16 --recompute-granularity full, which lets every method go largest)")
    a = p.parse_args()
    a.extra = a.extra or ["--bf16", "--recompute-granularity", "full"]
    os.makedirs(a.out, exist_ok=True)

    if a.from_logs:
        best, best_log, stopped_at = from_logs(a)
    else:
        capacity = planned_capacity(a) if "planner" in (a.start, a.max_layers) else None
        a.max_layers = capacity if a.max_layers == "planner" else int(a.max_layers)
        start = min(capacity if a.start == "planner" else int(a.start), a.max_layers)
        print(f"{a.method}: first trial at {start} layers", flush=True)
        best, best_log, stopped_at = search(a, start)

    summary = best_log.summary if best_log else {}
    device = best_log.config.get("device", "") if best_log else ""
    card = device[len("cuda ("):-1] if device.startswith("cuda (") else device.split(" ")[0]
    row = {"method": a.method, "largest layers": best,
           "params (B)": round(best_log.total_parameters / 1e9, 6) if best_log else 0,
           "peak GPU (GiB)": summary.get("peak GPU memory (GiB)", ""),
           "peak host (GiB)": summary.get("peak host RSS (GiB)", ""), "card": card,
           "hidden": a.hidden, "batch": a.batch,
           # a search cut short (--timeout, --budget, or trial logs that stop short) gives a lower bound
           "search": "complete" if stopped_at is None else f"stopped at {stopped_at} layers: at least {best}"}
    path = os.path.join(a.out, f"largest_{a.method}.csv")
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    os.replace(path + ".tmp", path)
    answer = (f"largest trainable {best} layers ({row['params (B)']} B parameters) on {card}" if best
              else "no trial trained")
    print(f"{a.method}: {answer}; search {row['search']}; {path}")


if __name__ == "__main__":
    main()
