"""What the trainer and the checkpoint code ask of a training method."""

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the step's micro-batches (and data-parallel ranks)
    grad_norm: float  # global L2 norm before clipping; nan when the step was skipped for inf/nan
    skipped: bool  # fp16 overflow: no parameter changed


class Method(Protocol):
    name: str
    # "per-parameter": state_dict / load_state_dict below, the same for every such method (so their
    # checkpoints cross methods); "deepspeed": DeepSpeed's engine writes and reads its own files
    checkpoint_format: str

    @property
    def optimizers(self) -> list:
        """Objects with param_groups, which the learning-rate schedule writes."""

    def train_step(self, batches: list, scaler) -> StepResult:
        """Forward, backward and optimizer step over one global batch's micro-batches (host tensors)."""

    def eval_losses(self, batches: list) -> list:
        """Forward only, under no_grad: each micro-batch's loss."""

    def learning_rate(self) -> float: ...

    def setup_line(self) -> str | None:
        """A log line once the method is built (the streaming methods' host store), or None."""

    def stats(self) -> dict:
        """Fields for the summary line: pinned host bytes, the executor's timers, link bytes and step
        counts; keys as logged."""

    def watch(self, observer) -> None:
        """observer(event, **details): the executor's events, for tools that watch a run."""

    def shutdown(self) -> None: ...

    # per-parameter checkpoints: {parameter name: {"param": fp32, "exp_avg", "exp_avg_sq", "step"}}
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
