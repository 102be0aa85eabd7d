"""Turn the logs of one artifact-evaluation case into a CSV table.

    python tools/extract_results.py caseN [--results DIR]     (or llama: tools/gpu_campaign.sh llama's runs)

Case N's runs (examples/caseN.sh) leave their logs in DIR/caseN/ (DIR: --results, else $RESULTS_DIR,
else results/); this writes DIR/caseN.csv, one row per configuration, read through
megatron.stronghold.logs.read_log. Where a configuration ran more than once the newest log wins.
A log without an end summary (a run that failed or was killed) gives a row without figures whose log
column says how it ended, unless the same method and size also completed (then it is left out): a
method that cannot train at a case's size shows as such rather than vanishing from the table.

Columns (COLUMNS below), the same for every case:
    method, layers, hidden, batch (micro-batch per GPU), window, params (B),
    samples/s, TFLOP/s (per GPU), iteration (ms), peak GPU (GiB), peak host (GiB), card, log
Throughput and times are the log summary's means, which leave out the first (warm-up) iteration.
TFLOP/s is the summary's when it has one; otherwise the model FLOPs per sample, taken from an
iteration line (its TFLOP/s over its samples/s), times the summary's samples/s. `card` is the GPU
named by the log's config line ("device: cuda (NVIDIA H100 80GB HBM3)"), or "CPU".

Case 1 has no training logs of its own: tools/largest_model.py writes its answer as a CSV into
DIR/case1/ (--out), and this merges every such CSV into DIR/case1.csv (same columns, throughput empty).
The largest-model CSV format (LARGEST_COLUMNS) is one header line and one row per method:

    method,largest layers,params (B),peak GPU (GiB),peak host (GiB),card
    megatron-lm,32,1.678,71.2,20.3,NVIDIA H100 80GB HBM3

  method            a method name of examples/run.sh
  largest layers    the largest layer count that trained
  params (B)        its total parameters, in billions
  peak GPU (GiB)    peak GPU memory of that run (its log summary's "peak GPU memory (GiB)")
  peak host (GiB)   peak host RSS of that run (its log summary's "peak host RSS (GiB)")
  card              the GPU's name, as in the log's config line
Optional further columns: hidden, batch, window (copied when present), and search: anything but
"complete" (a search stopped by a trial's timeout: the layer count is a lower bound) is appended to
the row's log column. Headers are matched loosely
(case, spaces, underscores and units do not matter: "largest_layers" and "params_b" are accepted).
Any file name ending in .csv works (suggested: largest_<method>.csv); for a method found in several
files, the most recently written file wins.
"""

import argparse
import csv
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron.stronghold.arguments import METHODS  # noqa: E402
from megatron.stronghold.logs import read_log  # noqa: E402

CASES = ("case1", "case2", "case3", "case4", "case5", "llama")  # llama: tools/gpu_campaign.sh's stage
METHOD_ORDER = METHODS
COLUMNS = ("method", "layers", "hidden", "batch", "window", "params (B)", "samples/s", "TFLOP/s",
           "iteration (ms)", "peak GPU (GiB)", "peak host (GiB)", "card", "log")
LARGEST_COLUMNS = ("method", "largest layers", "params (B)", "peak GPU (GiB)", "peak host (GiB)", "card")

# Log names written by examples/run.sh (-2, -3 after the stamp: launchers started in the same second); the window
# and time stamp are absent from tools/largest_model.py's trial logs, which case 2 may reuse for the baselines' points
LOG_NAME = re.compile(
    r"^log_(?P<method>[a-z0-9-]+)_l-(?P<layers>\d+)_hs-(?P<hidden>\d+)_bs-(?P<batch>\d+)"
    r"(?:_ws-(?P<window>\d+)_(?P<stamp>\d{8}-\d{6}(?:-\d+)?))?\.txt$")
CARD = re.compile(r"^cuda\s*\((?P<name>.*)\)\s*$")


class ExtractionError(Exception):
    pass


def card_name(device) -> str:
    """'cuda (NVIDIA H100 80GB HBM3)' -> 'NVIDIA H100 80GB HBM3'; a CPU run -> 'CPU'."""
    device = str(device or "").strip()
    m = CARD.match(device)
    if m:
        return m.group("name").strip()
    if device.startswith("cpu"):
        return "CPU"
    return device or "unknown"


def fmt(value, digits=6):
    """Numbers as short text; None as an empty cell."""
    if value is None or value == "":
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.{digits}g}"


