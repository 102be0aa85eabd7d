"""StrongHold against megatron-lm and against the physical floor, on one GPU machine, in one run.

For each (layers, window) it prints stronghold's iteration time next to
  (a) megatron-lm at the same size, where it fits, and
  (b) the floor: the largest of
      - GPU compute: forward+backward of all layers resident (measured per layer here),
      - PCIe: bytes the schedule moves / measured pinned bandwidth,
      - CPU optimizer: streamed parameters / measured fused-AdamW rate.
It also measures the per-layer CPU update of the host store against torch's fused AdamW alone.

    python tools/bench_stronghold.py --layers 32 64 --windows 2 4 8 --out results/bench
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron.stronghold import arguments  # noqa: E402
from megatron.stronghold.logs import parse_log  # noqa: E402
from megatron.stronghold.planner import ModelCosts  # noqa: E402

GB = 1e9


def measure_pcie(nbytes=512 * 2 ** 20, reps=10):
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rates = {}
    for name, (dst, src) in {"h2d": (dev, host), "d2h": (host, dev)}.items():
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        rates[name] = nbytes / statistics.median(times[2:])
    return rates


def measure_cpu_update(numel):
    """params/s of torch fused AdamW alone vs our host-store update (bf16 grad in, bf16 weights out):
    the median of 20 calls each, taken in turn (bench_cpu_adam.timed), so load on the machine falls
    on both alike."""
    from bench_cpu_adam import timed
    from megatron.stronghold.executor.host_store import HostLayer, LayerLayout

    p = torch.zeros(numel)
    p.grad = torch.randn(numel) * 1e-3
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)

    layer = torch.nn.Linear(numel // 1024, 1024, bias=False)
    args = arguments.parse_args(["--bf16"])  # the default bf16 host store (masters as remainders)
    host = HostLayer(layer, LayerLayout.of(layer), torch.bfloat16, pin=True, args=args)
    host.grad.copy_(torch.randn(host.layout.numel) * 1e-3)
    scratch = torch.empty(host.layout.numel)
    hyper = {1.0: (1e-4, 0.01), 0.0: (1e-4, 0.0)}
    adam_s, ours_s = timed([opt.step, lambda: host.step(hyper, 1.0, scratch)],  # the norm is taken on the GPU
                           reps=20, warmup=3)
    return numel / adam_s, host.layout.numel / ours_s


def measure_compute(args_list, hidden, heads, seq, mb, recompute):
    """Forward+backward seconds per layer and for the rest of the model (all resident, bf16)."""
    from megatron.stronghold import model as model_lib
    from megatron.stronghold.distributed import init_distributed
    from megatron.stronghold.methods.megatron_lm import to_device
    from megatron.stronghold.data import build_data_iterators
    from megatron.stronghold.tokenizer import build_tokenizer, padded_vocab_size

    times = {}
    for layers in (4, 12):
        argv = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
                "--seq-length", str(seq), "--micro-batch-size", str(mb), "--bf16", "--mock-data"]
        if recompute:
            argv += ["--recompute-granularity", "full"]
        args = arguments.parse_args(argv)
        init_distributed(torch.device("cuda"))
        tok = build_tokenizer(args)
        model = model_lib.build_model(args, padded_vocab_size(tok.vocab_size, 128)).cuda().bfloat16()
        batch = to_device(next(build_data_iterators(args, tok)[0]), "cuda")
        for _ in range(3):
            model_lib.lm_loss(model, batch).backward()
        torch.cuda.synchronize()
        reps = 20
        t = time.perf_counter()
        for _ in range(reps):
            model_lib.lm_loss(model, batch).backward()
        torch.cuda.synchronize()
        times[layers] = (time.perf_counter() - t) / reps
        del model
        torch.cuda.empty_cache()
    per_layer = (times[12] - times[4]) / 8
    return per_layer, max(0.0, times[4] - 4 * per_layer)


def run_training(method, layers, window, a, log_dir):
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--num-layers", str(layers),
           "--hidden-size", str(a.hidden), "--num-attention-heads", str(a.heads), "--seq-length", str(a.seq),
           "--micro-batch-size", str(a.micro_batch), "--bf16", "--train-iters", str(a.iters),
           "--log-interval", "1", "--mock-data", "--offload-method", method]
    if method == "stronghold" and window != "auto":
        cmd += ["--window-size", str(window), "--resident-layers", "0"]  # the paper's setting: all streamed
    if a.recompute:
        cmd += ["--recompute-granularity", "full"]
    cmd += a.extra
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    path = os.path.join(log_dir, f"log_{method}_l-{layers}_hs-{a.hidden}_bs-{a.micro_batch}_ws-{window}.txt")
    with open(path, "w") as f:
        f.write(proc.stdout + proc.stderr)
    parsed = parse_log(proc.stdout)
    summary = parsed.summary
    if proc.returncode != 0 or not summary:
        text = (proc.stdout + proc.stderr).lower()
        reason = "out of memory" if "out of memory" in text else "does not fit" if "does not fit" in text else "failed"
        return None, reason
    summary["plan"] = next((l for l in proc.stdout.splitlines() if l.startswith("plan |")), "")
    # Steady state: the median after the first two iterations (allocator growth, cuBLAS heuristics
    # and pinned-page faults make the first ones slower for every method).
    times = [row["elapsed time per iteration (ms)"] for row in parsed.iterations]
    return statistics.median(times[2:] or times) / 1e3, summary


def _planned(info, layers):
    """(streamed layers, window) from the plan line of an 'auto' run."""
    from megatron.stronghold.logs import parse_fields

    if not isinstance(info, dict) or not info.get("plan"):
        return layers, 4
    plan = parse_fields(info["plan"][len("plan |"):])
    return plan["streamed layers"], max(plan["window"], 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[32, 64])
    p.add_argument("--windows", type=lambda w: w if w == "auto" else int(w), nargs="+", default=[2, 4, 8],
                   help="window sizes with every layer streamed; 'auto' lets the planner choose R and W")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--recompute", action="store_true", help="full activation recompute in every run")
    p.add_argument("--skip-megatron", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "bench"))
    p.add_argument("extra", nargs="*", help="after --: more pretrain_gpt.py flags for every run")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    card = torch.cuda.get_device_name()
    P = ModelCosts.of(arguments.parse_args(["--hidden-size", str(a.hidden), "--num-attention-heads",
                                            str(a.heads)]), 0).layer_params

    pcie = measure_pcie()
    adam_rate, ours_rate = measure_cpu_update(P)
    per_layer, rest = measure_compute(None, a.hidden, a.heads, a.seq, a.micro_batch, a.recompute)
    print(f"card: {card} | threads: {torch.get_num_threads()}")
    print(f"pinned copy: H2D {pcie['h2d'] / GB:.1f} GB/s, D2H {pcie['d2h'] / GB:.1f} GB/s")
    print(f"CPU update of one layer ({P / 1e6:.1f} M params): torch fused AdamW alone {adam_rate / 1e9:.2f} G params/s, "
          f"host-store update (bf16 grad in, AdamW, bf16 weights out) {ours_rate / 1e9:.2f} G params/s "
          f"({ours_rate / adam_rate:.2f}x)")
    print(f"GPU forward+backward, all resident: {per_layer * 1e3:.2f} ms per layer + {rest * 1e3:.2f} ms rest")

    rows = []
    for layers in a.layers:
        mega_t = None
        if not a.skip_megatron:
            mega_t, mega_info = run_training("megatron-lm", layers, 1, a, a.out)
        for window in a.windows:
            if window != "auto" and window > layers:
                continue
            t, info = run_training("stronghold", layers, window, a, a.out)
            streamed, w = (layers, window) if window != "auto" else _planned(info, layers)
            loads = streamed if w >= streamed else 2 * streamed - w
            pcie_s = loads * P * 2 / pcie["h2d"] + streamed * P * 2 / pcie["d2h"]
            terms = {"compute": rest + layers * per_layer, "pcie": pcie_s, "cpu-adam": streamed * P / adam_rate}
            bound = max(terms, key=terms.get)
            row = {"card": card, "layers": layers, "window": window,
                   "stronghold_ms": round(t * 1e3, 1) if t else info,
                   "megatron_ms": round(mega_t * 1e3, 1) if mega_t else (mega_info if not a.skip_megatron else "-"),
                   "floor_ms": round(terms[bound] * 1e3, 1), "floor_term": bound,
                   "compute_ms": round(terms["compute"] * 1e3, 1), "pcie_ms": round(terms["pcie"] * 1e3, 1),
                   "cpu_adam_ms": round(terms["cpu-adam"] * 1e3, 1),
                   "cpu_work_ms": info.get("cpu work (ms/iter)", "-") if t else "-",  # the run's own CPU steps
                   "x_floor": round(t / terms[bound], 3) if t else "-",
                   "speed_vs_megatron": round(mega_t / t, 3) if (t and mega_t) else "-",
                   "peak_gpu_gib": info.get("peak GPU memory (GiB)") if t else "-",
                   "peak_rss_gib": info.get("peak host RSS (GiB)") if t else "-",
                   "plan": info.get("plan", "") if t else ""}
            rows.append(row)
            print(row, flush=True)

    path = os.path.join(a.out, "bench_stronghold.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{card}: hidden {a.hidden}, heads {a.heads}, seq {a.seq}, micro-batch {a.micro_batch}, bf16"
          f"{', full recompute' if a.recompute else ''}; iteration time = median of iterations 3..{a.iters}")
    print(f"{'L':>4} {'W':>3} {'stronghold ms':>14} {'megatron ms':>12} {'floor ms':>9} {'bound':>9} "
          f"{'x floor':>8} {'vs megatron':>11}")
    for r in rows:
        print(f"{r['layers']:>4} {r['window']:>3} {r['stronghold_ms']!s:>14} {r['megatron_ms']!s:>12} "
              f"{r['floor_ms']:>9} {r['floor_term']:>9} {r['x_floor']!s:>8} {r['speed_vs_megatron']!s:>11}")
    print(f"csv: {path}")


if __name__ == "__main__":
    main()
