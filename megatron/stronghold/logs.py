"""The log contract: Megatron-LM's iteration line plus a start banner and an end summary.

Writing and reading live side by side so they cannot drift apart; tests and the extraction scripts
read logs only through `parse_log`.
"""

import re
import time
from dataclasses import dataclass, field


def iteration_line(it, train_iters, fields: dict) -> str:
    parts = [f" iteration {it:8d}/{train_iters:8d} |"]
    for key, value in fields.items():
        parts.append(f" {key}: {value} |")
    return "".join(parts)


class Progress:
    """A progress line at most every `interval` seconds during long start-up work (a 10 B model takes
    minutes to build and to fill its host store): '<what>: 12 of 200 layers, 3.4 GiB, 5 s'. Quick work
    prints nothing; work that printed a line also prints its last."""

    interval = 5.0

    def __init__(self, what: str, total: int, log):
        self.what, self.total, self.log = what, total, log
        self.start = self.last = time.perf_counter()
        self.nbytes, self.printed = 0, False

    def step(self, done: int, nbytes: int = 0) -> None:
        self.nbytes += nbytes
        now = time.perf_counter()
        if now - self.last >= self.interval or (done == self.total and self.printed):
            self.last, self.printed = now, True
            self.log(f"{self.what}: {done} of {self.total} layers, {self.nbytes / 2 ** 30:.1f} GiB, "
                     f"{now - self.start:.0f} s")


def summary_line(fields: dict) -> str:
    return "summary |" + "".join(
        f" {k}: {v:.3f} |" if isinstance(v, float) else f" {k}: {v} |" for k, v in fields.items())


_ITER = re.compile(r"\biteration\s+(\d+)/\s*(\d+) \|(.*)$")
_FIELD = re.compile(r"\s*([^:|]+?):\s*([^|]+?)\s*\|")
_PARAMS = re.compile(r"total parameters: (\d+) \(([\d.]+) B\)")
# examples/run.sh appends this line to a run's log when the run ends, so that a log without a summary
# still tells how the run ended (137: killed, usually by the kernel for want of host memory)
_EXIT = re.compile(r"^examples/run\.sh: method \S+ exited with status (\d+)(?: \(.*\))?$")  # (signal ...)


def _number(text):
    """A field's value: int, float, None (the trainer prints an unset value, e.g. the window of a
    method that streams nothing, as Python's None), else the text."""
    if text.strip() == "None":
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text.strip()


@dataclass
class TrainingLog:
    config: dict = field(default_factory=dict)      # the start banner's "key: value" fields
    total_parameters: int = None
    iterations: list = field(default_factory=list)  # one dict per iteration line
    summary: dict = field(default_factory=dict)
    exit_status: int = None                         # from examples/run.sh's last line, when it ran the job

    def series(self, key):
        return [row[key] for row in self.iterations]


def parse_fields(text: str) -> dict:
    return {k.strip(): _number(v) for k, v in _FIELD.findall(text if text.endswith("|") else text + " |")}


def parse_log(text: str) -> TrainingLog:
    log = TrainingLog()
    for line in text.splitlines():
        m = _ITER.search(line)
        if m:
            row = {"iteration": int(m.group(1)), "train_iters": int(m.group(2))}
            row.update(parse_fields(m.group(3)))
            log.iterations.append(row)
            continue
        m = _PARAMS.search(line)
        if m:
            log.total_parameters = int(m.group(1))
            continue
        if line.startswith("config |"):
            log.config.update(parse_fields(line[len("config |"):]))
        elif line.startswith("summary |"):
            log.summary.update(parse_fields(line[len("summary |"):]))
        elif m := _EXIT.match(line):
            log.exit_status = int(m.group(1))
    return log


def read_log(path) -> TrainingLog:
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_log(f.read())
