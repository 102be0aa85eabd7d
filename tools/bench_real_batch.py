"""Real training batches on one GPU: stronghold beside megatron-lm, megatron-core's optimizer offload
(megatron-offload) and zero-offload, measured in one run of this tool.

Hidden 2048, 16 heads, sequence 1024, bf16, mock data; global batch 64 unless a row says otherwise.
Each row is one pretrain_gpt.py run; a case compares its rows by the median iteration time of the
iterations after the first two (and by model TFLOP/s where the sizes differ), and prints the plan's
predicted iteration beside each stronghold run.

    python tools/bench_real_batch.py --out results/h200/real-batch [--cases 1 2 3 4 5 6 7 8] [--iters 8]
    [--baseline-tree DIR]   (case 4: the code before the layer-major schedule, e.g. a `git archive` of it)
    [--override FLAGS]      (appended to every run, e.g. smaller sizes for a smoke test on a CPU)
    [--budget S]            (start no row once the next one, as long as the longest so far, would end past S s)
    [--resume CSV]          (take the rows an earlier run of the tool measured from its real_batch.csv: a sweep
                             longer than one machine call continues where the last call stopped)

Cases (the issue's benchmark):
 1. 32 layers all streamed, micro-batch 4: stronghold vs megatron-lm with full recompute at micro-batch 4
    (target <= 1.15x) and vs zero-offload at micro-batch 4 (target >= 1.25x faster); megatron-offload beside.
 2. 32 layers all streamed, micro-batch 16, full recompute: vs megatron-lm at the same (target <= 1.10x);
    megatron-offload beside.
 3. 200 layers in the planner's default placement, micro-batch 8, full recompute: model TFLOP/s vs
    megatron-lm's at 32 layers with the same settings (target >= 0.90x); megatron-offload at 96 layers
    (4.9 B, the size NVIDIA's Megatron-LM offload was run at on an H100) beside, by TFLOP/s.
 4. The paper's regime: global batch 4, 64 layers all streamed, W=2, --clip-grad 0: this code vs the
    baseline tree (target: no slower).
 5. Case 1's stronghold row with the plan's CPU optimizer threads and with 8 (half the cores of a
    16-core host), each beside zero-offload.
 6. The plan's predicted iteration on the shapes where it used to miss, each in the planner's default
    placement (target: measured within +-20% of predicted): 12 Llama-style layers at hidden 1024 with 4
    micro-batches (launch-bound small layers), 96 layers at hidden 2048 (micro-batch 8, global batch 64)
    and Llama-2-7B's shape (micro-batch 2, global batch 32), both with full recompute.
 7. A hand sweep around the plan's choice at case 6's 96-layer shape: the plan's placement (R resident
    layers, N of them recomputing), then R, R - 4 and R - 8 resident layers (--resident-layers) with the
    plan's choice of recompute at that R, with N and with N + 4 recomputing (--recompute-method block
    --recompute-num-layers); target: the plan's iteration within 5% of the fastest row.
 8. The same sweep at Llama-2-7B's shape (case 6's third row).
"""

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.stronghold.logs import parse_log  # noqa: E402

BASE = ["--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "1024",
        "--max-position-embeddings", "1024", "--bf16", "--mock-data", "--lr", "1e-4", "--min-lr", "1e-5",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--weight-decay", "0.01", "--clip-grad", "1.0",
        "--log-interval", "1"]
RECOMPUTE = ["--recompute-granularity", "full"]
LLAMA = ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
         "--untie-embeddings-and-output-weights"]
LLAMA2_7B = LLAMA + ["--hidden-size", "4096", "--num-attention-heads", "32", "--ffn-hidden-size", "11008",
                     "--seq-length", "2048", "--max-position-embeddings", "2048"]
STREAM_ALL = ["--resident-layers", "0"]
SWEEPS = {7: 1, 8: 2}  # case -> the row of case 6 whose plan it sweeps around


