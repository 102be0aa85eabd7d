"""tools/bench_real_batch.py's hand sweep (cases 7 and 8): the rows it adds around the plan's placement,
and a whole sweep on a CPU with the sizes overridden to a tiny model."""

import csv
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool():
    spec = importlib.util.spec_from_file_location("bench_real_batch", os.path.join(ROOT, "tools", "bench_real_batch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_the_sweep_surrounds_the_plans_placement():
    bench = tool()
    plan = "plan | resident layers: 79 | streamed layers: 17 | window: 4 | resident layers recompute: 30 | GPU: 70 GiB |"
    rows = bench.sweep_rows({"case": 7, "plan": plan})
    placements = [(r[4][r[4].index("--resident-layers") + 1],
                   r[4][r[4].index("--recompute-num-layers") + 1] if "--recompute-num-layers" in r[4] else "plan")
                  for r in rows]
    assert placements == [("79", "34"), ("75", "plan"), ("75", "30"), ("75", "34"), ("71", "plan"), ("71", "30"),
                          ("71", "34")]
    assert all(r[2] == 96 and r[3] == 8 for r in rows)  # case 6's 96-layer shape, micro-batch 8
    # the plan chose none recomputing: its own choice stands in for N = 0
    rows = bench.sweep_rows({"case": 8, "plan": plan.replace("recompute: 30", "recompute: 0")})
    assert [r[0].split(", ")[-1] for r in rows] == ["R=79 N=4", "R=75 N=plan", "R=75 N=4", "R=71 N=plan", "R=71 N=4"]
    # explicit recompute flags leave the field out of the plan line: the plan's choice counts as none
    rows = bench.sweep_rows({"case": 7, "plan": plan.replace(" resident layers recompute: 30 |", "")})
    assert [r[0].split(", ")[-1] for r in rows][:2] == ["R=79 N=4", "R=75 N=plan"]
    verdict = bench.verdicts(7, [{"label": bench.rows_of(7)[0][0], "median iteration (ms)": 104.0},
                                 {"label": "other", "median iteration (ms)": 100.0}])
    assert verdict == ["case 7: the plan's placement / the fastest of the sweep (other) = 1.040 (target <= 1.05) met"]


@pytest.mark.integration
def test_a_sweep_runs_through_on_a_cpu(tmp_path):
    """The tool's wiring: case 7 runs its plan row, reads the plan line, and prints the verdict. On a CPU the
    plan streams every layer (no resident layer to sweep), so the plan's row is the whole sweep."""
    tiny = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
            "--micro-batch-size 2 --global-batch-size 4")
    proc = subprocess.run([sys.executable, "tools/bench_real_batch.py", "--out", str(tmp_path), "--cases", "7",
                           "--iters", "3", "--override", tiny], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(tmp_path / "real_batch.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["label"], r["exit"]) for r in rows] == [("stronghold 96 layers mb8 recompute", "0")]
    assert "resident layers: 0 |" in rows[0]["plan"]
    assert ("case 7: the plan's placement / the fastest of the sweep (stronghold 96 layers mb8 recompute) = 1.000 "
            "(target <= 1.05) met") in proc.stdout


@pytest.mark.integration
def test_a_budget_stops_the_tool_and_resume_runs_the_rest(tmp_path):
    """A call cut by its budget writes the rows it ran; the next call, given that CSV, runs only the rest and
    judges all of them together."""
    tiny = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
            "--micro-batch-size 2 --global-batch-size 4 --ffn-hidden-size 256 --num-query-groups 4")

    def bench(out, *more):
        proc = subprocess.run([sys.executable, "tools/bench_real_batch.py", "--out", str(out), "--cases", "6",
                               "--iters", "3", "--override", tiny, *more], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        with open(out / "real_batch.csv") as f:
            return proc.stdout, list(csv.DictReader(f))

    first, rows = bench(tmp_path / "first", "--budget", "1")
    assert [r["exit"] for r in rows] == ["0", "not run", "not run"]
    assert first.count("not run (the budget of 1 s") == 2
    measured_first = rows[0]
    second, rows = bench(tmp_path / "second", "--resume", str(tmp_path / "first" / "real_batch.csv"))
    assert [r["exit"] for r in rows] == ["0", "0", "0"]
    assert second.count("measured by the earlier run") == 1
    assert {k: v for k, v in rows[0].items() if v} == {k: v for k, v in measured_first.items() if v}  # not rerun
