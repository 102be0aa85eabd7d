"""Train the largest model the planner says fits on this machine, for a few iterations.

    python tools/fit_trial.py [--fraction 1.0] [--iters 3] [-- more pretrain_gpt.py flags]
Prints the planner's capacity (layers), then runs stronghold at fraction x capacity with the
planner's default placement and reports start-up time, iteration time and memory peaks.
"""
import argparse
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from megatron.stronghold import arguments  # noqa: E402
from megatron.stronghold.planner import ModelCosts, available_memory, layers_that_fit  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--fraction", type=float, default=1.0)
p.add_argument("--iters", type=int, default=3)
p.add_argument("extra", nargs="*")
a = p.parse_args()
flags = ["--bf16", "--recompute-granularity", "full", *a.extra]
costs = ModelCosts.of(arguments.parse_args(["--num-layers", "1", *flags]), 50304)
gpu, host = available_memory(torch.device("cuda"))
capacity = layers_that_fit(costs, gpu, host)
layers = int(capacity * a.fraction)
print(f"{torch.cuda.get_device_name()}: free GPU {gpu / 2**30:.1f} GiB, available host {host / 2**30:.1f} GiB; "
      f"planner capacity {capacity} layers at {costs.layer_params * costs.host_bytes_per_param / 2**30:.3f} GiB "
      f"host or {costs.layer_params * costs.resident_bytes_per_param / 2**30:.3f} GiB GPU per layer; "
      f"running {layers}", flush=True)
start = time.time()
cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--num-layers", str(layers), "--train-iters",
       str(a.iters), "--log-interval", "1", "--mock-data", "--offload-method", "stronghold", *flags]
proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
for line in proc.stdout.splitlines():
    if any(k in line for k in ("total parameters", "plan |", "host store", "iteration ", "summary", "error",
                               "Error", "memory")):
        print(line[:600])
print(f"exit {proc.returncode} after {time.time() - start:.0f} s")
