"""Data parallelism for the streamed layers: streamed layer i belongs to data-parallel rank i mod N,
whose host store alone holds it and whose CPU steps it (host memory and CPU work per rank fall as
1/N). Its gradient is summed onto the owner on the device (NCCL between GPUs; through host memory
over gloo it was 3.8x slower than one rank at 26 streamed layers on 2 H200s), and its weights are
broadcast from the owner's slot when it is loaded. Loads and gradients go in one fixed order
(forward, then backward), the same on every rank, so every rank issues the same collectives."""

import torch
from megatron.core import parallel_state


def streamed_layer_owners(num_streamed: int) -> list:
    """The data-parallel rank that owns each streamed layer: layer i belongs to rank i mod N."""
    ranks = parallel_state.get_data_parallel_world_size()
    return [i % ranks for i in range(num_streamed)]


def owned_by_this_rank(num_streamed: int) -> list:
    rank = parallel_state.get_data_parallel_rank() if parallel_state.get_data_parallel_world_size() > 1 else 0
    return [owner == rank for owner in streamed_layer_owners(num_streamed)]


class Ownership:
    """Who holds each streamed layer, and the collectives that move it between ranks. With one rank
    every layer is this rank's and no collective runs."""

    def __init__(self, num_layers: int, asynchronous: bool):
        self.size = parallel_state.get_data_parallel_world_size()
        self.group = parallel_state.get_data_parallel_group() if self.size > 1 else None
        self.owned = owned_by_this_rank(num_layers)
        self.owner = [torch.distributed.get_global_rank(self.group, owner) if self.group is not None else 0
                      for owner in streamed_layer_owners(num_layers)]  # global ranks
        self.asynchronous = asynchronous  # CUDA: collectives order streams, they do not block the host

    @property
    def parallel(self) -> bool:
        return self.group is not None

    def broadcast(self, i: int, slot: torch.Tensor) -> None:
        """Layer i's weights from its owner's slot to every rank's (on the current stream)."""
        if self.group is None:
            return
        work = torch.distributed.broadcast(slot, src=self.owner[i], group=self.group, async_op=self.asynchronous)
        if work is not None:
            work.wait()  # orders the copy stream after the collective; does not block the host

    def start_reduce(self, i: int, flat: torch.Tensor):
        """Start summing layer i's fp32 gradient over the ranks onto its owner, as Megatron reduces
        its main grads; returns what finish_reduce takes."""
        work = torch.distributed.reduce(flat, dst=self.owner[i], group=self.group, async_op=self.asynchronous)
        return flat, work

    def finish_reduce(self, flat: torch.Tensor, work) -> torch.Tensor:
        """On the owner: the mean gradient, on the current stream."""
        if work is not None:
            work.wait()  # orders the current stream after the collective; does not block the host
        return flat.div_(self.size)

    def sum(self, value: float, device) -> float:
        """A float summed over the ranks (each measured the layers it owns)."""
        if self.group is None:
            return value
        summed = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(summed, group=self.group)
        return float(summed)