def rows_of(case: int):
    """(label, method, layers, micro-batch, extra flags, tree) of a case."""
    g64 = ["--global-batch-size", "64"]
    if case == 1:
        return [("megatron-lm mb4 recompute", "megatron-lm", 32, 4, g64 + RECOMPUTE, None),
                ("megatron-lm mb4", "megatron-lm", 32, 4, g64, None),
                ("zero-offload mb4", "zero-offload", 32, 4, g64, None),
                ("megatron-offload mb4", "megatron-offload", 32, 4, g64, None),
                ("stronghold mb4", "stronghold", 32, 4, g64 + STREAM_ALL, None)]
    if case == 2:
        return [("megatron-lm mb16 recompute", "megatron-lm", 32, 16, g64 + RECOMPUTE, None),
                ("megatron-offload mb16 recompute", "megatron-offload", 32, 16, g64 + RECOMPUTE, None),
                ("stronghold mb16 recompute", "stronghold", 32, 16, g64 + RECOMPUTE + STREAM_ALL, None)]
    if case == 3:
        return [("megatron-lm 32 layers mb8 recompute", "megatron-lm", 32, 8, g64 + RECOMPUTE, None),
                ("megatron-offload 96 layers mb8 recompute", "megatron-offload", 96, 8, g64 + RECOMPUTE, None),
                ("stronghold 200 layers mb8 recompute", "stronghold", 200, 8, g64 + RECOMPUTE, None)]
    if case == 4:
        paper = ["--global-batch-size", "4", "--window-size", "2", "--clip-grad", "0"] + STREAM_ALL
        return [("stronghold before (paper regime)", "stronghold", 64, 4, paper, "baseline"),
                ("stronghold (paper regime)", "stronghold", 64, 4, paper, None)]
    if case == 5:  # case 1's stronghold row with the plan's CPU optimizer threads and with half the cores
        return [("zero-offload mb4", "zero-offload", 32, 4, g64, None),
                ("stronghold mb4", "stronghold", 32, 4, g64 + STREAM_ALL, None),
                ("stronghold mb4 8 threads", "stronghold", 32, 4, g64 + STREAM_ALL + ["--cpu-optimizer-threads", "8"],
                 None)]
    if case == 6:
        return [("stronghold 12 Llama layers h1024, 4 micro-batches", "stronghold", 12, 4,
                 LLAMA + ["--hidden-size", "1024", "--num-attention-heads", "8", "--global-batch-size", "16"], None),
                ("stronghold 96 layers mb8 recompute", "stronghold", 96, 8, g64 + RECOMPUTE, None),
                ("stronghold Llama-2-7B mb2 gb32 recompute", "stronghold", 32, 2,
                 LLAMA2_7B + ["--global-batch-size", "32"] + RECOMPUTE, None)]
    if case in SWEEPS:
        return [rows_of(6)[SWEEPS[case]]]  # the plan's own placement; sweep_rows adds the rest once it is known
    raise ValueError(case)


def sweep_rows(plan_row) -> list:
    """Placements around the plan's (its R resident layers, N of them recomputing): R, R - 4 and R - 8
    resident layers, each with the plan's own choice of how many recompute at that R (fewer resident
    layers leave room to recompute fewer), with N and with N + 4 (--recompute-method block)."""
    plan = plan_row.get("plan", "")
    match = re.search(r"resident layers: (\d+) \|", plan)
    if not match:
        return []
    resident = int(match.group(1))
    chosen = re.search(r"resident layers recompute: (\d+) \|", plan)
    chosen = int(chosen.group(1)) if chosen else 0
    label, method, layers, micro, extra, tree = rows_of(plan_row["case"])[0]
    rows = []
    for r in (resident, resident - 4, resident - 8):
        for n in dict.fromkeys((None, chosen, chosen + 4)):  # None: the plan's choice at this r
            if r < 0 or (n is not None and not 1 <= n <= r) or (r == resident and n in (None, chosen)):
                continue
            block = ["--recompute-method", "block", "--recompute-num-layers", str(n)] if n else []
            rows.append((f"{label}, R={r} N={'plan' if n is None else n}", method, layers, micro,
                         extra + ["--resident-layers", str(r)] + block, tree))
    return rows


