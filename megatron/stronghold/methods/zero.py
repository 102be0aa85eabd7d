"""ZeRO-Offload and ZeRO-Infinity through DeepSpeed itself, behind the trainer's Method interface.

    --offload-method zero-offload    ZeRO stage 2, optimizer states and fp32 master weights on the
                                     CPU, stepped by DeepSpeedCPUAdam (fused C++, AdamW mode);
    --offload-method zero-infinity   ZeRO stage 3, parameters too live on the CPU (pinned) and are
                                     fetched to the GPU layer by layer.

DeepSpeed owns placement, gradient accumulation, clipping and the optimizer step (settings and
their reasons in `zero_configs.py`). What makes a ZeRO run train like `megatron-lm` from the same
seed stays with the trainer or is set here:
- the model is the trainer's megatron-core GPT, built before this is called, so the initial weights
  are the same; `deepspeed.initialize` runs with the torch RNG state saved and restored, so dropout
  draws the same masks;
- Megatron's weight-decay groups (none for biases and 1-D parameters, `wd_mult` 0.0) are the param
  groups of the DeepSpeedCPUAdam given to DeepSpeed; megatron-core's OptimizerParamScheduler (the
  trainer's, `optimizers` below) sets lr and weight decay in those same group dicts, which
  DeepSpeedCPUAdam reads at every step; DeepSpeed gets no scheduler of its own;
- each micro-batch's loss goes through `engine.backward`, which divides it by the micro-batches per
  step as the trainer's `loss * scale / n` does; DeepSpeed clips with clip / (norm + 1e-6) like
  Megatron-LM and reports the pre-clip global norm, returned as the grad norm;
- fp16: the loss scale comes from the trainer's LossScaler (Megatron's hysteresis and growth rule)
  through `override_loss_scale`, so the logged scale is the one used; a step with inf/nan
  gradients is skipped by DeepSpeed and reported as skipped, with a nan grad norm.

On a machine without CUDA, DeepSpeed runs on its CPU accelerator (DS_ACCELERATOR=cpu, gloo): the
same code path, which is how CI checks the numerics. DeepSpeedCPUAdam is compiled on first use
(about a minute) into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) and reused after.
"""

import gc
import logging
import math
import os

import torch

from ..errors import ArgumentError
from ..model import lm_loss
from ..optim import no_weight_decay
from .megatron_lm import to_device
from .protocol import Method, StepResult
from ..checkpointing.deepspeed_files import check_deepspeed_files
from .zero_configs import CONFIGS, deepspeed_config


def placement(args, plan, device, dtype):
    return None  # DeepSpeed takes the whole fp32 model from the host


def build(args, plan, model, device, dtype, seeds, log) -> "ZeroMethod":
    method = build_zero_method(args, model, device, dtype)
    method.seeds, method.device = seeds, device
    return method



def import_deepspeed(device: torch.device):
    """Import DeepSpeed with the accelerator that matches the trainer's device."""
    if device.type != "cuda":
        # Without this DeepSpeed also falls back to its CPU accelerator, but with a warning and
        # after probing for other accelerators' packages.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # Warnings only (overflows, memory pressure): INFO lines from every rank would interleave
    # with the trainer's log lines, which are the contract.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    accel = get_accelerator().device_name()
    if accel != device.type:
        raise RuntimeError(f"DeepSpeed picked the '{accel}' accelerator but the trainer runs on "
                           f"{device.type}: set DS_ACCELERATOR={device.type}")
    return deepspeed


def device_name(device: torch.device) -> str:
    return "the CPU (DeepSpeed's CPU accelerator)" if device.type == "cpu" else str(device)


