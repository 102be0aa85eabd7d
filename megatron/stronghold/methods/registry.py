"""Every training method, one MethodSpec each: what the launcher, the flags, the pre-flight check,
the placement and the checkpoints need to know about a method, looked up by its name.

Adding a method: a module in methods/ with `placement(args, plan, device, dtype)` and
`build(args, plan, model, device, dtype, seeds, log)` (and `streamed_layers(args, plan)` if layers
stream) returning an object of protocol.Method, and one line in SPECS. Nothing here imports torch
or the methods' modules: arguments.py reads this table before anything heavy is loaded.
"""

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class MethodSpec:
    name: str
    module: str  # methods/<module>.py
    # the pre-flight check (planner/preflight.py): "all-on-gpu" (every layer and its optimizer state on
    # the GPU), "planner" (stronghold's plan: resident layers, window, threads), "deepspeed" (ZeRO's bytes),
    # "optimizer-offload" (megatron-core's offload: the fraction of the optimizer on the CPU)
    preflight: str
    data_parallel: bool  # takes -n N / --tensor-model-parallel-size (torch.distributed)
    # "per-parameter": checkpoints that cross between such methods; "deepspeed": DeepSpeed's engine files,
    # which load only into the same method (--finetune takes their weights into any)
    checkpoint: str
    precision_aware: bool  # builds --exp-avg-dtype / --exp-avg-sq-dtype / --main-grads-dtype bf16
    fixed_placement: Optional[Tuple[int, int]] = None  # (resident layers, window) the method always uses
    overlap: bool = True  # the streamed layers' copies and CPU steps overlap the GPU's work
    needs_cuda: bool = False  # refused without a GPU (and skipped by the launcher's -m all there)
    precisions: Tuple[str, ...] = ("fp32", "bf16", "fp16")  # --bf16 / --fp16 / neither

    @property
    def deepspeed(self) -> bool:
        return self.checkpoint == "deepspeed"


# In the order the launcher's `-m all` runs them and the result tables show them.
SPECS = (
    MethodSpec("megatron-lm", "megatron_lm", "all-on-gpu", data_parallel=True, checkpoint="per-parameter",
               precision_aware=True),
    # megatron-core's own optimizer CPU offload (its pre-flight check picks --optimizer-offload-fraction)
    MethodSpec("megatron-offload", "megatron_offload", "optimizer-offload", data_parallel=False,
               checkpoint="per-parameter", precision_aware=False, needs_cuda=True, precisions=("bf16",)),
    MethodSpec("l2l", "streaming", "planner", data_parallel=True, checkpoint="per-parameter", precision_aware=True,
               fixed_placement=(0, 1), overlap=False),
    MethodSpec("zero-offload", "zero", "deepspeed", data_parallel=False, checkpoint="deepspeed",
               precision_aware=False),
    MethodSpec("zero-infinity", "zero", "deepspeed", data_parallel=False, checkpoint="deepspeed",
               precision_aware=False),
    MethodSpec("stronghold", "streaming", "planner", data_parallel=True, checkpoint="per-parameter",
               precision_aware=True),
)
METHODS = tuple(spec.name for spec in SPECS)
_BY_NAME = {spec.name: spec for spec in SPECS}


def spec(name: str) -> MethodSpec:
    """The method called `name`; KeyError for any other (arguments.py restricts --offload-method to METHODS)."""
    return _BY_NAME[name]