def tflops(log):
    if isinstance(log.summary.get("TFLOP/s per GPU"), (int, float)):
        return float(log.summary["TFLOP/s per GPU"])
    samples = log.summary.get("samples per second")
    # The line with the largest TFLOP/s has the most significant digits of the FLOPs per sample.
    lines = [r for r in log.iterations
             if isinstance(r.get("TFLOP/s per GPU"), (int, float)) and r["TFLOP/s per GPU"] > 0
             and isinstance(r.get("samples per second"), (int, float)) and r["samples per second"] > 0]
    if not isinstance(samples, (int, float)):
        return None
    if not lines:
        # Every line rounds to 0.000 (a toy model on a CPU) or none has the field.
        logged = [r["TFLOP/s per GPU"] for r in log.iterations if isinstance(r.get("TFLOP/s per GPU"), (int, float))]
        return 0.0 if logged else None
    best = max(lines, key=lambda r: r["TFLOP/s per GPU"])
    return best["TFLOP/s per GPU"] / best["samples per second"] * samples


def failed_row(path, log) -> dict:
    """The row of a run that ended without a summary: its configuration (from the config line, else the
    log's name), no figures, and how it ended in the log column, so a table and plot can show that the
    method did not train at this size."""
    c, name = log.config, LOG_NAME.match(os.path.basename(path))
    if not c and not name:
        raise ExtractionError(f"{path}: no summary line and no config line (the run failed at start)")
    size = {k: c.get(key) if c else _number(name.group(k), int)
            for k, key in (("layers", "layers"), ("hidden", "hidden"), ("batch", "micro batch"), ("window", "window"))}
    how = ("killed (exit 137: usually out of host memory)" if log.exit_status == 137 else
           f"failed (exit {log.exit_status})" if log.exit_status is not None else "failed or stopped")
    params = log.total_parameters
    return {"method": c.get("method") or name.group("method"), **size,
            "params (B)": fmt(params / 1e9) if params is not None else "",
            "card": card_name(c.get("device")), "log": f"{os.path.basename(path)} (no summary: {how})",
            "_failed": True}


def log_row(path) -> dict:
    """One CSV row from one log (a failed run's: see failed_row)."""
    log = read_log(path)
    s, c = log.summary, log.config
    if "samples per second" not in s or "mean iteration time (ms)" not in s:
        return failed_row(path, log)
    params = log.total_parameters
    return {
        "method": c.get("method") or s.get("method"),
        "layers": c.get("layers"),
        "hidden": c.get("hidden"),
        "batch": c.get("micro batch"),
        "window": c.get("window"),
        "params (B)": fmt(params / 1e9) if params is not None else "",
        "samples/s": fmt(s["samples per second"]),
        "TFLOP/s": fmt(tflops(log)),
        "iteration (ms)": fmt(s["mean iteration time (ms)"]),
        "peak GPU (GiB)": fmt(s.get("peak GPU memory (GiB)")),
        "peak host (GiB)": fmt(s.get("peak host RSS (GiB)")),
        "card": card_name(c.get("device")),
        "log": os.path.basename(path),
        # Not written; they tell configurations apart.
        "_key": (c.get("method"), c.get("layers"), c.get("hidden"), c.get("heads"), c.get("seq"),
                 c.get("micro batch"), c.get("global batch"), c.get("window"), c.get("precision"),
                 c.get("recompute")),
    }


def log_order(path):
    m = LOG_NAME.match(os.path.basename(path))
    return ((m.group("stamp") or "") if m else "", os.path.getmtime(path), path)


def rows_from_logs(case_dir, warn) -> list:
    """The newest complete run of each configuration, and a failed run's row where the same method and
    size never completed."""
    paths = [p for p in glob.glob(os.path.join(case_dir, "log_*.txt")) if LOG_NAME.match(os.path.basename(p))]
    newest, failed = {}, {}
    for path in sorted(paths, key=log_order):
        try:
            row = log_row(path)
        except ExtractionError as exc:
            warn(f"skipping {exc}")
            continue
        if row.pop("_failed", False):
            warn(f"{row['log']}: kept as a run that did not train")
            failed[size_of(row)] = row
        else:
            newest[row["_key"]] = row  # later (newer) logs replace earlier ones
    trained = {size_of(row) for row in newest.values()}
    return list(newest.values()) + [row for size, row in failed.items() if size not in trained]


def size_of(row):
    return tuple(row.get(k) for k in ("method", "layers", "hidden", "batch", "window"))


