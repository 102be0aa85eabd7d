"""ZeRO checkpoints: DeepSpeed's files, read as plain data.

zero-offload and zero-infinity save and load through DeepSpeed's engine (methods/zero.py), into the
iteration directories of checkpointing/, beside the trainer's own file. DeepSpeed's loader unpickles
(weights_only=False), so `check_deepspeed_files` first reads every file it will open as plain data
and refuses the checkpoint if that fails.

DeepSpeed's files hold the fp32
master weights as flat partitions of the optimizer's parameter groups. `zero_weights` returns them
by megatron-core GPTModel names, each a view into the memory-mapped file: nothing is read until a
tensor is used, so a checkpoint much larger than host memory can be converted tensor by tensor.

DeepSpeed's own zero_to_fp32 does the same job, but it unpickles the files (weights_only=False),
reads the model-states file whole and, for ZeRO-2, concatenates the partitions into a new fp32
copy of the model. Here the files are read with torch.load(weights_only=True), allowing only the
plain-data classes DeepSpeed pickles, and the partitions are sliced where they lie, following the
layout DeepSpeed records: ZeRO-2's per-parameter fragment addresses, ZeRO-3's parameters in order
within each group. ZeRO runs have one process here (arguments.py), so there is one partition.
"""

import math
import os

import torch

from ..errors import ArgumentError, first_line


def deepspeed_data_classes():
    """The plain-data classes DeepSpeed 0.19 pickles into its ZeRO files (its fp16 loss-scaler
    settings, the ZeRO stage enum, a (start, numel) tuple): allowed, nothing else is."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def read_deepspeed_file(path: str) -> dict:
    """A DeepSpeed checkpoint file as plain data (tensors memory-mapped), or ArgumentError."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    try:
        with torch.serialization.safe_globals(deepspeed_data_classes()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ArgumentError(f"refusing DeepSpeed checkpoint file {path}: it does not load as plain "
                            f"data ({first_line(exc)})") from None


def check_deepspeed_files(path: str) -> None:
    """ArgumentError unless every DeepSpeed file in directory `path` (its *_states.pt: model and
    optimizer states) reads as plain data; call before DeepSpeed's own loader opens them."""
    for name in sorted(os.listdir(path)):
        if name.endswith("_states.pt"):
            read_deepspeed_file(os.path.join(path, name))


def _one(path: str, suffix: str) -> str:
    names = sorted(n for n in os.listdir(path) if n.endswith(suffix))
    if len(names) != 1:
        raise ArgumentError(f"{path}: expected one DeepSpeed *{suffix} file, found {len(names)} "
                            "(ZeRO checkpoints of one process are supported)")
    return os.path.join(path, names[0])


def zero_weights(path: str) -> dict:
    """{GPTModel parameter name: fp32 tensor} of the ZeRO checkpoint in directory `path`."""
    model_states = read_deepspeed_file(_one(path, "model_states.pt"))
    optim = read_deepspeed_file(_one(path, "optim_states.pt")).get("optimizer_state_dict", {})
    shapes = model_states.get("param_shapes")
    if not isinstance(shapes, list) or "zero_stage" not in optim:
        raise ArgumentError(f"{path}: not a DeepSpeed ZeRO checkpoint (no parameter shapes or ZeRO stage)")
    stage = int(optim["zero_stage"])
    weights = {}
    if stage in (1, 2):
        groups, addresses = optim["single_partition_of_fp32_groups"], optim["param_slice_mappings"]
        if any(n != 1 for n in optim.get("partition_count", [1])):
            raise ArgumentError(f"{path}: ZeRO partitions of several processes are not supported")
        for flat, group_shapes, group_addresses in zip(groups, shapes, addresses):
            for name, shape in group_shapes.items():
                address = group_addresses[name]
                weights[name] = flat.narrow(0, address.start, address.numel).view(shape)
    elif stage == 3:
        for flat, group_shapes in zip(optim["fp32_flat_groups"], shapes):
            offset = 0
            for name, shape in group_shapes.items():
                numel = math.prod(shape)
                weights[name] = flat.narrow(0, offset, numel).view(shape)
                offset += numel
            if offset != flat.numel():
                raise ArgumentError(f"{path}: a ZeRO-3 group holds {flat.numel()} values, its parameters "
                                    f"{offset} (partitions of several processes are not supported)")
    else:
        raise ArgumentError(f"{path}: unknown ZeRO stage {stage}")
    for name, source in model_states.get("shared_params", {}).items():
        weights[name] = weights[source]
    return weights
