"""Where does GPU memory grow with depth? Prints allocated memory after the forward pass and after
each streamed layer's backward, for a small stronghold model (run it at two depths and compare).

    python tools/diag_memory.py LAYERS [more pretrain_gpt.py flags]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron.stronghold import arguments, training  # noqa: E402
from megatron.stronghold.executor import streaming  # noqa: E402

layers, extra = sys.argv[1], sys.argv[2:]
trace = []
offload = streaming.StreamingExecutor._offload_grads
start_forward = streaming.StreamingExecutor.start_forward


def traced_offload(self, i):
    trace.append((f"bwd{i}", torch.cuda.memory_allocated() >> 20, torch.cuda.max_memory_allocated() >> 20))
    offload(self, i)


def traced_start(self):
    trace.append(("start", torch.cuda.memory_allocated() >> 20, torch.cuda.max_memory_allocated() >> 20))
    start_forward(self)


streaming.StreamingExecutor._offload_grads = traced_offload
streaming.StreamingExecutor.start_forward = traced_start
argv = ["--num-layers", layers, "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "128",
        "--micro-batch-size", "1", "--train-iters", "2", "--bf16", "--mock-data", "--offload-method", "stronghold",
        "--window-size", "2", "--resident-layers", "0", "--recompute-granularity", "full", *extra]
training.train(arguments.parse_args(argv))
print("MiB allocated / peak:", " ".join(f"{k}:{a}/{p}" for k, a, p in trace))