def weight_decay_groups(model: torch.nn.Module, args):
    """Megatron-LM's groups: decay for matrices, none for biases and 1-D (norm) parameters."""
    decay, nodecay = [], []
    for name, param in model.named_parameters():  # shared (tied) weights come once
        if param.requires_grad:
            (nodecay if no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "wd_mult": 1.0, "weight_decay": args.weight_decay},
              {"params": nodecay, "wd_mult": 0.0, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def partition_to_host(deepspeed, model, config, device, dtype) -> None:
    """ZeRO-Infinity's way in for a model built outside `zero.Init`: convert it parameter by
    parameter to ZeRO-3 partitions in pinned host memory, so the whole model never has to fit on
    the GPU (deepspeed.initialize would first move it there in one piece)."""
    model.to(dtype=dtype)  # on the host: ZeRO-3 expects partitions already in the compute dtype
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = buf.to(device)
    # mem_efficient_linear would replace torch.nn.functional.linear process-wide; megatron-core's
    # linear layers do not call it, and later runs in the same process must see the original.
    deepspeed.zero.Init(module=model, config_dict_or_path=config, remote_device="cpu", pin_memory=True,
                        dtype=dtype, mem_efficient_linear=False)


def register_tied_output_weight(deepspeed, model) -> None:
    """ZeRO-3 gathers a module's own parameters around its forward; the output layer of a GPT with
    tied embeddings is handed the embedding's weight, so it must gather that one too."""
    if getattr(model, "share_embeddings_and_output_weights", False) and getattr(model, "post_process", True):
        deepspeed.zero.register_external_parameter(model.output_layer, model.shared_embedding_or_output_weight())


class ZeroMethod(Method):
    """The method protocol (methods/protocol.py) over a DeepSpeed engine."""

    seeds = None  # the trainer's DropoutSeeds (set by build)
    device = None

    def __init__(self, name: str, engine, args):
        self.name = name
        self.engine = engine
        self.fp16 = bool(args.fp16)
        self._pinned_at_shutdown = None

    @property
    def optimizers(self):
        # The ZeRO optimizer's param_groups are its inner DeepSpeedCPUAdam's groups: the scheduler
        # writes lr and weight_decay into the dicts the CPU Adam reads.
        return [self.engine.optimizer]

    def learning_rate(self) -> float:
        return self.engine.optimizer.param_groups[0]["lr"]

    def train_step(self, batches, scaler) -> StepResult:
        """One optimizer step over the micro-batches, with DeepSpeed's pre-clip grad norm."""
        engine = self.engine
        if self.fp16:
            engine.optimizer.override_loss_scale(scaler.scale)
        losses = []
        for index, batch in enumerate(batches):
            self.seeds.microbatch = index
            loss = lm_loss(engine, to_device(batch, self.device))
            engine.backward(loss)  # (loss / micro-batches) x loss scale
            engine.step()  # reduces and offloads gradients; the CPU Adam steps on the last one
            losses.append(loss.detach())
        skipped = not engine.was_step_applied()
        if skipped:
            drop_stale_gradient_partitions(engine.optimizer)
        norm = engine.get_global_grad_norm()
        grad_norm = float("nan") if skipped or norm is None else float(norm)
        if not math.isfinite(grad_norm):
            grad_norm = float("nan")
        scaler.update(skipped)
        return StepResult(float(torch.stack(losses).mean()), grad_norm, skipped)

    def eval_losses(self, batches) -> list:
        return [float(lm_loss(self.engine, to_device(b, self.device))) for b in batches]

    def stats(self) -> dict:
        pinned = self._pinned_at_shutdown if self._pinned_at_shutdown is not None else pinned_host_bytes()
        return {"pinned bytes": pinned}

    # ----- checkpoints: DeepSpeed's own files in the iteration directory -----

    def save_engine(self, root: str, tag: str) -> None:
        # every rank writes its partitions; DeepSpeed's own 'latest' file is not written
        self.engine.save_checkpoint(root, tag=tag, client_state={}, save_latest=False)

    def load_engine(self, root: str, tag: str) -> None:
        check_deepspeed_files(os.path.join(root, tag))  # DeepSpeed unpickles: data only
        loaded, _ = self.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise ValueError("DeepSpeed found no checkpoint there")

    def shutdown(self) -> None:
        if self._pinned_at_shutdown is None:
            self._pinned_at_shutdown = pinned_host_bytes()
            # Removes ZeRO-3's module hooks and frees its buffers (tests train many models in a
            # process).
            self.engine.destroy()


def drop_stale_gradient_partitions(zero) -> None:
    """Work around a DeepSpeed 0.19 bug in ZeRO-1/2 with optimizer offload and fp32 gradient
    accumulation: a step skipped for inf/nan gradients leaves them in the fp32 gradient partition
    (`averaged_gradients`), so every later step overflows too (an fp16 run never steps again).
    DeepSpeed's own overflow path without offload drops these buffers; do the same here, so the
    next step accumulates into fresh zeros like after a successful step."""
    stale = getattr(zero, "averaged_gradients", None)
    if getattr(zero, "cpu_offload", False) and isinstance(stale, dict):
        for key in list(stale):
            stale[key] = None


def pinned_host_bytes() -> int:
    """Page-locked host memory held by live tensors of this process, each storage counted once.

    DeepSpeed pins in many places (parameter, gradient and fp32 master partitions, staging
    buffers), some reachable only through objects it builds internally (on an H200, walking the
    ZeRO-3 optimizer's attributes found 1.14 of the 1.90 GiB), so this counts what is alive; in a
    training process all of it is DeepSpeed's. Without CUDA nothing can be page-locked."""
    if not torch.cuda.is_available():
        return 0
    gc.collect()  # an earlier run's engine in this process (tests) may be garbage not yet collected
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.is_pinned():
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def build_zero_method(args, model, device, dtype) -> ZeroMethod:
    """Wrap the trainer's (fp32, CPU) model in a DeepSpeed engine for args.offload_method."""
    method = args.offload_method
    if method not in CONFIGS:
        raise ValueError(f"not a ZeRO method: {method}")
    deepspeed = import_deepspeed(device)
    # DeepSpeed asserts that a launcher set LOCAL_RANK; the trainer's default is rank 0 (as in
    # pick_device) when started without torchrun.
    os.environ.setdefault("LOCAL_RANK", "0")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    for flag, supported in (("fp16", accel.is_fp16_supported), ("bf16", accel.is_bf16_supported)):
        if getattr(args, flag) and not supported():
            raise ArgumentError(f"--{flag} is not supported by DeepSpeed on {device_name(device)}; "
                                f"{method} can train on it in the other precisions")
    config = deepspeed_config(method, args)
    optimizer = DeepSpeedCPUAdam(weight_decay_groups(model, args), lr=args.lr,
                                 betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                                 weight_decay=args.weight_decay, adamw_mode=True)
    if method == "zero-infinity":
        partition_to_host(deepspeed, model, config, device, dtype)
        register_tied_output_weight(deepspeed, model)

    # DeepSpeed's setup must not shift the random streams that dropout draws from.
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)

    if engine.optimizer is None or not hasattr(engine.optimizer, "override_loss_scale"):
        raise RuntimeError(f"{method}: DeepSpeed did not build a ZeRO optimizer "
                           f"({type(engine.optimizer).__name__})")
    return ZeroMethod(method, engine, args)
