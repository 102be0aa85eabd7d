"""TensorBoard event files, with Megatron-LM's flags and tag names, written by the tensorboard
package's writer (torch.utils.tensorboard.SummaryWriter).

    --tensorboard-dir DIR            write events to DIR (rank 0, one event file per run)
    --tensorboard-log-interval N     every N iterations (default 1)
    --tensorboard-queue-size Q       events buffered before a write to disk (default 1000)
    --log-timers-to-tensorboard      also the streaming executor's timers and link volume
    --log-memory-to-tensorboard      also memory: GPU (megatron-core's allocator counters) and host

Every iteration written: `lm loss`, `learning-rate`, `grad-norm`, `loss-scale` (each also "vs samples",
as Megatron-LM), `iteration-time` (s), `samples-per-second` and `throughput` (TFLOP/s per GPU), the
values of that iteration, which are the iteration line's when --log-interval is 1. After each
evaluation `lm loss validation`. The timers and link volume are the summary line's fields, per
iteration since the last write (`cpu work (ms/iter)`, `host-to-device (MiB/iter)`, ...), so their
mean over a run is the summary's value.
"""

import contextlib
import os
import resource

from .errors import ArgumentError
from .distributed import is_first_rank


class TensorBoard:
    def __init__(self, args, start_iteration: int):
        from torch.utils.tensorboard import SummaryWriter

        self.interval = args.tensorboard_log_interval
        self.timers, self.memory = args.log_timers_to_tensorboard, args.log_memory_to_tensorboard
        self.writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=args.tensorboard_queue_size)
        self.last_counted = start_iteration  # a resumed run counts from its checkpoint
        self.counted = {}

    def _due(self, iteration: int) -> bool:
        return iteration % self.interval == 0

    def iteration(self, iteration: int, consumed: int, **scalars) -> None:
        """lm_loss, learning_rate, grad_norm, loss_scale, seconds, samples_per_second, tflops."""
        if not self._due(iteration):
            return
        add = self.writer.add_scalar
        for tag, key in (("lm loss", "lm_loss"), ("learning-rate", "learning_rate"), ("grad-norm", "grad_norm"),
                         ("loss-scale", "loss_scale")):
            add(tag, scalars[key], iteration)
            add(f"{tag} vs samples", scalars[key], consumed)
        add("iteration-time", scalars["seconds"], iteration)
        add("samples-per-second", scalars["samples_per_second"], iteration)
        add("throughput", scalars["tflops"], iteration)

    def validation(self, iteration: int, consumed: int, loss: float) -> None:
        self.writer.add_scalar("lm loss validation", loss, iteration)
        self.writer.add_scalar("lm loss validation vs samples", loss, consumed)

    def counters(self, iteration: int, method, device) -> None:
        """The method's timers and link bytes since the last write, and memory; after the iteration's
        evaluation, whose copies count in its iteration as in the summary line."""
        if not self._due(iteration) or not (self.timers or self.memory):
            return
        add = self.writer.add_scalar
        stats = method.stats()
        if self.timers:
            steps = max(iteration - self.last_counted, 1)
            totals = {f"{k} (ms/iter)": v * 1000 for k, v in stats.get("timers", {}).items()}
            totals.update({f"{k} (MiB/iter)": v / 2 ** 20 for k, v in stats.get("link", {}).items()})
            for tag, total in totals.items():
                add(tag, (total - self.counted.get(tag, 0)) / steps, iteration)
                self.counted[tag] = total
        if self.memory:
            if device.type == "cuda":
                import torch

                mem = torch.cuda.memory_stats(device)
                add("mem-reserved-bytes", mem["reserved_bytes.all.current"], iteration)
                add("mem-allocated-bytes", mem["allocated_bytes.all.current"], iteration)
                add("mem-max-allocated-bytes", mem["allocated_bytes.all.peak"], iteration)
                add("mem-allocated-count", mem["allocation.all.current"], iteration)
            add("mem-host-max-rss-bytes", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, iteration)
            if "pinned bytes" in stats:
                add("mem-host-pinned-bytes", stats["pinned bytes"], iteration)
        self.last_counted = iteration

    def close(self) -> None:
        self.writer.close()


def check_args(args) -> None:
    """The flags' values (ArgumentError); the directory is set up when the run opens it."""
    for name in ("tensorboard_log_interval", "tensorboard_queue_size"):
        if getattr(args, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.tensorboard_dir:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ArgumentError("--tensorboard-dir needs the tensorboard package (pip install tensorboard)") from None


def prepare_dir(args) -> None:
    """--tensorboard-dir DIR is created and must be writable (ArgumentError); rank 0 writes there."""
    if not args.tensorboard_dir or not is_first_rank():
        return
    try:
        os.makedirs(args.tensorboard_dir, exist_ok=True)
    except OSError as exc:
        raise ArgumentError(f"--tensorboard-dir {args.tensorboard_dir}: cannot create the directory "
                            f"({exc.strerror})") from None
    if not os.access(args.tensorboard_dir, os.W_OK | os.X_OK):
        raise ArgumentError(f"--tensorboard-dir {args.tensorboard_dir}: the directory is not writable")


@contextlib.contextmanager
def opened(args, start_iteration: int = 0):
    """The run's TensorBoard writer for the body's duration, or None without --tensorboard-dir and on
    ranks other than 0 (rank 0 logs the run); prepare_dir has made DIR."""
    writer = None
    if args.tensorboard_dir and is_first_rank():
        writer = TensorBoard(args, start_iteration)
    try:
        yield writer
    finally:
        if writer is not None:
            writer.close()
