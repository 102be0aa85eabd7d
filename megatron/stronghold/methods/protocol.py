"""What the trainer and the checkpoint code ask of a training method.

A method's class subclasses Method and overrides what it does differently: the defaults below are
those of a method whose one process holds every parameter's state (checkpointing/ calls them all;
which kind of checkpoint a method writes is its registry.MethodSpec.checkpoint)."""

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the step's micro-batches (and data-parallel ranks)
    grad_norm: float  # global L2 norm before clipping; nan when the step was skipped for inf/nan
    skipped: bool  # fp16 overflow: no parameter changed


class Method(Protocol):
    name: str  # its registry name (registry.spec(name) says how it checkpoints, ...)

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
        return None

    def stats(self) -> dict:
        """Fields for the summary line: pinned host bytes, the executor's timers, link bytes and step
        counts; keys as logged."""
        return {"pinned bytes": 0}

    def watch(self, observer) -> None:
        """observer(event, **details): the executor's events, for tools that watch a run."""

    def shutdown(self) -> None: ...

    # ----- "per-parameter" checkpoints: {parameter name: {"param": fp32, "exp_avg", "exp_avg_sq", "step"}},
    # the same for every such method, so that their checkpoints cross methods -----

    def state_dict(self) -> dict:
        """What rank 0 writes into the main file (tensors may alias the method's own)."""

    def load_state_dict(self, state: dict) -> None: ...

    def part_owners(self) -> list:
        """Data parallel: the global ranks whose state goes into the checkpoint (rank 0 writes the main
        file, each other one a part file of its own)."""
        return [0]

    def part_state_dict(self) -> dict:
        """Data parallel: what this rank alone holds and writes to its part file."""
        return {}

    def held_elsewhere(self) -> set:
        """Data parallel: names of the parameters that other ranks hold (and save)."""
        return set()

    def extra_state(self) -> dict:
        """Entries of the main file beside the parameters' (the streaming executor's step state)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # ----- "deepspeed" checkpoints: the engine writes and reads its own files -----

    def save_engine(self, root: str, tag: str) -> None:
        raise NotImplementedError(f"{self.name} writes per-parameter checkpoints")

    def load_engine(self, root: str, tag: str) -> None:
        raise NotImplementedError(f"{self.name} reads per-parameter checkpoints")
