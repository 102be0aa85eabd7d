"""The artifact evaluation: examples/caseN.sh -> logs -> tools/extract_results.py -> tools/draw_results.py.

Real (tiny, CPU) trainings through the case scripts and examples/run.sh, and synthetic logs written
with the log contract's own writers for what a CPU cannot produce (a GPU card name, failed runs).
"""
import csv
import math
import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from megatron.stronghold.logs import iteration_line, read_log, summary_line  # noqa: E402
from tools import draw_results, extract_results  # noqa: E402

TINY = ["--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings", "32",
        "--log-interval", "1"]
TINY_SIZE = ["-h", "64", "-b", "2", "-i", "3"]


def case(n, args, results, timeout=300, **env):
    environ = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(results), **env)
    return subprocess.run(["bash", os.path.join(REPO_ROOT, "examples", f"case{n}.sh"), *args],
                          env=environ, cwd=str(results), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def ok(result):
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    return output


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == extract_results.COLUMNS
        return list(reader)


def drawn(case, results, tmp_path):
    """The axes tools/draw_results.py draws for `case` from RESULTS/caseN.csv. The figure drawn from
    them here must be RESULTS/caseN.png (a case script's or draw_results.main's) pixel for pixel, so
    what a test asserts of the axes is what the PNG shows."""
    import matplotlib.image

    captured = []
    original = draw_results.DRAW[case]

    def record(ax, rows):
        original(ax, rows)
        captured.append(ax)

    draw_results.DRAW[case] = record
    try:
        redrawn = draw_results.draw(case, str(results), out=str(tmp_path / f"redrawn_{case}.png"))
    finally:
        draw_results.DRAW[case] = original
    shown, expected = matplotlib.image.imread(results / f"{case}.png"), matplotlib.image.imread(redrawn)
    assert shown.shape == expected.shape and (shown == expected).all(), f"{case}.png is not the figure of {case}.csv"
    (ax,) = captured
    return ax


def heights(ax):
    return [bar.get_height() for bar in ax.patches]


def texts(items):
    return [t.get_text() for t in items]


def title_lines(ax):
    return ax.get_title().split("\n")


def check_row_matches_log(row, log_path):
    """Every number of a CSV row is the one its log says."""
    log = read_log(log_path)
    c, s = log.config, log.summary
    assert row["method"] == c["method"]
    assert int(row["layers"]) == c["layers"]
    assert int(row["hidden"]) == c["hidden"]
    assert int(row["batch"]) == c["micro batch"]
    assert row["window"] == ("" if c["window"] is None else str(c["window"]))
    assert math.isclose(float(row["params (B)"]) * 1e9, log.total_parameters, rel_tol=1e-5)
    assert math.isclose(float(row["samples/s"]), s["samples per second"], rel_tol=1e-5)
    assert math.isclose(float(row["iteration (ms)"]), s["mean iteration time (ms)"], rel_tol=1e-5)
    assert math.isclose(float(row["peak GPU (GiB)"]), s["peak GPU memory (GiB)"], abs_tol=1e-9)
    assert math.isclose(float(row["peak host (GiB)"]), s["peak host RSS (GiB)"], rel_tol=1e-5)
    # The iteration lines round TFLOP/s to 3 decimals; the row scales the FLOPs per sample of a line
    # to the summary's throughput, so it agrees with every line within that rounding.
    S = s["samples per second"]
    lines = [r for r in log.iterations if r["samples per second"] > 0]
    assert lines
    for line in lines:
        expected = line["TFLOP/s per GPU"] / line["samples per second"] * S
        tolerance = 0.0005 * S * (1 / line["samples per second"] + 1 / min(r["samples per second"] for r in lines))
        assert abs(float(row["TFLOP/s"]) - expected) <= tolerance + 1e-12, (row["TFLOP/s"], expected)
    expected_card = "CPU" if str(c["device"]).startswith("cpu") else re.match(r"cuda \((.*)\)", c["device"]).group(1)
    assert row["card"] == expected_card


# --------------------------------------------------------------------------- real tiny trainings

@pytest.fixture(scope="module")
def case3_results(tmp_path_factory):
    """megatron-lm and stronghold (window 1) at 2 layers, through case3.sh and examples/run.sh."""
    results = tmp_path_factory.mktemp("results")
    output = ok(case(3, ["-m", "megatron-lm stronghold", "-l", "2", "-w", "1", *TINY_SIZE, "--", *TINY], results))
    return results, output


@pytest.mark.integration
def test_case3_trains_extracts_and_draws(case3_results, tmp_path):
    results, output = case3_results
    logs = sorted(os.listdir(results / "case3"))
    assert [name.split("_l-")[0] for name in logs] == ["log_megatron-lm", "log_stronghold"], logs
    for name in logs:
        assert name.endswith(".txt") and "_l-2_hs-64_bs-2_ws-1_" in name
        log = read_log(results / "case3" / name)
        assert [row["iteration"] for row in log.iterations] == [1, 2, 3]  # -i 3 reached the trainer
        assert log.exit_status == 0  # run.sh's last line, which tells how a run without a summary ended
    rows = read_csv(results / "case3.csv")
    assert [r["method"] for r in rows] == ["megatron-lm", "stronghold"]
    assert [r["window"] for r in rows] == ["", "1"]  # -w 1 is stronghold's; megatron-lm streams nothing
    for row in rows:
        assert row["log"] in logs
        check_row_matches_log(row, results / "case3" / row["log"])
    # The same model: both methods report the same parameter count.
    assert rows[0]["params (B)"] == rows[1]["params (B)"]
    assert "wrote" in output and "case3.png" in output
    # The figure: one bar per method, as high as the throughput its log reports.
    ax = drawn("case3", results, tmp_path)
    assert heights(ax) == [float(r["samples/s"]) for r in rows]
    assert texts(ax.get_xticklabels()) == ["megatron-lm", "stronghold"]
    assert texts(ax.texts) == [f"{float(r['samples/s']):.3g}" for r in rows]
    assert ax.get_ylabel() == "throughput (samples/s)"
    what, size, card = title_lines(ax)
    assert what == "Throughput at megatron-lm's largest size" and card == "measured on: CPU"
    assert size.startswith("2 layers, ") and size.endswith(" params, hidden 64, micro-batch 2")


@pytest.mark.integration
def test_case2_pairs_each_baseline_with_stronghold(case3_results, tmp_path):
    """case2.csv/png from a megatron-lm and a stronghold log at the same size (case 3's logs, copied)."""
    results, _ = case3_results
    (tmp_path / "case2").mkdir()
    for name in os.listdir(results / "case3"):
        (tmp_path / "case2" / name).write_bytes((results / "case3" / name).read_bytes())
    assert extract_results.main(["case2", "--results", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "case2.csv")
    assert {(r["method"], r["layers"]) for r in rows} == {("megatron-lm", "2"), ("stronghold", "2")}
    for row in rows:
        check_row_matches_log(row, tmp_path / "case2" / row["log"])
    assert draw_results.main(["case2", "--results", str(tmp_path)]) == 0
    # The baseline's bar beside stronghold's at the same size, labelled with stronghold's speed-up.
    ax = drawn("case2", tmp_path, tmp_path)
    base, sh = (float(next(r for r in rows if r["method"] == m)["samples/s"]) for m in ("megatron-lm", "stronghold"))
    assert heights(ax) == [base, sh]
    assert texts(ax.texts) == [f"{base:.3g}", f"{sh:.3g}\n({sh / base:.2f}x)"]
    (tick,) = texts(ax.get_xticklabels())
    assert tick.startswith("megatron-lm\n2 layers, ")
    assert texts(ax.get_legend().get_texts()) == ["baseline at its largest size", "stronghold at the same size"]
    assert title_lines(ax)[-1] == "measured on: CPU"


@pytest.mark.integration
def test_case4_stronghold_over_layers(tmp_path):
    ok(case(4, ["-p", "1 2", "-w", "1", *TINY_SIZE, "--", *TINY], tmp_path))
    rows = read_csv(tmp_path / "case4.csv")
    assert [(r["method"], int(r["layers"])) for r in rows] == [("stronghold", 1), ("stronghold", 2)]
    for row in rows:
        check_row_matches_log(row, tmp_path / "case4" / row["log"])
    assert float(rows[0]["params (B)"]) < float(rows[1]["params (B)"])  # one more layer, more params
    # One line, stronghold's iteration time at 1 and 2 layers.
    ax = drawn("case4", tmp_path, tmp_path)
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [1, 2]
    assert list(line.get_ydata()) == [float(r["iteration (ms)"]) for r in rows]
    assert texts(ax.get_legend().get_texts()) == ["stronghold, window 1"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("transformer layers", "iteration time (ms)")
    assert title_lines(ax)[-1] == "measured on: CPU"


@pytest.mark.integration
def test_case5_stronghold_over_windows(tmp_path):
    result = case(5, ["-p", "1 2 4", "-l", "2", *TINY_SIZE, "--", *TINY], tmp_path)
    output = ok(result)
    assert "skipping window 4: larger than the 2 layers" in output
    rows = read_csv(tmp_path / "case5.csv")
    assert [(r["method"], int(r["layers"]), int(r["window"])) for r in rows] == [
        ("stronghold", 2, 1), ("stronghold", 2, 2)]
    for row in rows:
        check_row_matches_log(row, tmp_path / "case5" / row["log"])
    # One bar per window, as high as that run's throughput; the skipped window has none.
    ax = drawn("case5", tmp_path, tmp_path)
    assert heights(ax) == [float(r["samples/s"]) for r in rows]
    assert texts(ax.get_xticklabels()) == ["1", "2"]
    assert ax.get_xlabel() == "window size (layers on the GPU)"
    assert title_lines(ax)[1].startswith("2 layers, ")


# --------------------------------------------------------------------------- case 1 and sizes from it

FAKE_TOOL = r'''
import argparse, csv, json, os, sys
p = argparse.ArgumentParser()
for flag in ("--method", "--hidden", "--heads", "--seq", "--batch", "--start", "--out", "--extra"):
    p.add_argument(flag)
a = p.parse_args()
layers = {"megatron-lm": 3, "stronghold": 20}[a.method]
with open(os.path.join(a.out, "calls.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
with open(os.path.join(a.out, f"largest_{a.method}.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["method", "largest layers", "params (B)", "peak GPU (GiB)", "peak host (GiB)", "card"])
    w.writerow([a.method, layers, layers * 0.05, 70.5, 3.25 * layers, "NVIDIA H100 80GB HBM3"])
'''


@pytest.mark.integration
def test_case1_without_the_tool_exits_3(tmp_path):
    result = case(1, [], tmp_path, LARGEST_MODEL_TOOL=str(tmp_path / "missing.py"))
    assert result.returncode == 3, result.stdout + result.stderr
    assert "missing.py does not exist" in result.stderr
    assert not (tmp_path / "case1").exists()


@pytest.fixture
def case1_results(tmp_path):
    tool = tmp_path / "fake_largest_model.py"
    tool.write_text(FAKE_TOOL)
    ok(case(1, ["-m", "megatron-lm stronghold", "-h", "256", "-b", "2", "--", "--extra", "x"], tmp_path,
            LARGEST_MODEL_TOOL=str(tool)))
    return tmp_path


@pytest.mark.integration
def test_case1_runs_the_tool_and_merges_its_csvs(case1_results):
    results = case1_results
    calls = [line for line in (results / "case1" / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2
    for call, method in zip(calls, ("megatron-lm", "stronghold")):
        assert call == ('["--method", "%s", "--hidden", "256", "--heads", "16", "--seq", "1024", "--batch", "2", '
                        '"--start", "planner", "--out", "%s/", "--extra", "x"]' % (method, results / "case1"))
    rows = read_csv(results / "case1.csv")
    assert [(r["method"], r["layers"], r["params (B)"], r["peak GPU (GiB)"], r["peak host (GiB)"], r["card"])
            for r in rows] == [("megatron-lm", "3", "0.15", "70.5", "9.75", "NVIDIA H100 80GB HBM3"),
                               ("stronghold", "20", "1", "70.5", "65", "NVIDIA H100 80GB HBM3")]
    assert all(r["samples/s"] == "" for r in rows)
    # Bars of the largest model, in billions of parameters, labelled with its size.
    ax = drawn("case1", results, results)
    assert heights(ax) == [0.15, 1.0]
    assert texts(ax.texts) == ["0.15 B\n3 layers", "1 B\n20 layers"]
    assert texts(ax.get_xticklabels()) == ["megatron-lm", "stronghold"]  # one card: not in the ticks
    assert ax.get_ylabel() == "largest trainable model (billion parameters)"
    assert title_lines(ax) == ["Largest trainable GPT per method", "measured on: NVIDIA H100 80GB HBM3"]


def dry_commands(output):
    return [line.split("running: ", 1)[1].split() for line in output.splitlines() if "run.sh: running: " in line]


def flag(command, name):
    return command[len(command) - 1 - command[::-1].index(name) + 1]


@pytest.mark.integration
def test_cases_take_their_sizes_from_case1(case1_results):
    results = case1_results
    # Case 2: megatron-lm at its largest (3 layers), then stronghold at 3 layers; stronghold's own
    # largest size is not a baseline.
    commands = dry_commands(ok(case(2, ["--dry-run", "-i", "7", "-w", "2"], results)))
    assert [(flag(c, "--offload-method"), flag(c, "--num-layers"), flag(c, "--window-size"), flag(c, "--train-iters"))
            for c in commands] == [("megatron-lm", "3", "2", "7"), ("stronghold", "3", "2", "7")]
    # Case 4: the default layer counts, capped at stronghold's largest (20).
    commands = dry_commands(ok(case(4, ["--dry-run"], results)))
    assert [flag(c, "--num-layers") for c in commands] == ["16", "20"]
    # Case 5: megatron-lm's largest size; windows beyond its 3 layers are skipped.
    commands = dry_commands(ok(case(5, ["--dry-run", "-p", "1 2 4"], results)))
    assert [(flag(c, "--num-layers"), flag(c, "--window-size")) for c in commands] == [("3", "1"), ("3", "2")]
    assert not (results / "case2").exists() or not os.listdir(results / "case2")  # a dry run writes no log


@pytest.mark.parametrize("n, args, message", [
    (2, [], r"no sizes: pass -p"),
    (2, ["-p", "megatron-lm"], r"bad point 'megatron-lm' \(expected METHOD:LAYERS\)"),
    (2, ["-p", "foo:3"], r"unknown method 'foo'"),
    (3, [], r"no layer count: pass -l LAYERS, or run examples/case1.sh first"),
    (3, ["-l", "0"], r"-l \(layers\) must be a positive integer"),
    (4, ["-p", "8 x"], r"layers in -p must be a positive integer, got 'x'"),
    (5, ["-l", "4", "-m", "l2l"], r"option -m is not used by case 5"),
    (5, ["-i"], r"option -i requires a value"),
])
@pytest.mark.integration
def test_bad_case_arguments(tmp_path, n, args, message):
    result = case(n, args, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert "running:" not in result.stdout + result.stderr
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- extraction on synthetic logs

def write_log(path, method="stronghold", layers=32, window=4, device="cuda (NVIDIA H100 80GB HBM3)",
              samples=10.0, tflops=150.0, complete=True, params=1_678_000_000, summary_tflops=None,
              exit_status=None):
    """A log in the trainer's format, written with the trainer's own line writers (and examples/run.sh's
    last line, when exit_status is given)."""
    config = {"method": method, "precision": "bf16", "device": device, "layers": layers, "hidden": 2048,
              "heads": 16, "seq": 1024, "micro batch": 4, "global batch": 4, "micro batches per step": 1,
              "window": window, "recompute": "none"}
    lines = [f"total parameters: {params} ({params / 1e9:.3f} B)",
             "config |" + "".join(f" {k}: {v} |" for k, v in config.items())]
    for it in (5, 10):
        lines.append(iteration_line(it, 10, {"elapsed time per iteration (ms)": f"{4000 / samples:.1f}",
                                             "lm loss": "1.0E+01", "samples per second": f"{samples:.3f}",
                                             "TFLOP/s per GPU": f"{tflops:.3f}"}))
    if complete:
        lines.append(summary_line({"method": method, "iterations": 10, "mean iteration time (ms)": 4000 / samples,
                                   "samples per second": samples, "peak GPU memory (GiB)": 61.5,
                                   "peak host RSS (GiB)": 90.25, "pinned host memory (GiB)": 10.0,
                                   **({"TFLOP/s per GPU": summary_tflops} if summary_tflops else {})}))
    if exit_status is not None:
        lines.append(f"examples/run.sh: method {method} exited with status {exit_status}")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.unit
def test_extraction_of_gpu_logs_newest_complete_wins_failed_kept_without_figures(tmp_path, capsys):
    d = tmp_path / "case4"
    d.mkdir()
    write_log(d / "log_stronghold_l-32_hs-2048_bs-4_ws-4_20260101-000000.txt", samples=5.0)
    write_log(d / "log_stronghold_l-32_hs-2048_bs-4_ws-4_20260102-000000.txt", samples=8.0, tflops=120.0)
    # a later failure at a size that also completed is left out; one at a size that never did is kept
    write_log(d / "log_stronghold_l-32_hs-2048_bs-4_ws-4_20260103-000000.txt", complete=False, exit_status=1)
    write_log(d / "log_stronghold_l-64_hs-2048_bs-4_ws-4_20260101-000000.txt", layers=64, complete=False,
              exit_status=137)
    write_log(d / "log_stronghold_l-16_hs-2048_bs-4_ws-4_20260101-000000.txt", layers=16, samples=16.0,
              device="cuda (NVIDIA H200)", summary_tflops=140.5)  # a summary's own TFLOP/s is taken as is
    (d / "notes.txt").write_text("not a log\n")
    assert extract_results.main(["case4", "--results", str(tmp_path)]) == 0
    assert "l-64" in capsys.readouterr().err  # the failed run is reported
    rows = read_csv(tmp_path / "case4.csv")
    assert [(r["layers"], r["samples/s"], r["TFLOP/s"], r["card"]) for r in rows] == [
        ("16", "16", "140.5", "NVIDIA H200"), ("32", "8", "120", "NVIDIA H100 80GB HBM3"),
        ("64", "", "", "NVIDIA H100 80GB HBM3")]
    assert rows[2]["log"].endswith("(no summary: killed (exit 137: usually out of host memory))")
    assert rows[2]["params (B)"] == "1.678" and rows[2]["iteration (ms)"] == ""
    assert rows[1]["log"].endswith("20260102-000000.txt")
    assert rows[1]["TFLOP/s"] == "120" and rows[1]["iteration (ms)"] == "500"
    assert rows[1]["params (B)"] == "1.678" and rows[1]["peak GPU (GiB)"] == "61.5"
    assert rows[1]["peak host (GiB)"] == "90.25"
    assert draw_results.main(["case4", "--results", str(tmp_path)]) == 0
    # The complete runs only (16 and 32 layers), at their newest iteration times, on both cards.
    ax = drawn("case4", tmp_path, tmp_path)
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [16, 32] and list(line.get_ydata()) == [250.0, 500.0]
    assert texts(ax.texts) == ["1.68 B", "1.68 B"]
    assert texts(ax.get_legend().get_texts()) == ["stronghold, window 4"]
    assert title_lines(ax) == ["StrongHold iteration time as the model grows", "hidden 2048, micro-batch 4",
                               "measured on: NVIDIA H100 80GB HBM3 / NVIDIA H200"]


@pytest.mark.unit
def test_extraction_without_logs_fails(tmp_path, capsys):
    assert extract_results.main(["case3", "--results", str(tmp_path)]) == 1
    assert "run examples/case3.sh first" in capsys.readouterr().err
    (tmp_path / "case3").mkdir()
    write_log(tmp_path / "case3" / "log_megatron-lm_l-4_hs-2048_bs-4_ws-4_20260101-000000.txt", complete=False)
    assert extract_results.main(["case3", "--results", str(tmp_path)]) == 1
    assert "no complete training log" in capsys.readouterr().err
    assert not (tmp_path / "case3.csv").exists()
    assert draw_results.main(["case3", "--results", str(tmp_path)]) == 1


@pytest.mark.unit
def test_a_method_that_did_not_train_is_drawn_as_such(tmp_path):
    """Case 3 on an H100: zero-infinity was killed at megatron-lm's largest size; its slot says so."""
    d = tmp_path / "case3"
    d.mkdir()
    write_log(d / "log_megatron-lm_l-88_hs-2048_bs-4_ws-4_20260101-000000.txt", method="megatron-lm", layers=88)
    write_log(d / "log_zero-infinity_l-88_hs-2048_bs-4_ws-4_20260101-000000.txt", method="zero-infinity",
              layers=88, complete=False, exit_status=137)
    assert extract_results.main(["case3", "--results", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "case3.csv")
    assert [(r["method"], r["samples/s"]) for r in rows] == [("megatron-lm", "10"), ("zero-infinity", "")]
    fig, ax = draw_results.plt.subplots()
    draw_results.draw_case3(ax, rows)
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["10", "did not train\n(killed)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["megatron-lm", "zero-infinity"]
    draw_results.plt.close(fig)


@pytest.mark.unit
def test_largest_model_csv_headers_are_matched_loosely(tmp_path):
    d = tmp_path / "case1"
    d.mkdir()
    (d / "largest_l2l.csv").write_text(
        "Method,largest_layers,params_b,peak_gpu_gib,peak_host_gib,card,hidden,batch\n"
        "l2l,80,3.3,12.5,70,cuda (NVIDIA H100 80GB HBM3),2048,4\n")
    (d / "unrelated.csv").write_text("a,b\n1,2\n")
    assert extract_results.main(["case1", "--results", str(tmp_path)]) == 0
    (row,) = read_csv(tmp_path / "case1.csv")
    assert (row["method"], row["layers"], row["params (B)"], row["peak GPU (GiB)"], row["peak host (GiB)"],
            row["card"], row["hidden"], row["batch"]) == (
        "l2l", "80", "3.3", "12.5", "70", "NVIDIA H100 80GB HBM3", "2048", "4")


@pytest.mark.unit
def test_a_search_cut_short_is_marked_as_a_lower_bound(tmp_path):
    d = tmp_path / "case1"
    d.mkdir()
    (d / "largest_stronghold.csv").write_text(
        "method,largest layers,params (B),peak GPU (GiB),peak host (GiB),card,hidden,batch,search\n"
        "stronghold,236,11.9,72.1,122.1,NVIDIA H100 80GB HBM3,2048,4,237 layers timed out: at least 236\n")
    (d / "largest_l2l.csv").write_text(
        "method,largest layers,params (B),peak GPU (GiB),peak host (GiB),card,hidden,batch,search\n"
        "l2l,150,7.5,10.0,110.0,NVIDIA H100 80GB HBM3,2048,4,complete\n")
    assert extract_results.main(["case1", "--results", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in read_csv(tmp_path / "case1.csv")}
    assert rows["stronghold"]["layers"] == "236"
    assert rows["stronghold"]["log"] == "largest_stronghold.csv (237 layers timed out: at least 236)"
    assert rows["l2l"]["log"] == "largest_l2l.csv"


@pytest.mark.unit
def test_case2_takes_a_baselines_point_from_its_largest_model_trial_log(tmp_path):
    """tools/largest_model.py names its trial logs without window and time stamp, and the baselines
    print no window: such a log is a case 2 point as it stands."""
    d = tmp_path / "case2"
    d.mkdir()
    write_log(d / "log_zero-offload_l-104_hs-2048_bs-4.txt", method="zero-offload", layers=104, window=None,
              samples=1.0)
    write_log(d / "log_stronghold_l-104_hs-2048_bs-4_ws-4_20260101-000000.txt", layers=104, samples=5.5)
    assert extract_results.main(["case2", "--results", str(tmp_path)]) == 0
    rows = {r["method"]: r for r in read_csv(tmp_path / "case2.csv")}
    assert rows["zero-offload"]["samples/s"] == "1" and rows["zero-offload"]["window"] == ""
    assert rows["zero-offload"]["log"] == "log_zero-offload_l-104_hs-2048_bs-4.txt"
    assert draw_results.main(["case2", "--results", str(tmp_path)]) == 0
    ax = drawn("case2", tmp_path, tmp_path)
    assert heights(ax) == [1.0, 5.5] and texts(ax.texts) == ["1", "5.5\n(5.50x)"]
    assert texts(ax.get_xticklabels()) == ["zero-offload\n104 layers, 1.68 B"]


@pytest.mark.unit
def test_a_lower_bound_is_drawn_as_one(tmp_path):
    import matplotlib.pyplot as plt

    rows = [{"method": "megatron-lm", "layers": "88", "params (B)": "4.43", "card": "NVIDIA H100 80GB HBM3",
             "log": "largest_megatron-lm.csv"},
            {"method": "l2l", "layers": "155", "params (B)": "7.81", "card": "NVIDIA H200",
             "log": "largest_l2l.csv (stopped at 156 layers: at least 155)"}]
    fig, ax = plt.subplots()
    draw_results.draw_case1(ax, rows)
    labels = [t.get_text() for t in ax.texts]
    assert "4.43 B\n88 layers" in labels and ">= 7.81 B\n155 layers" in labels
    assert [t.get_text() for t in ax.get_xticklabels()] == ["megatron-lm\n(H100)", "l2l\n(H200)"]
    plt.close(fig)
