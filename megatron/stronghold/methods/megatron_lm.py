"""megatron-lm: every layer on the GPU, trained micro-batch by micro-batch with Megatron-LM's
mixed-precision AdamW (optim.ResidentOptimizer). The streaming methods inherit its step for their
resident part."""

import math

import torch

from ..model import lm_loss
from ..optim import ResidentOptimizer, clip_coefficient, global_norm
from .protocol import Method, StepResult


def placement(args, plan, device, dtype):
    return lambda index, layer: layer.to(device=device, dtype=dtype)


def build(args, plan, model, device, dtype, seeds, log) -> "MegatronLM":
    model.to(device=device, dtype=dtype)
    return MegatronLM(args, model, device, seeds, list(model.named_parameters()))


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class MegatronLM(Method):
    def __init__(self, args, model, device, seeds, resident_params):
        self.name = args.offload_method
        self.args, self.model, self.device, self.seeds = args, model, device, seeds
        self.resident = ResidentOptimizer(resident_params, args)

    @property
    def optimizers(self) -> list:
        return [self.resident]

    def learning_rate(self) -> float:
        return next(group["lr"] for optimizer in self.optimizers for group in optimizer.param_groups)

    # ----- the step -----

    def train_step(self, batches, scaler) -> StepResult:
        inv_scale = 1.0 / scaler.scale
        losses = self.forward_backward([to_device(b, self.device) for b in batches], scaler.scale)
        sumsq, found_inf = self.gradient_stats(inv_scale)
        sumsq = _sum_over_tensor_parallel(sumsq, self.device)
        found_inf = found_inf or not math.isfinite(sumsq)  # an overflow on any rank skips the step on all
        grad_norm = global_norm(sumsq)
        coeff = 1.0 if found_inf else clip_coefficient(grad_norm, self.args.clip_grad)
        self.optimizer_step(coeff, skip=found_inf)
        scaler.update(found_inf)
        return StepResult(self._mean_loss(losses), grad_norm, found_inf)

    def forward_backward(self, batches, loss_scale: float) -> list:
        """Megatron-LM's order: each micro-batch's forward and backward in turn, gradients summed in
        the fp32 main grads; returns the detached losses."""
        losses = []
        for index, batch in enumerate(batches):
            self.seeds.microbatch = index
            loss = lm_loss(self.model, batch)
            (loss * (loss_scale / len(batches))).backward()
            losses.append(loss.detach())
        return losses

    def gradient_stats(self, inv_scale: float):
        """(sum of squares of the unscaled gradients on this rank, any non-finite)."""
        self.resident.average_over_data_parallel()
        sumsq, found_inf = self.resident.unscale_and_measure(inv_scale)
        return float(sumsq), bool(found_inf)

    def optimizer_step(self, coeff: float, skip: bool) -> None:
        self.resident.step(coeff, skip=skip)

    def _mean_loss(self, losses) -> float:
        loss = torch.stack(losses).mean()
        if self.args.data_parallel_size > 1:  # the logged loss is the mean over data-parallel ranks, as Megatron's
            from megatron.core import parallel_state

            torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            loss /= self.args.data_parallel_size
        return float(loss)

    def eval_losses(self, batches) -> list:
        return [float(lm_loss(self.model, to_device(b, self.device))) for b in batches]

    # ----- checkpoints -----

    def state_dict(self) -> dict:
        """{parameter name: {"param": fp32 value, "exp_avg", "exp_avg_sq", "step"}}; tensors are views
        of the optimizer's own."""
        return self.resident.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.resident.load_state_dict(state)


def _sum_over_tensor_parallel(value: float, device) -> float:
    """Each tensor-parallel rank measured its own shards (replicated parameters once): add them up."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    torch.distributed.all_reduce(t, group=parallel_state.get_tensor_model_parallel_group())
    return float(t)
