"""L2L (Pudipeddi et al. 2020, "Training Large Neural Networks with Constant Memory using a New
Execution Algorithm"): every transformer layer lives in host memory and only one is on the GPU at a
time, copied in when it is needed (no prefetch); the optimizer steps every layer on the CPU after
backward, before the next iteration starts.

It shares StrongHold's host store (same bytes per parameter, same fused CPU AdamW, biases and norms
included, unlike the paper's L2L which never updated them) and differs only in the schedule.
"""

from ..executor import StreamingExecutor


def build_l2l_executor(layers, dtype, device, args, log=print) -> StreamingExecutor:
    return StreamingExecutor(layers, 1, dtype, device, args, log=log, overlap=False)
