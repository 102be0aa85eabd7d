"""Where does GPU memory grow with depth? Prints allocated memory at the start of each step and as
each streamed layer's gradient leaves, for a small stronghold model (run it at two depths and compare).

    python tools/diag_memory.py LAYERS [more pretrain_gpt.py flags]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron.stronghold import arguments, training  # noqa: E402

layers, extra = sys.argv[1], sys.argv[2:]
trace = []


def observe(event, layer=None, **_):
    if event in ("begin step", "offload"):
        name = "start" if event == "begin step" else f"bwd{layer}"
        trace.append((name, torch.cuda.memory_allocated() >> 20, torch.cuda.max_memory_allocated() >> 20))


argv = ["--num-layers", layers, "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "128",
        "--micro-batch-size", "1", "--train-iters", "2", "--bf16", "--mock-data", "--offload-method", "stronghold",
        "--window-size", "2", "--resident-layers", "0", "--recompute-granularity", "full", *extra]
training.train(arguments.parse_args(argv), observer=observe)
print("MiB allocated / peak:", " ".join(f"{k}:{a}/{p}" for k, a, p in trace))
