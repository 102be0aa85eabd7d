"""How a run ends: saving at the right iterations, stopping on a signal or on non-finite losses,
and the process's exit status for each way of ending.

Exit status: 0 done (or stopped by a signal after a checkpoint was saved); 1 a checkpoint could not
be written, out of memory, or a CPU optimizer step failed; 2 bad input (flags, data, a checkpoint that does not fit), reported
before anything large is allocated; 3 stopped by non-finite losses; 128 + N stopped by signal N
without a checkpoint.
"""

import json
import math
import os
import signal
import sys
import threading
import time
import traceback

import torch

from .errors import ArgumentError, first_line
from .checkpointing import SaveError, find_checkpoint, iteration_dir
from .distributed import gather, is_first_rank
from .executor.cpu_worker import CpuStepError

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 1
EXIT_OUT_OF_MEMORY = 1
EXIT_CPU_STEP_FAILED = 1

# The failures a user acts on: one message on stderr and an exit status, no traceback (anything
# else is a bug, and its traceback is what a bug report needs; a failed CPU step prints its cause's).
REPORTED = (ArgumentError, SaveError, torch.OutOfMemoryError, CpuStepError)


def report(exc: BaseException) -> int:
    """Print the message for one of REPORTED and return the process's exit status."""
    if isinstance(exc, torch.OutOfMemoryError):  # a model at the edge of what the pre-flight check admits
        message = (f"out of memory during training: {first_line(exc)}\nUse fewer layers, full activation "
                   "recompute (--recompute-granularity full), a smaller micro-batch, or --offload-method "
                   "stronghold.")
        status = EXIT_OUT_OF_MEMORY
    elif isinstance(exc, CpuStepError):  # the cause's traceback is what a bug report needs
        if exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        message = (f"{exc}\nThe run stopped there: nothing was saved after that step, and the newest "
                   "checkpoint in --save (if any) is intact.")
        status = EXIT_CPU_STEP_FAILED
    else:  # SaveError: disk full while saving, and the previous checkpoint stays
        message, status = str(exc), EXIT_BAD_INPUT if isinstance(exc, ArgumentError) else EXIT_SAVE_FAILED
    # Bad input is mostly the same on every rank (the flags, the data, the checkpoint): rank 0 says it once
    # for all; the others leave it in torchrun's error file, which megatron/stronghold/torchrun.py prints
    # where a rank refused alone (its GPU's free memory, say).
    if status != EXIT_BAD_INPUT or is_first_rank():
        print(f"error: {message}", file=sys.stderr, flush=True)
    elif os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    return status


class RunGuard:
    """Decides after each iteration whether to save and whether to stop.

    - --save-interval N: save every N iterations; the last iteration and --exit-interval save too.
    - SIGTERM / SIGINT: finish the current iteration, save (with --save), stop: exit status 0 after
      a save, 128 + signal number without one. A second signal stops at once.
    - non-finite losses: the step of such an iteration is always skipped (every method skips a
      step whose gradients are not finite), so the weights stay those of the last good iteration.
      A run stops, without saving, after --exit-on-nonfinite-iters consecutive "bad" iterations:
      a non-finite loss, or (without --fp16) non-finite gradients. With --fp16 an overflow in the
      gradients alone is the loss scaler's business and does not count. No checkpoint is written
      while the last iteration was bad, so the newest checkpoint is the last good one.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, args, save, log):
        self.args, self.save, self.log = args, save, log
        self.received = None
        self.bad = 0
        self.exit_code = 0
        self.saved_at = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}
        return False

    def _handle(self, signum, frame):
        # No logging here: the handler may interrupt a print of the main thread.
        if self.received is not None:  # asked twice: stop now (SIG_DFL: the run may have inherited SIGINT
            signal.signal(signum, signal.SIG_DFL)  # ignored, as `setsid CMD &` from a script starts it)
            signal.raise_signal(signum)
            return
        self.received = signum

    def _save(self, iteration: int) -> bool:
        if self.saved_at == iteration:
            return True
        if self.bad:
            self.log(f"not saving a checkpoint at iteration {iteration}: its loss is not finite")
            return False
        self.save(iteration)
        self.saved_at = iteration
        return True

    def after_iteration(self, iteration: int, loss: float, skipped: bool) -> bool:
        """True when the run must stop now (self.exit_code says how it ends)."""
        args = self.args
        bad = not math.isfinite(loss) or (skipped and not args.fp16)
        self.bad = self.bad + 1 if bad else 0
        limit = args.exit_on_nonfinite_iters
        if limit and self.bad >= limit:
            where = ""
            if args.save and self.saved_at is not None:
                where = f"; the last good checkpoint is {iteration_dir(args.save, self.saved_at)}"
            elif args.save:
                try:
                    found = find_checkpoint(args.save)
                except ValueError:
                    found = None
                if found:
                    where = f"; the newest checkpoint is {found[1]}"
            self.log(f"error: stopping at iteration {iteration}: the loss or the gradients were not finite "
                     f"in {self.bad} consecutive iteration(s) (--exit-on-nonfinite-iters {limit}); those "
                     f"steps were skipped and nothing was saved{where}")
            self.exit_code = EXIT_NONFINITE
            return True
        exit_now = bool(args.exit_interval) and iteration % args.exit_interval == 0
        if args.save and (iteration == args.train_iters or exit_now
                          or (args.save_interval and iteration % args.save_interval == 0)):
            self._save(iteration)
        # Ranks receive a signal at slightly different times: all stop after the same iteration, or one
        # stopped alone would leave the others waiting in a collective.
        received = next((r for r in gather(self.received) if r is not None), None)
        if received is not None:
            name = signal.Signals(received).name
            saved = bool(args.save) and self._save(iteration)
            self.exit_code = 0 if saved else 128 + received
            self.log(f"received {name}: stopped after iteration {iteration}, "
                     + (f"checkpoint saved in {args.save}" if saved else "no checkpoint saved (no --save)"
                        if not args.save else "no checkpoint saved (loss not finite)"))
            return True
        if exit_now:
            self.log(f"exiting after iteration {iteration} (--exit-interval {args.exit_interval})")
            return True
        return False
