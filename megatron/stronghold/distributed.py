"""The process's place in the launch: its device, the process group and megatron-core's parallel
state, and the rank that logs, publishes checkpoints and writes TensorBoard events."""

import os
import sys

import torch


def global_rank() -> int:
    """This process's rank: torch.distributed's once initialised, torchrun's RANK before that."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_first_rank() -> bool:
    """Rank 0 speaks for the run: one log, one checkpoint publisher, one event file."""
    return global_rank() == 0


def gather(value) -> list:
    """Every rank's value, in rank order; a barrier too."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values
    return [value]


def init_distributed(device: torch.device, tensor_parallel: int = 1) -> None:
    """One process group and megatron-core's parallel state (idempotent: tests call train() often)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ:  # torchrun
            dist.init_process_group(backend)
        else:  # one process: an in-memory store, so no port can clash with another run
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_parallel, 1)


def leave_process_group() -> None:
    """A torchrun rank that trained to its end takes its process group down itself: left to the
    interpreter's exit, gloo's threads were once still running when it went, and the rank died with
    SIGABRT after saving. One process (tests call train() again and again) keeps its group. Not after
    an error: a rank that failed may have peers still inside a collective with it."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if "WORLD_SIZE" in os.environ and dist.is_initialized():
        try:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        except Exception as exc:  # the run itself is done and saved: say so, keep its exit status
            print(f"warning: leaving the process group failed after the run: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu (no CUDA GPU found: training on the CPU)"
