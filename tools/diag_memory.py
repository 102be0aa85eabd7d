"""Where does peak GPU memory go? Trains a small stronghold model and dumps a CUDA memory snapshot.

    python tools/diag_memory.py OUT_DIR LAYERS [more pretrain_gpt.py flags]
Open the pickle at https://pytorch.org/memory_viz, or read the summary this script prints.
"""
import os
import pickle
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron.stronghold import arguments, training  # noqa: E402

out, layers, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
torch.cuda.memory._record_memory_history(max_entries=200000)
argv = ["--num-layers", layers, "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "128",
        "--micro-batch-size", "1", "--train-iters", "3", "--bf16", "--mock-data", "--offload-method", "stronghold",
        "--window-size", "2", "--resident-layers", "0", "--recompute-granularity", "full", *extra]
training.train(arguments.parse_args(argv))
snap = torch.cuda.memory._snapshot()
with open(os.path.join(out, f"snapshot_{layers}.pickle"), "wb") as f:
    pickle.dump(snap, f)
print("peak", torch.cuda.max_memory_allocated())