def run(label, method, layers, micro, extra, tree, iters, out, baseline_tree, override=()):
    cwd = baseline_tree if tree == "baseline" else ROOT
    cmd = [sys.executable, "pretrain_gpt.py", *BASE, "--num-layers", str(layers), "--micro-batch-size", str(micro),
           "--train-iters", str(iters), "--offload-method", method, *extra, *override]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != ROOT] + [cwd]))
    start = time.time()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    with open(os.path.join(out, "runs.log"), "a") as f:  # one file: every run's command and log, in order
        f.write(f"===== {label}\n" + " ".join(cmd) + "\n" + proc.stdout + proc.stderr
                + f"\nexit status {proc.returncode}\n")
    row = {"label": label, "method": method, "layers": layers, "micro batch": micro, "exit": proc.returncode,
           "wall (s)": round(time.time() - start, 1)}
    if proc.returncode != 0:
        print(f"{label}: exit {proc.returncode}\n{proc.stderr[-1500:]}", flush=True)
        return row
    log = parse_log(proc.stdout)
    times = log.series("elapsed time per iteration (ms)")[2:]
    row["median iteration (ms)"] = statistics.median(times)
    row["TFLOP/s"] = statistics.median(log.series("TFLOP/s per GPU")[2:])
    row["samples/s"] = statistics.median(log.series("samples per second")[2:])
    plan = re.search(r"predicted iteration \(ms\): (\d+)", proc.stdout)
    if plan:
        row["predicted (ms)"] = int(plan.group(1))
        row["measured / predicted"] = round(row["median iteration (ms)"] / row["predicted (ms)"], 3)
    plan_line = re.search(r"^plan \|.*$", proc.stdout, re.M)
    row["plan"] = plan_line.group(0) if plan_line else ""
    for key in ("peak GPU memory (GiB)", "peak host RSS (GiB)", "host-to-device (MiB/iter)", "device-to-host (MiB/iter)",
                "cpu work (ms/iter)", "waits for cpu (ms/iter)", "layer steps kept", "layer steps deferred"):
        if key in log.summary:
            row[key] = log.summary[key]
    print(f"{label}: median {row['median iteration (ms)']:.0f} ms, {row['TFLOP/s']:.0f} TFLOP/s"
          + (f", predicted {row['predicted (ms)']} ms" if plan else ""), flush=True)
    return row


