"""Ground floor: what a streamed layer's gradient crosses PCIe in, for the executor, the planner's byte
count and its rate measurement alike. Nothing here imports from the project.

The compute dtype, except fp16: there the step's gradient sum stays fp32, as Megatron's main grads,
since the sum of a step's micro-batches can overflow fp16 where none of them does."""

import torch


def gradient_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if compute_dtype == torch.float16 else compute_dtype
