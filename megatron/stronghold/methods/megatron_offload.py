"""megatron-offload: what Megatron-LM users already have for models larger than the GPU's optimizer
memory, megatron-core's own optimizer CPU offload, over the same model, data, dropout seeds, logs and
per-parameter checkpoints as every other method.

It is Megatron-LM's `--optimizer-cpu-offload --optimizer-offload-fraction F --overlap-cpu-optimizer-d2h-h2d
--use-precision-aware-optimizer --use-distributed-optimizer`: megatron-core's DistributedDataParallel (fp32
gradient buffers) around Float16Module, and get_megatron_optimizer's distributed optimizer, whose
HybridDeviceOptimizer steps the fraction F of the parameters on the CPU (torch's fused AdamW, fp32
masters and moments) and the rest on the GPU, copying gradients down and weights back on side streams.
Every layer's weights stay on the GPU: the offload saves optimizer memory only.

Without CUDA megatron-core cannot build it (its gradient buffers and copy streams are CUDA's): such a
run is refused before anything is allocated (arguments.py). bf16 only: fp32 parameters cannot be
offloaded by the distributed optimizer and fp16's loss scaling is megatron-core's own here.
"""

import contextlib

import torch

from ..model import lm_loss
from .megatron_lm import placement, to_device  # noqa: F401  (placement: every layer on the GPU, as megatron-lm)
from .protocol import Method, StepResult


def build(args, plan, model, device, dtype, seeds, log) -> "MegatronOffload":
    return MegatronOffload(args, plan, model, device, dtype, seeds)


def optimizer_config(args, fraction: float):
    from megatron.core.optimizer import OptimizerConfig

    config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True, optimizer_cpu_offload=True,
        optimizer_offload_fraction=fraction, overlap_cpu_optimizer_d2h_h2d=True)
    # Megatron-LM pairs the offload with the precision-aware optimizer. Set after construction: its check
    # of Transformer Engine's version fails where TE is not installed, and neither needs it here.
    config.use_precision_aware_optimizer = True
    config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 = True
    config.store_param_remainders = False
    return config


class MegatronOffload(Method):
    def __init__(self, args, plan, model, device, dtype, seeds):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        self.name = args.offload_method
        self.args, self.model, self.device, self.seeds = args, model, device, seeds
        self.fraction = plan.fraction  # the user's --optimizer-offload-fraction, or the pre-flight check's
        model.to(device=device, dtype=dtype)
        model.config.bf16 = True
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=True)
        self.ddp = DistributedDataParallel(model.config, ddp_config, Float16Module(model.config, model))
        self.optimizer = get_megatron_optimizer(optimizer_config(args, self.fraction), [self.ddp])
        self.distributed = self.optimizer.chained_optimizers[0]
        # megatron-core's masters are the bf16 weights widened, as the other methods' (optim.ResidentOptimizer)
        self.params = dict(model.named_parameters())

    @property
    def optimizers(self) -> list:
        return [self.optimizer]

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def setup_line(self) -> str:
        on_cpu = sum(t.numel() for t in self.distributed.optimizer.gpu_params_map_cpu_copy.values())
        return (f"megatron-core optimizer CPU offload: fraction {self.fraction:g}, {on_cpu / 1e9:.3f} B parameters "
                f"stepped on the CPU (HybridDeviceOptimizer, overlapped copies), the rest on the GPU")

    def train_step(self, batches, scaler) -> StepResult:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = []
        for index, batch in enumerate(batches):
            self.seeds.microbatch = index
            last = index == len(batches) - 1
            with contextlib.nullcontext() if last else self.ddp.no_sync():
                loss = lm_loss(self.ddp, to_device(batch, self.device))
                (loss / len(batches)).backward()
            losses.append(loss.detach())
        self.ddp.finish_grad_sync()
        applied, grad_norm, _ = self.optimizer.step()  # clips by the global norm, then steps both sides
        scaler.update(not applied)
        norm = float("nan") if grad_norm is None else float(grad_norm)
        return StepResult(float(torch.stack(losses).mean()), norm, not applied)

    def eval_losses(self, batches) -> list:
        return [float(lm_loss(self.ddp, to_device(b, self.device))) for b in batches]

    def stats(self) -> dict:
        from .zero import pinned_host_bytes

        return {"pinned bytes": pinned_host_bytes()}

    # ----- checkpoints: the same per-parameter entries as megatron-lm's -----

    def state_dict(self) -> dict:
        out = {}
        for name, p in self.params.items():
            try:
                state = self.distributed._get_main_param_and_optimizer_states(p)
            except KeyError:  # before the first step the optimizer has no state: the master is the weight
                out[name] = {"param": p.detach().float()}
                continue
            entry = {"param": state["param"].detach().view(p.shape)}
            if "exp_avg" in state:
                entry.update(exp_avg=state["exp_avg"].view(p.shape), exp_avg_sq=state["exp_avg_sq"].view(p.shape),
                             step=int(state["step"]))
            out[name] = entry
        return out

    def load_state_dict(self, state: dict) -> None:
        from ..checkpointing.format import entry_master

        hybrid = self.distributed.optimizer
        for name, p in self.params.items():
            if name not in state:
                raise ValueError(f"{name} is missing from the checkpoint")
            entry = state[name]
            # each state where its optimizer keeps it: the offloaded share on the host (on the GPU first,
            # all at once, it would take the memory the offload exists to save)
            group, index = self.distributed.model_param_group_index_map[p]
            where = hybrid.param_to_inner_param[hybrid.param_groups[group]["params"][index]].device
            master = entry_master(entry).to(device=where, dtype=torch.float32).flatten()
            # weights only (--finetune, or before the first step): fresh moments, as Adam's first step has
            moments = [entry[k].to(where, torch.float32).flatten() if "exp_avg" in entry else torch.zeros_like(master)
                       for k in ("exp_avg", "exp_avg_sq")]
            self.distributed._set_main_param_and_optimizer_states(
                p, {"param": master, "exp_avg": moments[0], "exp_avg_sq": moments[1],
                    "step": torch.tensor(float(entry.get("step", 0)))})
            p.data.copy_(master.view(p.shape))  # the bf16 weights the next forward uses
        hybrid._sync_hdo_state_to_sub_optimizers()
        # megatron-core 0.16.1 tells its CPU optimizers from its GPU one by class, and without Transformer
        # Engine or apex both are torch's AdamW: the sync above moved the GPU side's state to the host too
        gpu_optimizer = getattr(hybrid, "gpu_optimizer", None)
        if gpu_optimizer is not None:
            for param, param_state in gpu_optimizer.state.items():
                for key, value in param_state.items():
                    if torch.is_tensor(value):
                        param_state[key] = value.to(param.device)
