"""torchrun, ending as a single process would: `python -m megatron.stronghold.torchrun ARGS` takes
torchrun's arguments and runs torch.distributed.run as torchrun does, and only its ending differs.

torchrun answers any worker failure with its own traceback and status 1, so a user's error reported
by the workers (one `error:` line, status 2) reached the user buried under 27 lines and as an internal
error. Here the run's status is its workers': 0 when all ended well, else the first failure's (128 + N
for a worker killed by signal N), with one line naming the rank, and none for status 2, whose message
rank 0 has printed (run_control.report).
"""

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

# run_control.EXIT_BAD_INPUT, not imported: that would load the trainer into torchrun's process
EXIT_BAD_INPUT = 2


def first_failure(exc: ChildFailedError):
    """(rank, failure) that ended the run: the earliest, leaving out the ranks torchrun itself stopped with
    SIGTERM once another had failed (their failures may be stamped first, in the same second)."""
    failures = exc.failures
    own = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    rank = min(own, key=lambda r: (own[r].timestamp, r))
    return rank, failures[rank]


def status_of(exc: ChildFailedError) -> int:
    rank, failure = first_failure(exc)
    status = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    rank0_said_it = exc.failures.get(0) is not None and exc.failures[0].exitcode == EXIT_BAD_INPUT
    if status == EXIT_BAD_INPUT and not rank0_said_it:  # its message is in its error file (run_control.report)
        print(f"error: rank {rank}: {failure.message or 'refused its input (status 2)'}", file=sys.stderr, flush=True)
    elif status != EXIT_BAD_INPUT:
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"status {status}"
        print(f"error: rank {rank} ended with {how}; the other ranks were stopped (see the lines above)",
              file=sys.stderr, flush=True)
    return status


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        return status_of(exc)
    except SignalException as exc:  # a signal to torchrun itself: it passed it on to the workers
        print(f"error: torchrun received {signal.Signals(exc.sigval).name} and stopped the workers",
              file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
