"""Draw one artifact-evaluation case from its CSV (written by tools/extract_results.py).

    python tools/draw_results.py caseN [--results DIR] [--out PNG]

Reads DIR/caseN.csv and writes DIR/caseN.png (DIR: --results, else $RESULTS_DIR, else results/):
  case1  bars: largest trainable model (billions of parameters) per method       (paper Fig. 6a)
  case2  bars: each baseline at its largest size against stronghold at that size  (Fig. 7a)
  case3  bars: every method at megatron-lm's largest size                         (Fig. 8a)
  case4  line: stronghold's iteration time against the number of layers          (Fig. 8b)
  case5  bars: stronghold's throughput against the window size                   (Fig. 9)
The GPU named in the logs is in every title: figures from different cards are not comparable.
"""

import argparse
import csv
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from megatron.stronghold.arguments import METHODS  # noqa: E402

CASES = ("case1", "case2", "case3", "case4", "case5")
METHOD_ORDER = METHODS
COLORS = {"megatron-lm": "#4c72b0", "l2l": "#dd8452", "zero-offload": "#55a868",
          "zero-infinity": "#8172b3", "stronghold": "#c44e52"}


class DrawError(Exception):
    pass


def num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_rows(path):
    if not os.path.exists(path):
        raise DrawError(f"{path} does not exist: run tools/extract_results.py first")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DrawError(f"{path} has no rows")
    return rows


def method_rank(method):
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def set_title(ax, text, rows, *details):
    """Three lines at most: what is shown, the model sizes, the card it was measured on."""
    cards = sorted({r.get("card") for r in rows if r.get("card")})
    detail = ", ".join(d for d in details if d)
    lines = [text] + ([detail] if detail else []) + [f"measured on: {' / '.join(cards) if cards else 'unknown card'}"]
    ax.set_title("\n".join(lines), fontsize=10)


def model_text(rows):
    """'hidden 2048, micro-batch 4' when all rows agree, else ''."""
    parts = []
    for key, name in (("hidden", "hidden"), ("batch", "micro-batch")):
        values = {r.get(key) for r in rows if r.get(key)}
        if len(values) == 1:
            parts.append(f"{name} {values.pop()}")
    return ", ".join(parts)


def params_text(row):
    p = num(row.get("params (B)"))
    return f"{p:.3g} B" if p is not None else "? B"


def short_card(card):
    """'H100' for 'NVIDIA H100 80GB HBM3': the model number, where the name has one."""
    m = re.search(r"\b[A-Z]{1,2}\d{2,4}\b", card or "")
    return m.group(0) if m else (card or "?")


def label_bars(ax, bars, texts):
    for bar, text in zip(bars, texts):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)


def throughput_rows(rows, failed_too=False):
    """The rows with a throughput; with failed_too, also those of runs that did not train (extract_results
    keeps them with no figures and 'no summary: ...' in the log column)."""
    good = [r for r in rows if num(r.get("samples/s")) is not None]
    if not good:
        raise DrawError("no row has a throughput (samples/s)")
    return good + [r for r in rows if failed_too and did_not_train(r)]


def did_not_train(row):
    return num(row.get("samples/s")) is None and "no summary" in (row.get("log") or "")


def throughput_bars(ax, x, rows, colors):
    """Bars of samples/s; a run that did not train gets an empty slot marked with how it ended."""
    bars = ax.bar(x, [num(r["samples/s"]) or 0 for r in rows], color=colors)
    for bar, r in zip(bars, rows):
        middle = bar.get_x() + bar.get_width() / 2
        if did_not_train(r):
            ax.plot(middle, 0, marker="x", markersize=10, color="black", clip_on=False)
            text, lift = "did not train\n(killed)" if "killed" in r["log"] else "did not train", 8
        else:
            text, lift = f"{num(r['samples/s']):.3g}", 2
        ax.annotate(text, (middle, bar.get_height()), xytext=(0, lift), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)


def draw_case1(ax, rows):
    rows = [r for r in rows if num(r.get("params (B)")) is not None]
    if not rows:
        raise DrawError("no row has a parameter count")
    rows.sort(key=lambda r: (method_rank(r["method"]), r["method"]))
    x = range(len(rows))
    # a search cut short (extract_results notes "at least N" in the log column) gives a lower bound
    lower = ["at least" in (r.get("log") or "") for r in rows]
    bars = ax.bar(x, [num(r["params (B)"]) for r in rows], color=[COLORS.get(r["method"], "gray") for r in rows],
                  hatch=["//" if low else "" for low in lower], edgecolor="black", linewidth=0.5)
    label_bars(ax, bars, [f"{'>= ' if low else ''}{num(r['params (B)']):.3g} B\n{r['layers']} layers"
                          for r, low in zip(rows, lower)])
    cards = {r.get("card") for r in rows}
    ax.set_xticks(list(x), [r["method"] + (f"\n({short_card(r.get('card'))})" if len(cards) > 1 else "")
                            for r in rows])
    if any(lower):
        ax.text(0.01, 0.98, ">= / hatched: search stopped early, a lower bound", transform=ax.transAxes,
                va="top", fontsize=8)
    ax.set_ylabel("largest trainable model (billion parameters)")
    set_title(ax, "Largest trainable GPT per method", rows, model_text(rows))


