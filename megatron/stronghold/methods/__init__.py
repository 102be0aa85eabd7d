"""Training methods: where the transformer layers' model states live and who steps them.

Every method implements the protocol in protocol.py, and `build` makes the one a run asks for:

    megatron-lm                  megatron_lm.py  every layer on the GPU, Megatron-LM's mixed-precision AdamW
    stronghold, l2l              streaming.py    layers stream from host memory through GPU slots; two
                                                 configurations of one executor (executor/)
    zero-offload, zero-infinity  zero.py         DeepSpeed's ZeRO stage 2 / stage 3 with CPU offload

Each has a registry.MethodSpec (its module, pre-flight check, checkpoint kind, ...); the names and
their order are registry.METHODS (the launcher and the result tables read it).
"""

import importlib

from .protocol import Method, StepResult
from .registry import METHODS, MethodSpec, spec


def _module(name: str):
    # imported when a run asks for it: zero.py imports DeepSpeed
    return importlib.import_module(f".{spec(name).module}", __name__)


def placement(args, plan, device, dtype):
    """Where each transformer layer goes the moment it is built: place(index, layer), or None to
    leave the whole model in fp32 on the host (model.build_model's place_layer). plan: the
    pre-flight check's planner.Plan (None for the methods without one)."""
    return _module(args.offload_method).placement(args, plan, device, dtype)


def streamed_layers(args, plan) -> range:
    """Indices of the layers that stream from host memory (none for the methods that stream none);
    build_model leaves them unwrapped by activation checkpointing, the executor recomputes them."""
    module = _module(args.offload_method)
    return module.streamed_layers(args, plan) if hasattr(module, "streamed_layers") else range(0)


def build(args, plan, model, device, dtype, seeds, log) -> Method:
    """The method of args.offload_method over the built model (placed by `placement`)."""
    return _module(args.offload_method).build(args, plan, model, device, dtype, seeds, log)


__all__ = ["METHODS", "Method", "MethodSpec", "StepResult", "build", "placement", "spec", "streamed_layers"]