def _header_key(name: str) -> str:
    """Map a largest-model CSV header onto a COLUMNS name (None: ignored)."""
    words = re.sub(r"[^a-z0-9]+", " ", name.lower()).split()
    text = " ".join(words)
    if text == "method":
        return "method"
    if text == "search":
        return "search"
    if "layer" in text:
        return "layers"
    if "param" in text:
        return "params (B)"
    if "gpu" in text:
        return "peak GPU (GiB)"
    if "host" in text or "rss" in text:
        return "peak host (GiB)"
    if "card" in words or "device" in words or "gpu name" in text:
        return "card"
    for key in ("hidden", "batch", "window"):
        if key in words:
            return key
    return None


def _number(text, cast=float):
    text = (text or "").strip()
    if not text:
        return None
    try:
        return cast(float(text)) if cast is int else cast(text)
    except ValueError:
        raise ExtractionError(f"not a number: {text!r}")


def rows_from_largest(case_dir, warn) -> list:
    paths = sorted(glob.glob(os.path.join(case_dir, "*.csv")), key=lambda p: (os.path.getmtime(p), p))
    newest = {}
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                warn(f"skipping {path}: empty")
                continue
            keys = [_header_key(h) for h in header]
            if "method" not in keys or "layers" not in keys:
                warn(f"skipping {path}: no 'method' and 'largest layers' columns (header {header})")
                continue
            for line in reader:
                if not any(cell.strip() for cell in line):
                    continue
                raw = {k: v.strip() for k, v in zip(keys, line) if k}
                try:
                    row = {
                        "method": raw["method"],
                        "layers": _number(raw.get("layers"), int),
                        "hidden": _number(raw.get("hidden"), int),
                        "batch": _number(raw.get("batch"), int),
                        "window": _number(raw.get("window"), int),
                        "params (B)": fmt(_number(raw.get("params (B)"))),
                        "peak GPU (GiB)": fmt(_number(raw.get("peak GPU (GiB)"))),
                        "peak host (GiB)": fmt(_number(raw.get("peak host (GiB)"))),
                        "card": card_name(raw.get("card")) if raw.get("card") else "",
                        "log": os.path.basename(path),
                    }
                    if raw.get("search", "complete") != "complete":  # a search cut short: a lower bound
                        row["log"] += f" ({raw['search']})"
                except ExtractionError as exc:
                    warn(f"skipping a row of {path}: {exc}")
                    continue
                if not row["method"] or row["layers"] is None:
                    warn(f"skipping a row of {path}: no method or layer count")
                    continue
                newest[row["method"]] = row
    return list(newest.values())


def sort_key(row):
    method = row["method"]
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    num = lambda v: -1 if v in (None, "") else int(v)  # noqa: E731
    return (rank, method, num(row.get("layers")), num(row.get("window")), num(row.get("batch")),
            num(row.get("hidden")))


def extract(case: str, results: str, warn=None) -> str:
    """Write results/<case>.csv; returns its path. Raises ExtractionError when nothing is usable."""
    if case not in CASES:
        raise ExtractionError(f"unknown case {case!r}; one of {', '.join(CASES)}")
    warn = warn or (lambda msg: print(f"extract_results: {msg}", file=sys.stderr))
    case_dir = os.path.join(results, case)
    if not os.path.isdir(case_dir):
        raise ExtractionError(f"{case_dir} does not exist: run examples/{case}.sh first")
    if case == "case1":
        rows = rows_from_largest(case_dir, warn)
        what = "largest-model CSV (from tools/largest_model.py)"
    else:
        rows = rows_from_logs(case_dir, warn)
        what = "complete training log (log_*.txt with a summary line)"
        if not any("samples/s" in row for row in rows):  # failed runs only: nothing was measured
            rows = []
    if not rows:
        raise ExtractionError(f"no {what} in {case_dir}")
    rows.sort(key=sort_key)
    out = os.path.join(results, f"{case}.csv")
    tmp = out + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=CASES, help="which case's logs to read")
    p.add_argument("--results", default=os.environ.get("RESULTS_DIR") or os.path.join(ROOT, "results"),
                   help="results directory holding caseN/ (default: $RESULTS_DIR or results/)")
    args = p.parse_args(argv)
    try:
        out = extract(args.case, args.results)
    except ExtractionError as exc:
        print(f"extract_results: error: {exc}", file=sys.stderr)
        return 1
    with open(out, newline="") as f:
        n = sum(1 for _ in csv.reader(f)) - 1
    print(f"extract_results: wrote {out} ({n} row{'s' if n != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