def draw_case2(ax, rows):
    rows = throughput_rows(rows)
    stronghold = {(r["layers"], r["hidden"], r["batch"]): r for r in rows if r["method"] == "stronghold"}
    baselines = sorted((r for r in rows if r["method"] != "stronghold"),
                       key=lambda r: (method_rank(r["method"]), int(r["layers"])))
    if not baselines:
        raise DrawError("no baseline row (case 2 compares baselines with stronghold)")
    width = 0.38
    ticks = []
    for i, base in enumerate(baselines):
        b = ax.bar(i - width / 2, num(base["samples/s"]), width, color=COLORS.get(base["method"], "gray"),
                   edgecolor="black", linewidth=0.5)
        label_bars(ax, b, [f"{num(base['samples/s']):.3g}"])
        sh = stronghold.get((base["layers"], base["hidden"], base["batch"]))
        if sh is not None:
            s = ax.bar(i + width / 2, num(sh["samples/s"]), width, color=COLORS["stronghold"],
                       edgecolor="black", linewidth=0.5, hatch="//")
            label_bars(ax, s, [f"{num(sh['samples/s']):.3g}\n({num(sh['samples/s']) / num(base['samples/s']):.2f}x)"])
        ticks.append(f"{base['method']}\n{base['layers']} layers, {params_text(base)}")
    ax.set_xticks(range(len(baselines)), ticks, fontsize=8)
    ax.set_ylabel("throughput (samples/s)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="lightgray", ec="black", lw=0.5),
                       plt.Rectangle((0, 0), 1, 1, color=COLORS["stronghold"], ec="black", lw=0.5,
                                     hatch="//")],
              labels=["baseline at its largest size", "stronghold at the same size"], fontsize=8)
    set_title(ax, "Throughput at each baseline's largest size", rows, model_text(rows))


def draw_case3(ax, rows):
    rows = sorted(throughput_rows(rows, failed_too=True), key=lambda r: (method_rank(r["method"]), int(r["layers"])))
    sizes = sorted({(int(r["layers"]), params_text(r)) for r in rows})
    one_size = len(sizes) == 1
    x = range(len(rows))
    throughput_bars(ax, x, rows, [COLORS.get(r["method"], "gray") for r in rows])
    ax.set_xticks(list(x), [r["method"] if one_size else f"{r['method']}\n{r['layers']} layers" for r in rows])
    ax.set_ylabel("throughput (samples/s)")
    size = f"{sizes[0][0]} layers, {sizes[0][1]} params" if one_size else "several sizes"
    set_title(ax, "Throughput at megatron-lm's largest size", rows, size, model_text(rows))


def draw_case4(ax, rows):
    rows = [r for r in rows if num(r.get("iteration (ms)")) is not None]
    if not rows:
        raise DrawError("no row has an iteration time")
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["window"], r["hidden"], r["batch"]), []).append(r)
    for (method, window, hidden, batch), group in sorted(groups.items()):
        group.sort(key=lambda r: int(r["layers"]))
        xs = [int(r["layers"]) for r in group]
        ys = [num(r["iteration (ms)"]) for r in group]
        label = f"{method}, window {window}" + ("" if len(groups) == 1 else f", hidden {hidden}, batch {batch}")
        ax.plot(xs, ys, marker="o", color=COLORS.get(method, None) if len(groups) == 1 else None, label=label)
        for x, y, r in zip(xs, ys, group):
            ax.annotate(params_text(r), (x, y), xytext=(0, 5), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xlabel("transformer layers")
    ax.set_ylabel("iteration time (ms)")
    ax.set_ylim(0, 1.15 * max(num(r["iteration (ms)"]) for r in rows))  # room for the labels
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    set_title(ax, "StrongHold iteration time as the model grows", rows, model_text(rows))


def draw_case5(ax, rows):
    rows = sorted(throughput_rows(rows, failed_too=True), key=lambda r: (int(r["layers"]), int(r["window"])))
    sizes = sorted({(int(r["layers"]), params_text(r)) for r in rows})
    one_size = len(sizes) == 1
    x = range(len(rows))
    throughput_bars(ax, x, rows, COLORS["stronghold"])
    ax.set_xticks(list(x), [r["window"] if one_size else f"{r['window']}\n({r['layers']} layers)" for r in rows])
    ax.set_xlabel("window size (layers on the GPU)")
    ax.set_ylabel("throughput (samples/s)")
    size = f"{sizes[0][0]} layers, {sizes[0][1]} params" if one_size else "several sizes"
    set_title(ax, "StrongHold throughput against window size", rows, size, model_text(rows))


DRAW = {"case1": draw_case1, "case2": draw_case2, "case3": draw_case3, "case4": draw_case4, "case5": draw_case5}


def draw(case, results, out=None) -> str:
    if case not in DRAW:
        raise DrawError(f"unknown case {case!r}; one of {', '.join(CASES)}")
    rows = read_rows(os.path.join(results, f"{case}.csv"))
    out = out or os.path.join(results, f"{case}.png")
    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        DRAW[case](ax, rows)
        ax.margins(y=0.15)
        fig.tight_layout()
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=CASES)
    p.add_argument("--results", default=os.environ.get("RESULTS_DIR") or os.path.join(ROOT, "results"),
                   help="directory holding caseN.csv (default: $RESULTS_DIR or results/)")
    p.add_argument("--out", default=None, help="PNG to write (default: RESULTS/caseN.png)")
    args = p.parse_args(argv)
    try:
        out = draw(args.case, args.results, args.out)
    except DrawError as exc:
        print(f"draw_results: error: {exc}", file=sys.stderr)
        return 1
    print(f"draw_results: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
