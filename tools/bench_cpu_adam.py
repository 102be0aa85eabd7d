"""Per-layer CPU AdamW update rates on this machine (the benchmark of stronghold_ext/fused_adamw.cpp).

For N parameters (default 50M, one GPT layer at hidden 2048) it times, with torch.get_num_threads()
threads (or --threads), the median of --reps steps of:
  (a) torch.optim.AdamW(fused=True) alone, fp32 gradient                         -- the reference rate
  (b) today's host update: bf16 grad -> fp32 scratch copy, (a), fp32 master -> bf16 weights copy
  (c) stronghold_ext kernel: bf16 grad in, bf16 weights out, one pass
  (d) stronghold_ext kernel: fp32 grad in, no weights out (same work as (a))
  (e) stronghold_ext kernel, remainder master (bf16 weights read and written + int16 remainder +
      ties, master=None), fp32 moments, bf16 grad
  (f) as (e) with bf16 moments
  (g) the torch fallback of (f), stronghold_ext.adamw_step_torch
and prints G params/s with the ratio to (a) and to (c) (today's layout through the kernel), and the
bytes each moves per parameter: (a) 28, (b) 40, (c) 28, (d) 28, (e) 26, (f) 18; (g) about 164, the
sum over its torch passes (join into an fp32 scratch, widen grad and moments, (a), narrow, split).
The update is memory bound on a many-core host, where (f)/(c) approaches 28/18; on a few cores it
is bounded by arithmetic (two divisions and a square root per element) as much as by memory.

    python tools/bench_cpu_adam.py [--numel 50000000] [--reps 9] [--threads 16]
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import stronghold_ext  # noqa: E402
from stronghold_ext.remainders import split_master  # noqa: E402

LR, BETAS, EPS, WD = 1e-4, (0.9, 0.95), 1e-8, 0.1


def timed(fns, reps, warmup):
    """Median seconds per call of each fn; the reps go round-robin so load on the machine spreads evenly."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=50_000_000)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, threads = args.numel, torch.get_num_threads()

    t0 = time.perf_counter()
    ext = stronghold_ext.fused_adamw()
    t_load = time.perf_counter() - t0

    torch.manual_seed(0)
    master = torch.randn(n) * 0.02
    grad32 = torch.randn(n) * 1e-3
    grad16 = grad32.to(torch.bfloat16)
    weights = master.to(torch.bfloat16)
    scratch = torch.empty(n)

    opt = torch.optim.AdamW([master], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    master.grad = grad32
    opt.step()  # creates the state
    st = opt.state[master]
    exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]

    def torch_alone():
        master.grad = grad32
        opt.step()

    def host_today():
        master.grad = scratch.copy_(grad16)
        opt.step()
        weights.copy_(master)

    def kernel(grad, out):
        def run():
            st["step"] += 1
            ext.adamw_step(master, exp_avg, exp_avg_sq, grad, out, LR, BETAS[0], BETAS[1], EPS, WD,
                           int(st["step"]), 1.0)
        return run

    # The remainder master: the rows below share it (each call steps it and carries its ties).
    rem_weights, remainder, ties = split_master(master)
    rem = {"ties": ties}
    exp_avg16, exp_avg_sq16 = exp_avg.bfloat16(), exp_avg_sq.bfloat16()

    def remainder_step(fn, m, v):
        def run():
            st["step"] += 1
            rem["ties"] = fn(None, m, v, grad16, rem_weights, LR, BETAS[0], BETAS[1], EPS, WD, int(st["step"]),
                             1.0, scratch=scratch, remainder=remainder, ties=rem["ties"])
        return run

    rows = [("(a) torch AdamW(fused) fp32 grad", torch_alone, 28),
            ("(b) host today: bf16->fp32 + (a) + ->bf16", host_today, 40)]
    if ext is not None:
        rows += [("(c) stronghold_ext: bf16 grad, bf16 out", kernel(grad16, weights), 28),
                 ("(d) stronghold_ext: fp32 grad, no out", kernel(grad32, None), 28),
                 ("(e) stronghold_ext: remainders, fp32 m, v", remainder_step(stronghold_ext.adamw_step, exp_avg,
                                                                            exp_avg_sq), 26),
                 ("(f) stronghold_ext: remainders, bf16 m, v", remainder_step(stronghold_ext.adamw_step, exp_avg16,
                                                                            exp_avg_sq16), 18)]
    rows.append(("(g) torch fallback of (f)", remainder_step(stronghold_ext.adamw_step_torch, exp_avg16,
                                                             exp_avg_sq16), 164))
    times = timed([fn for _, fn, _ in rows], args.reps, args.warmup)
    results = [(name, t, nbytes) for (name, _, nbytes), t in zip(rows, times)]
    master.grad = None

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "?") if os.path.exists("/proc/cpuinfo") else "?"
    print(f"CPU: {cpu}; threads {threads}; N = {n / 1e6:.1f}M params; median of {args.reps} (round-robin); torch {torch.__version__}")
    if ext is None:
        reason = stronghold_ext.load_errors.get("stronghold_fused_adamw", "?")
        print(f"stronghold_ext kernel unavailable ({reason}): rows (c) to (f) skipped")
    else:
        print(f"extension load: {t_load:.1f} s (includes the compile when the build cache was cold)")
    ref = results[0][1]
    today = next((t for name, t, _ in results if name.startswith("(c)")), None)
    print(f"{'':44s} {'ms':>8s} {'G params/s':>11s} {'vs (a)':>7s} {'vs (c)':>7s} {'B/param':>8s}")
    for name, t, nbytes in results:
        vs_today = f"{today / t:7.2f}" if today else f"{'-':>7s}"
        print(f"{name:44s} {t * 1e3:8.2f} {n / t / 1e9:11.3f} {ref / t:7.2f} {vs_today} {nbytes:8d}")


if __name__ == "__main__":
    main()
