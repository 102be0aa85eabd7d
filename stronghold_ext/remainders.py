"""An fp32 master kept as its bf16 weight plus a 16-bit remainder, exactly (pure torch, CPU or GPU).

The bf16 weight is the master rounded to nearest even (what `master.to(torch.bfloat16)` gives, and
what the GPU computes with), so a store that already holds the bf16 weights needs only the
remainder, `bits(master) - bits(bf16) << 16`, to give the master back: 2 bytes instead of 4.

The remainder lies in [-0x8000, +0x8000]: one value too many for 16 bits. The two ends occur only
at an exact tie (the master's low half is 0x8000), +0x8000 when the tie rounded down, -0x8000 when
it rounded up; both are stored as the code 0x8000, read back as +0x8000, and the elements whose tie
rounded up are listed in `ties` (sorted flat indices; about one element in 2**16). Megatron-core's
store_param_remainders rounds such ties away from zero instead, which would change the bf16
weights the model computes with; the list keeps them equal to the plain fp32 master's, bit for bit.
"""

import torch

TIE = -0x8000  # the 16-bit code of both tie remainders


def split_master(master: torch.Tensor):
    """(bf16 weights, int16 remainder, int64 ties) of an fp32 tensor; join_master inverts it exactly."""
    weights = master.to(torch.bfloat16)
    diff = master.view(torch.int32) - (weights.view(torch.int16).to(torch.int32) << 16)
    ties = torch.nonzero(diff.flatten() == TIE).flatten()
    return weights, diff.to(torch.int16), ties


def join_master(weights: torch.Tensor, remainder: torch.Tensor, ties: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 master (into `out` when given) from split_master's three parts."""
    diff = remainder.to(torch.int32)
    diff = torch.where(diff == TIE, -TIE, diff)
    if ties.numel():
        diff.view(-1)[ties] = TIE
    bits = (weights.view(torch.int16).to(torch.int32) << 16).add_(diff)
    if out is None:
        return bits.view(torch.float32)
    return out.copy_(bits.view(torch.float32))


def ties_within(ties: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The ties of elements [start, end), as indices from start (ties of a larger tensor, sorted)."""
    return ties[(ties >= start) & (ties < end)] - start


def split_into(master: torch.Tensor, weights: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """Split an fp32 master into existing weights and remainder tensors; returns the flat mask of its
    ties (torch.nonzero of it gives the ties; left to the caller, since on a GPU it waits for the device)."""
    weights.copy_(master)  # rounded to nearest even
    diff = master.view(torch.int32) - (weights.view(torch.int16).to(torch.int32) << 16)
    remainder.copy_(diff)  # int32 -> int16 keeps the low 16 bits: +0x8000 becomes the code 0x8000 too
    return diff.view(-1) == TIE


def store_master(master: torch.Tensor, weights: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """Split an fp32 master into existing weights and remainder tensors; returns the new ties."""
    return torch.nonzero(split_into(master, weights, remainder)).flatten()
