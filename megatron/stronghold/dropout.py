"""Dropout masks that do not depend on the execution order.

Megatron-LM draws every dropout mask from one running generator, so its masks depend on the order in
which layers and micro-batches run. StrongHold runs a step layer-major (each streamed layer computes
every micro-batch before the next layer), which would draw the same masks in another order. Instead,
every method seeds the generator at the start of each (layer, micro-batch) from a value fixed by the
seed, the iteration, the global micro-batch index and the layer, so the masks are the same in any
order. The global micro-batch index (micro-batch m on data-parallel rank r of N is m * N + r, the
order in which the data sampler hands out samples) makes a data-parallel run draw the masks that
one process would.

Recompute needs nothing more: torch.utils.checkpoint restores the generator state it saw at the
layer's forward, and StrongHold's own recompute calls the layer again under the same seed.
"""

import torch

_MASK = (1 << 63) - 1


def mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 over their sequence): nearby inputs, unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state & _MASK


class DropoutSeeds:
    """Seeds the default generators before every dropout-bearing module of the model runs.

    The trainer sets `iteration` and `microbatch` (this rank's index); modules are the embedding
    (position 0) and the transformer layers (their layer_number, from 1).
    """

    def __init__(self, seed: int, data_parallel_rank: int = 0, data_parallel_size: int = 1):
        self.seed = seed
        self.rank, self.ranks = data_parallel_rank, data_parallel_size
        self.iteration = 0
        self.microbatch = 0

    def install(self, model) -> None:
        model.embedding.register_forward_pre_hook(lambda m, a: self.apply(m, 0))
        for layer in model.decoder.layers:
            layer.register_forward_pre_hook(lambda m, a, n=layer.layer_number: self.apply(m, n))

    def apply(self, module, position: int) -> None:
        if not module.training:  # no dropout: leave the generators alone
            return
        seed = mix(self.seed, self.iteration, self.microbatch * self.ranks + self.rank, position)
        torch.default_generator.manual_seed(seed)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.default_generators[torch.cuda.current_device()].manual_seed(seed)