def read_rows(path) -> dict:
    """(case, label) -> row of an earlier run's real_batch.csv, its numbers as numbers; the rows it did not
    run (its budget ran out) are left out, to run now."""
    def value(text):
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with open(path, newline="") as f:
        rows = [{k: value(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    return {(r["case"], r["label"]): r for r in rows if isinstance(r.get("exit"), int)}


def verdicts(case, rows):
    by = {r["label"]: r for r in rows}
    ms = lambda label: by[label].get("median iteration (ms)")  # noqa: E731
    out = []

    def ratio(text, a, b, target, lower_is_better=True):
        if a is None or b is None:
            out.append(f"case {case}: {text}: not measured")
            return
        r = a / b
        ok = r <= target if lower_is_better else r >= target
        out.append(f"case {case}: {text} = {r:.3f} (target {'<=' if lower_is_better else '>='} {target}) "
                   f"{'met' if ok else 'MISSED'}")

    def beside(text, a, b):  # a ratio without a target
        out.append(f"case {case}: {text} = " + ("not measured" if a is None or b is None else f"{a / b:.3f}"))

    if case == 1:
        ratio("stronghold / megatron-lm recompute, mb4", ms("stronghold mb4"), ms("megatron-lm mb4 recompute"), 1.15)
        ratio("zero-offload / stronghold, mb4", ms("zero-offload mb4"), ms("stronghold mb4"), 1.25, False)
        beside("megatron-offload / stronghold, mb4", ms("megatron-offload mb4"), ms("stronghold mb4"))
    elif case == 2:
        ratio("stronghold / megatron-lm, mb16 recompute", ms("stronghold mb16 recompute"),
              ms("megatron-lm mb16 recompute"), 1.10)
        beside("megatron-offload / stronghold, mb16 recompute", ms("megatron-offload mb16 recompute"),
               ms("stronghold mb16 recompute"))
    elif case == 3:
        a = by["stronghold 200 layers mb8 recompute"].get("TFLOP/s")
        b = by["megatron-lm 32 layers mb8 recompute"].get("TFLOP/s")
        ratio("stronghold 200 layers / megatron-lm 32 layers, model TFLOP/s", a, b, 0.90, False)
        beside("stronghold 200 layers / megatron-offload 96 layers, model TFLOP/s", a,
               by["megatron-offload 96 layers mb8 recompute"].get("TFLOP/s"))
    elif case == 5:
        for label in ("stronghold mb4", "stronghold mb4 8 threads"):
            ratio(f"zero-offload / {label}", ms("zero-offload mb4"), ms(label), 1.25, False)
    elif case == 4:
        ratio("this code / before, paper regime", ms("stronghold (paper regime)"),
              ms("stronghold before (paper regime)"), 1.0)
    elif case in SWEEPS:
        measured = [r for r in rows if r.get("median iteration (ms)") is not None]
        if measured:
            fastest = min(measured, key=lambda r: r["median iteration (ms)"])
            ratio(f"the plan's placement / the fastest of the sweep ({fastest['label']})", ms(rows_of(case)[0][0]),
                  fastest["median iteration (ms)"], 1.05)
    for r in rows:
        if "measured / predicted" in r:
            ok = 0.8 <= r["measured / predicted"] <= 1.2
            out.append(f"case {case}: {r['label']}: measured {r['median iteration (ms)']:.0f} ms, predicted "
                       f"{r['predicted (ms)']} ms, ratio {r['measured / predicted']} ({'within' if ok else 'OUTSIDE'} +-20%)")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--baseline-tree", default=None)
    parser.add_argument("--override", default="", help="pretrain_gpt.py flags appended to every run (a smoke "
                        "test on a CPU: --override '--hidden-size 64 --num-attention-heads 4 --seq-length 32')")
    parser.add_argument("--budget", type=float, default=0, help="seconds (0: no limit): no row starts that would "
                        "end past them, if it takes as long as the longest row so far")
    parser.add_argument("--resume", default=None, help="an earlier run's real_batch.csv: its finished rows are "
                        "taken as measured, the rest run")
    a = parser.parse_args()
    if 4 in a.cases and not a.baseline_tree:
        parser.error("case 4 needs --baseline-tree (the code before, e.g. `git archive b90e1b6 | tar -x -C DIR`)")
    if a.resume and not os.path.isfile(a.resume):
        parser.error(f"--resume {a.resume}: no such file")
    os.makedirs(a.out, exist_ok=True)
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"card: {card}", flush=True)
    earlier = read_rows(a.resume) if a.resume else {}
    start, longest = time.time(), 0.0
    rows, lines = [], []

    def write_csv():  # after every row: a call cut short keeps what it measured
        with open(os.path.join(a.out, "real_batch.csv"), "w", newline="") as f:
            keys = ["case"] + [k for k in dict.fromkeys(k for r in rows for k in r) if k != "case"]
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)

    def measure(case, spec):
        nonlocal longest
        label = spec[0]
        if (case, label) in earlier:
            print(f"{label}: measured by the earlier run ({a.resume})", flush=True)
            return dict(earlier[(case, label)])
        if a.budget and time.time() - start + longest > a.budget:
            print(f"{label}: not run (the budget of {a.budget:.0f} s would not hold it)", flush=True)
            return {"label": label, "method": spec[1], "layers": spec[2], "micro batch": spec[3], "exit": "not run"}
        row = run(*spec, a.iters, a.out, a.baseline_tree, a.override.split())
        longest = max(longest, row["wall (s)"])
        return row

    for case in a.cases:
        case_rows = []
        specs = list(rows_of(case))
        while specs:
            row = dict(measure(case, specs.pop(0)), case=case)
            case_rows.append(row)
            rows.append(row)
            write_csv()
            if case in SWEEPS and len(case_rows) == 1:
                specs += sweep_rows(row)  # around the plan's placement, once its plan line is known
        lines += verdicts(case, case_rows)
    text = "\n".join([f"card: {card}", *lines])
    with open(os.path.join(a.out, "verdicts.txt"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
